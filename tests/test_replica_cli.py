"""Issue 16.3, 16.5: ``posstate replica status|list|verify|restore|prune`` against moto's S3 server over HTTP."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from conftest import write_key
from replica_util import client, held, pos, rcfg
from test_cli import ROOT, err_line, run

from posstate import PositionStateManager, StateConfig, generate_key
from posstate.replica import names as _names

_BOT = textwrap.dedent(
    """
    import base64, sys
    from decimal import Decimal
    from posstate import Position, PositionStateManager, StateConfig
    state_dir, url, endpoint, key = sys.argv[1:5]
    cfg = StateConfig.in_dir(state_dir, replica_url=url, replica_endpoint_url=endpoint, replica_interval=0.2)
    m = PositionStateManager(cfg, key=base64.b64decode(key))
    for i in range(30):
        m.set_position(Position(symbol=f"K{i}/USDT", side="long", contracts=Decimal(i + 1), entry_price=Decimal(10)))
        if i == 10:
            m.save()
    m.delete_position("K3/USDT", "long")
    assert m.flush_replica(60)
    print("flushed", flush=True)
    sys.stdin.readline()
    """
)


def _ship(tmp_path: Path, url: str, endpoint: str | None, key: bytes) -> None:
    with PositionStateManager(rcfg(tmp_path / "bot", url, endpoint), key=key) as m:
        m.set_position(pos("A/USDT"))
        m.save()
        m.set_position(pos("B/USDT"))
        assert m.flush_replica(30)


def test_sigkill_after_flush_then_restore_anywhere_holds_every_acknowledged_change(
    s3_server: Any, tmp_path: Path, key: bytes, key_file: Path
) -> None:
    """issue 16.3: a bot SIGKILLed after flush_replica(), its directory deleted, is restored by the CLI onto a
    fresh directory with every acknowledged change."""
    import shutil

    url = s3_server.bucket()
    bot = tmp_path / "bot"
    kid = subprocess.Popen(
        [sys.executable, "-c", _BOT, str(bot), url, s3_server.url, base64.b64encode(key).decode()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert kid.stdout is not None and kid.stdout.readline().strip() == "flushed"
        os.kill(kid.pid, signal.SIGKILL)
        kid.wait(30)
    finally:
        for pipe in (kid.stdin, kid.stdout):
            if pipe is not None:
                pipe.close()
    shutil.rmtree(bot)
    new = tmp_path / "elsewhere"
    r = run(
        [
            "replica",
            "restore",
            url,
            "--endpoint-url",
            s3_server.url,
            "--state-dir",
            str(new),
            "--key-file",
            str(key_file),
            "--json",
        ]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["records"] > 0
    with PositionStateManager(StateConfig.in_dir(new), key=key) as m:
        assert held(m) == {f"K{i}/USDT": i + 1 for i in range(30) if i != 3}


def test_restore_with_the_wrong_key_exits_3(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.3: `replica restore` with another key: exit 3, one Error: line, nothing written."""
    url = s3_server.bucket()
    _ship(tmp_path, url, s3_server.url, key)
    wrong = write_key(tmp_path / "wrong.key", generate_key())
    new = tmp_path / "new"
    r = run(["replica", "restore", url, "--endpoint-url", s3_server.url, "--state-dir", str(new), "--key-file", str(wrong)])
    assert r.exit_code == 3
    assert "key" in err_line(r)
    assert not (new / "positions.json").exists()


def test_restore_without_a_url_is_a_usage_error(tmp_path: Path, key_file: Path) -> None:
    """issue 16.3: no URL argument and no replica_url in --config: exit 2."""
    r = run(["replica", "restore", "--state-dir", str(tmp_path / "x"), "--key-file", str(key_file)])
    assert r.exit_code == 2
    assert "no replica URL" in err_line(r)


