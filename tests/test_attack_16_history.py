"""Issue 16 attack (session 10): a newer session rewrote the journal from an offset an older session had shipped
past; deleting the newer session's first range there must not make a restore follow the older history."""

from __future__ import annotations

from pathlib import Path

import pytest
from replica_util import client, held, options, pos, rcfg, restore_into, two_histories

from posstate import CorruptStateError, PositionStateManager, StateConfig
from posstate.replica import names as _names
from posstate.replica.verify import verify


def test_a_deleted_range_of_a_newer_session_never_restores_the_older_sessions_history(tmp_path: Path, key: bytes) -> None:
    """issue 16.3 attack: the newer session's range at the offset it rewrote deleted, its later range listed (and
    ending before the older history's end): the restore refuses or gives the newer history, never the older one."""
    url = f"file://{tmp_path}/rep"
    cfg = rcfg(tmp_path / "a", url, replica_batch_bytes=1)
    cut, gen = two_histories(cfg, key, [f"LOST{i}/USDT" for i in range(3)], ["B/USDT", "C/USDT"])
    c = client(url)
    _, ranges, _ = _names.split(o.key for o in c.list())
    at_cut = sorted((r for r in ranges if r.start == cut), key=lambda r: r.writer)
    assert len(at_cut) == 2 and at_cut[0].writer < at_cut[1].writer
    c.delete([at_cut[1].key])  # the newer session's first record there; its next one stays listed
    with pytest.raises(CorruptStateError, match="missing"):
        restore_into(tmp_path / "b", url, None, key)
    assert not (tmp_path / "b" / "positions.json").exists()
    with pytest.raises(CorruptStateError, match="missing"):  # --at a generation of the older history past there
        restore_into(tmp_path / "c", url, None, key, at_generation=gen + 1)
    assert not (tmp_path / "c" / "positions.json").exists()
    restored, result = restore_into(tmp_path / "d", url, None, key, at_generation=gen - 1)  # the common prefix
    assert result.generation == gen - 1
    with PositionStateManager(StateConfig.in_dir(restored.state_dir), key=key) as r:
        assert set(held(r)) == {"A/USDT"}
    rows = verify(client(url), options=options(key))
    assert any(not row["ok"] and "rewrote" in row["reason"] for row in rows)


@pytest.mark.parametrize("at", ["\u00b2", "9" * 5000, "\u0663"])
def test_restore_at_a_number_python_cannot_read_is_a_usage_error(tmp_path: Path, key_file: Path, at: str) -> None:
    """issue 16.3 attack: `replica restore --at` with a digit int() refuses (a superscript) or a number past its
    4,300 digits is the documented usage error (exit 2), not `unexpected ValueError` (exit 1)."""
    from test_cli import run

    (tmp_path / "rep").mkdir()
    url = f"file://{tmp_path}/rep"
    r = run(["replica", "restore", url, "--at", at, "--state-dir", str(tmp_path / "s"), "--key-file", str(key_file)])
    assert r.exit_code == 2, r.output
    assert "unexpected" not in r.output and "--at" in r.output


def test_restore_at_generation_0_names_the_point_in_its_error(tmp_path: Path, key: bytes) -> None:
    """issue 16.3: `--at 0` with no snapshot that old says "at or before that point" (0 is a point, not none)."""
    from posstate import StateNotFoundError

    url = f"file://{tmp_path}/rep"
    with PositionStateManager(rcfg(tmp_path / "a", url), key=key) as m:
        m.set_position(pos("A/USDT"))
        m.save()
        assert m.flush_replica(30)
    with pytest.raises(StateNotFoundError, match="at or before that point"):
        restore_into(tmp_path / "b", url, None, key, at_generation=0)


def test_a_newer_sessions_range_renamed_to_the_older_session_never_restores_the_older_history(tmp_path: Path, key: bytes) -> None:
    """issue 16.3 attack: as above, and the newer session's later range renamed (same bytes) under the older
    session's name: a range of the chain's own writer whose bytes differ from the chain's there is another
    history; the restore refuses, with and without `--at`."""
    import dataclasses

    url = f"file://{tmp_path}/rep"
    cfg = rcfg(tmp_path / "a", url, replica_batch_bytes=1)
    cut, gen = two_histories(cfg, key, [f"LOST{i}/USDT" for i in range(3)], ["B/USDT", "C/USDT"])
    c = client(url)
    _, ranges, _ = _names.split(o.key for o in c.list())
    old, new = sorted((r for r in ranges if r.start == cut), key=lambda r: r.writer)
    later = next(r for r in ranges if r.start == new.end and r.writer == new.writer)
    c.put(dataclasses.replace(later, session=old.session).key, c.get(later.key))
    c.delete([new.key, later.key])
    with pytest.raises(CorruptStateError, match=r"missing|other bytes|another history"):
        restore_into(tmp_path / "b", url, None, key)
    with pytest.raises(CorruptStateError, match=r"missing|other bytes|another history"):
        restore_into(tmp_path / "c", url, None, key, at_generation=gen)
    assert not (tmp_path / "b" / "positions.json").exists() and not (tmp_path / "c" / "positions.json").exists()


def test_a_renamed_range_across_the_chains_end_never_lets_at_restore_the_older_record(tmp_path: Path, key: bytes) -> None:
    """issue 16.3 attack: the newer session's range that starts inside the chain's last range and ends past it,
    renamed under the chain's own writer (its bytes cannot be compared there): `--at` the generation of the
    chain's last record refuses instead of restoring the record the newer session replaced."""
    import dataclasses

    url = f"file://{tmp_path}/rep"
    cfg = rcfg(tmp_path / "a", url, replica_batch_bytes=1)
    cut, gen = two_histories(cfg, key, ["LOST" + "X" * 60 + "/USDT"], ["B/USDT", "C" * 100 + "/USDT"])
    c = client(url)
    _, ranges, _ = _names.split(o.key for o in c.list())
    old, new = sorted((r for r in ranges if r.start == cut), key=lambda r: r.writer)
    later = next(r for r in ranges if r.start == new.end and r.writer == new.writer)
    assert new.end < old.end < later.end
    c.put(dataclasses.replace(later, session=old.session).key, c.get(later.key))
    c.delete([new.key, later.key])
    with pytest.raises(CorruptStateError, match="missing"):
        restore_into(tmp_path / "b", url, None, key)
    with pytest.raises(CorruptStateError, match="missing"):
        restore_into(tmp_path / "c", url, None, key, at_generation=gen)
    assert not (tmp_path / "c" / "positions.json").exists()
