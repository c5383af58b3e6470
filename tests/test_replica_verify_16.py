"""Issue 16.3 (session 11): `replica verify` never reports all ok a snapshot's chain that `replica restore` refuses.

The restore refuses a journal range of the chain's own writer inside the chain whose bytes differ from the chain's
(another history renamed under that writer's name) and a range past a gap that starts inside the chain; verify
runs the same checks (one function in restore.py) and names the object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from replica_util import client, options, pos, rcfg, restore_into, two_histories

from posstate import PositionStateManager, PosStateError
from posstate.replica import names as _names
from posstate.replica.client import ReplicaClient
from posstate.replica.restore import choose
from posstate.replica.verify import verify


def _ranges(c: ReplicaClient) -> list[_names.Range]:
    return _names.split(o.key for o in c.list())[1]


def _rename_later(c: ReplicaClient, cut: int) -> _names.Range:
    """The newer session's range after the one at *cut*, renamed (same bytes) under the older session's name;
    both of the newer session's names deleted. Returns the renamed range."""
    old, new = sorted((r for r in _ranges(c) if r.start == cut), key=lambda r: r.writer)
    later = next(r for r in _ranges(c) if r.start == new.end and r.writer == new.writer)
    renamed = dataclasses.replace(later, session=old.session)
    c.put(renamed.key, c.get(later.key))
    c.delete([new.key, later.key])
    return renamed


def _renamed_inside(tmp_path: Path, key: bytes) -> tuple[str, _names.Range]:
    url = f"file://{tmp_path}/rep"
    cut, _ = two_histories(
        rcfg(tmp_path / "a", url, replica_batch_bytes=1), key, [f"LOST{i}/USDT" for i in range(3)], ["B/USDT", "C/USDT"]
    )
    return url, _rename_later(client(url), cut)


def _renamed_across(tmp_path: Path, key: bytes) -> tuple[str, _names.Range]:
    url = f"file://{tmp_path}/rep"
    cfg = rcfg(tmp_path / "a", url, replica_batch_bytes=1)
    cut, _ = two_histories(cfg, key, ["LOST" + "X" * 60 + "/USDT"], ["B/USDT", "C" * 100 + "/USDT"])
    return url, _rename_later(client(url), cut)


def _bad(rows: list[dict[str, Any]], key: str) -> list[str]:
    return [row["reason"] for row in rows if row["key"] == key and not row["ok"]]


def test_verify_flags_a_range_renamed_under_the_chains_writer(tmp_path: Path, key: bytes) -> None:
    """issue 16.3 (session 11): a newer session's range renamed under the chain's writer, inside the chain, with
    other bytes than the chain there: verify names it not ok (restore refuses it), not "ok, not used"."""
    url, renamed = _renamed_inside(tmp_path, key)
    with pytest.raises(PosStateError, match="other bytes"):
        restore_into(tmp_path / "b", url, None, key)
    rows = verify(client(url), options=options(key))
    reasons = _bad(rows, renamed.key)
    assert reasons and "other bytes" in reasons[0] and "restore" in reasons[0], rows
    snap = next(row for row in rows if row["key"].startswith("snapshots/") and not row["ok"])
    assert renamed.key in snap["reason"] and "--at" in snap["reason"]


def test_verify_flags_a_range_across_the_chains_end(tmp_path: Path, key: bytes) -> None:
    """issue 16.3 (session 11): a renamed range starting inside the chain's last range and ending past it: verify
    names that range not ok (and the snapshot whose chain restore refuses), as the restore refuses."""
    url, renamed = _renamed_across(tmp_path, key)
    with pytest.raises(PosStateError, match="missing"):
        restore_into(tmp_path / "b", url, None, key)
    rows = verify(client(url), options=options(key))
    reasons = _bad(rows, renamed.key)
    assert reasons and "missing" in reasons[0], rows
    assert any(not row["ok"] and row["key"].startswith("snapshots/") and "missing" in row["reason"] for row in rows)


def _one_history(tmp_path: Path, key: bytes) -> str:
    """Snapshot 1 (A), snapshot 3 and its journal of three ranges (B, C, D), one range per record."""
    url = f"file://{tmp_path}/rep"
    with PositionStateManager(rcfg(tmp_path / "a", url, replica_batch_bytes=1), key=key) as m:
        m.set_position(pos("A/USDT"))
        assert m.flush_replica(30)
        m.save()
        for symbol in ("B/USDT", "C/USDT", "D/USDT"):
            m.set_position(pos(symbol))
            assert m.flush_replica(30)
    return url


def _newest(c: ReplicaClient) -> list[_names.Range]:
    """The ranges of the newest snapshot's journal, by offset."""
    ranges = _ranges(c)
    top = max(r.base_generation for r in ranges)
    return sorted((r for r in ranges if r.base_generation == top), key=lambda r: r.start)