def test_verify_reads_every_object_and_names_a_damaged_one(s3_server: Any, tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 16.3: `replica verify` checks every object with the key (exit 0), and exits 1 naming a changed one."""
    url = s3_server.bucket()
    _ship(tmp_path, url, s3_server.url, key)
    args = ["replica", "verify", url, "--endpoint-url", s3_server.url, "--key-file", str(key_file), "--json"]
    r = run(args)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["objects"]
    assert rows and all(row["ok"] for row in rows)
    c = client(url, s3_server.url)
    snaps, _, _ = _names.split(o.key for o in c.list())
    data = bytearray(c.get(snaps[-1].key))
    data[40] ^= 0xFF
    c.put(snaps[-1].key, bytes(data))
    r = run(args)
    assert r.exit_code == 1
    bad = [row for row in json.loads(r.stdout)["objects"] if not row["ok"]]
    assert [row["key"] for row in bad] == [snaps[-1].key]


def test_status_and_list_show_the_lag_and_the_objects(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.3: `replica status` prints the records and seconds not yet shipped; `replica list` the objects;
    run where there is no state (newcomer s11: it said "generation None" and "snapshot: NOT shipped"), it says so."""
    url = s3_server.bucket()
    _ship(tmp_path, url, s3_server.url, key)
    base = ["--endpoint-url", s3_server.url, "--state-dir", str(tmp_path / "bot"), "--json"]
    r = run(["replica", "status", url, *base])
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["records_behind"] == 0 and st["snapshot_shipped"]
    with PositionStateManager(StateConfig.in_dir(tmp_path / "bot"), key=key) as m:  # no replica: the lag grows
        m.set_position(pos("C/USDT"))
        m.set_position(pos("D/USDT"))
    st = json.loads(run(["replica", "status", url, *base]).stdout)
    assert st["records_behind"] == 2 and st["seconds_behind"] >= 0
    listing = json.loads(run(["replica", "list", url, "--endpoint-url", s3_server.url, "--json"]).stdout)
    assert [s["generation"] for s in listing["snapshots"]] and listing["journals"]
    text = run(["replica", "status", url, "--endpoint-url", s3_server.url, "--state-dir", str(tmp_path / "bot")])
    assert "2 journal records" in text.stdout
    elsewhere = run(["replica", "status", url, "--endpoint-url", s3_server.url, "--state-dir", str(tmp_path / "none")])
    assert "local state:     none at" in elsewhere.stdout and "NOT shipped" not in elsewhere.stdout, elsewhere.stdout


def test_prune_dry_run_lists_and_prune_removes(s3_server: Any, tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 16.5: `replica prune --dry-run` removes nothing; `replica prune` applies max_backups to the replica."""
    url = s3_server.bucket()
    with PositionStateManager(rcfg(tmp_path / "bot", url, s3_server.url, max_backups=100), key=key) as m:
        for i in range(4):
            m.set_position(pos(f"A{i}/USDT"))
            m.save()
            assert m.flush_replica(30)
    cfgfile = tmp_path / "c.toml"
    cfgfile.write_text("[posstate]\nmax_backups = 1\n")
    c = client(url, s3_server.url)
    before = [o.key for o in c.list()]
    r = run(["replica", "prune", url, "--endpoint-url", s3_server.url, "--config", str(cfgfile), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["remove"] and [o.key for o in c.list()] == before
    r = run(["replica", "prune", url, "--endpoint-url", s3_server.url, "--config", str(cfgfile)])
    assert r.exit_code == 0, r.output
    snaps, _, _ = _names.split(o.key for o in c.list())
    assert len(snaps) == 1
    new = tmp_path / "new"
    r = run(["replica", "restore", url, "--endpoint-url", s3_server.url, "--state-dir", str(new), "--key-file", str(key_file)])
    assert r.exit_code == 0, r.output
    with PositionStateManager(StateConfig.in_dir(new), key=key) as m2:
        assert set(held(m2)) == {f"A{i}/USDT" for i in range(4)}


def test_restore_at_a_time_cuts_the_journal_there(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 16.3: `replica restore --at TIME` restores the state as of that time (records after it left out)."""
    import time
    from datetime import datetime, timezone

    url = f"file://{tmp_path}/rep"
    with PositionStateManager(rcfg(tmp_path / "bot", url), key=key) as m:
        m.set_position(pos("A/USDT"))
        m.save()
        m.set_position(pos("B/USDT"))
        at = time.time()
        while time.time() < at + 0.002:  # the next record's millisecond stamp is after `at`
            pass
        m.set_position(pos("C/USDT"))
        assert m.flush_replica(30)
    when = datetime.fromtimestamp(at, tz=timezone.utc).isoformat()
    new = tmp_path / "new"
    r = run(["replica", "restore", url, "--at", when, "--state-dir", str(new), "--key-file", str(key_file)])
    assert r.exit_code == 0, r.output
    with PositionStateManager(StateConfig.in_dir(new), key=key) as m2:
        assert set(held(m2)) == {"A/USDT", "B/USDT"}
    r = run(["replica", "restore", url, "--at", "yesterday", "--state-dir", str(tmp_path / "x"), "--key-file", str(key_file)])
    assert r.exit_code == 2


def test_replica_errors_map_to_documented_exit_codes() -> None:
    """issue 16.4: LeaseLostError is exit 5 (another writer), ReplicaError exit 1; neither message holds more than
    the URL and the object."""
    from posstate import LeaseLostError, ReplicaError
    from posstate.cli.base import exit_code_for

    lost = LeaseLostError("state/positions.json", url="s3://b/p", epoch=3, reason="another writer took the lease")
    assert exit_code_for(lost) == 5 and lost.epoch == 3 and "s3://b/p" in str(lost)
    down = ReplicaError("s3://b/p", "upload failed", key="snapshots/x")
    assert exit_code_for(down) == 1 and str(down).startswith("s3://b/p/snapshots/x: upload failed")