def _flip(c: ReplicaClient, obj: str) -> None:
    data = bytearray(c.get(obj))
    data[len(data) // 2] ^= 1
    c.put(obj, bytes(data))


def _newest_snapshot(c: ReplicaClient) -> str:
    return _names.split(o.key for o in c.list())[0][-1].key


def _two(tmp_path: Path, key: bytes) -> str:
    url = f"file://{tmp_path}/rep"
    two_histories(rcfg(tmp_path / "a", url, replica_batch_bytes=1), key, ["L1/USDT", "L2/USDT"], ["B/USDT", "C/USDT"])
    return url


def _rewrote(c: ReplicaClient) -> _names.Range:
    """The newer session's first range: at the lowest offset two writers shipped."""
    ranges = _ranges(c)
    cut = min(r.start for r in ranges if any(o.start == r.start and o.writer != r.writer for o in ranges))
    return max((r for r in ranges if r.start == cut), key=lambda r: r.writer)


DAMAGES: dict[str, tuple[Callable[[Path, bytes], str], Callable[[ReplicaClient], None]]] = {
    "none": (_one_history, lambda c: None),
    "snapshot-byte-changed": (_one_history, lambda c: _flip(c, _newest_snapshot(c))),
    "chain-range-byte-changed": (_one_history, lambda c: _flip(c, _newest(c)[1].key)),
    "chain-range-deleted": (_one_history, lambda c: c.delete([_newest(c)[1].key])),
    "last-range-deleted": (_one_history, lambda c: c.delete([_newest(c)[-1].key])),
    "newest-snapshot-deleted": (_one_history, lambda c: c.delete([_newest_snapshot(c)])),
    "older-journal-byte-changed": (_one_history, lambda c: _flip(c, min(_ranges(c), key=lambda r: r.base_generation).key)),
    "unknown-object": (_one_history, lambda c: c.put("notes.txt", b"hello")),
    "two-histories": (_two, lambda c: None),
    "two-histories-newer-first-deleted": (_two, lambda c: c.delete([_rewrote(c).key])),
    "two-histories-renamed-inside": (lambda p, k: _renamed_inside(p, k)[0], lambda c: None),
    "two-histories-renamed-across": (lambda p, k: _renamed_across(p, k)[0], lambda c: None),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_verify_and_restore_agree_on_a_damaged_replica(tmp_path: Path, key: bytes, damage: str) -> None:
    """issue 16.3 (session 11): for each damage, `replica restore` (no --at) refuses <=> verify has a not-ok row
    for the snapshot it picks or a journal range of its generation or later (its chain, segment, orphans)."""
    build, hurt = DAMAGES[damage]
    url = build(tmp_path, key)
    c = client(url)
    hurt(c)
    try:
        restore_into(tmp_path / "b", url, None, key)
        refused = False
    except PosStateError:
        refused = True
    snaps, ranges, _ = _names.split(o.key for o in c.list())
    picked = choose(c, snaps, at_generation=None, at_time=None)
    mine = {picked.key} | {r.key for r in ranges if r.base_generation >= picked.generation}
    rows = verify(c, options=options(key))
    flagged = [row for row in rows if not row["ok"] and row["key"] in mine]
    assert refused == bool(flagged), (refused, rows)


def test_cli_replica_verify_exits_1_on_a_renamed_range(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 16.3 (session 11): `posstate replica verify` on a replica restore refuses exits 1 (docs/CLI.md),
    names the renamed range BAD, and prints no traceback; under --json one document with ok false."""
    import json

    from test_cli import run

    url, renamed = _renamed_inside(tmp_path, key)
    r = run(["replica", "verify", url, "--key-file", str(key_file)])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    assert any(line.startswith("BAD ") and renamed.key in line for line in r.output.splitlines()), r.output
    j = run(["replica", "verify", url, "--key-file", str(key_file), "--json"])
    assert j.exit_code == 1, j.output
    doc = json.loads(j.output)
    assert doc["ok"] is False and any(o["key"] == renamed.key and not o["ok"] for o in doc["objects"])


def test_cli_replica_verify_counts_objects_not_rows(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 16.3 (session 11 attack): a refused snapshot has an ok row (it decrypts) and a BAD one (its
    chain); the summary line counts the replica's objects and the bad ones, once each, not the rows."""
    from test_cli import run

    url, _ = _renamed_inside(tmp_path, key)
    rows = verify(client(url), options=options(key))
    listed = {o.key for o in client(url).list()}
    bad = {row["key"] for row in rows if not row["ok"]}
    assert len(rows) > len(listed)  # the case: more rows than objects
    r = run(["replica", "verify", url, "--key-file", str(key_file)])
    assert r.output.splitlines()[-1] == f"{len(listed)} objects, {len(bad & listed)} bad", r.output
