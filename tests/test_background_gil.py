"""Issue 14.3: the background work hands the GIL back: the snapshot is serialized a slice of positions at a
time (the same bytes), and a timed backup of a snapshot this manager wrote is a checked byte copy, never
decrypted and parsed again in one O(state) call."""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import PositionStateManager, PosStateError, StateConfig
from posstate.backup import ops as _backup_ops
from posstate.backup import snapcopy as _snapcopy
from posstate.backup.verified import VerifiedCache
from posstate.manager import compaction as _compaction
from posstate.model.document import build_document, dumps, dumps_in_slices, position_entry
from posstate.model.position import Position
from posstate.model.state import StateData
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

KEY = bytes(range(32))


def pos(i: int, contracts: int = 1) -> Position:
    return Position(symbol=f"S{i:05d}", side="long", contracts=Decimal(contracts), entry_price=Decimal("10.5"))


def state_of(n: int, *, extras: bool) -> StateData:
    st = StateData(generation=9, written_at="2026-01-01T00:00:00.000Z", writer={"host": "h", "pid": 1, "version": "v"})
    for i in range(n):
        p = pos(i, i + 1)
        st.positions[p.key] = p
        st.position_revs[p.key] = i
    if extras:
        st.account = {"exchange": "x", "account_id": "1", "mode": "live"}
        st.metadata = {"S00000": {"tick": "0.1"}}
        st.metadata_revs = {"S00000": 3}
        st.position_tombstones = {("GONE", "short"): 2}
        st.metadata_tombstones = {"OLD": 1}
        st.journal = {"id": "ab" * 16, "seq": 4}
    return st


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1500])
@pytest.mark.parametrize("extras", [False, True])
def test_dumps_in_slices_writes_the_same_bytes(n: int, extras: bool) -> None:
    """issue 14.3: the sliced serialization is byte for byte the document dumps(build_document()) writes,
    with and without some entries given, and pauses between slices."""
    st = state_of(n, extras=extras)
    pauses: list[int] = []
    some = {k: (p, position_entry(p, st.position_revs[k])) for k, p in list(st.positions.items())[::3]}
    for entries in (None, some):
        want = dumps(build_document(st, dict(entries) if entries is not None else None))
        assert dumps_in_slices(st, entries, pause=lambda: pauses.append(1)) == want
    assert len(pauses) == 2 * -(-n // 64)


def test_background_compaction_serializes_in_slices_on_its_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14.3: a background compaction of 1,500 positions hands the GIL back between slices, on the
    compaction thread, and the snapshot it writes loads back whole."""
    threads: list[str] = []
    monkeypatch.setattr(_compaction, "_pause", lambda: threads.append(threading.current_thread().name))
    cfg = StateConfig.in_dir(tmp_path, backup_interval=1e9, journal_max_records=3, compaction="thread")
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos(i) for i in range(1500)])
        for i in range(4):
            m.set_position(pos(i, 7))
        assert m.compact(wait=True)
        want = m.get_positions()
    assert len(threads) >= 3 and all(t.startswith("posstate-compact") for t in threads)
    with PositionStateManager(cfg, key=KEY) as m:
        assert m.load_positions() == want


def _count_parses(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    seen: list[Path] = []
    real = _statefile.parse

    def parse(data: bytes, **kw: Any) -> Any:
        seen.append(kw["path"])
        return real(data, **kw)

    monkeypatch.setattr(_snapcopy._statefile, "parse", parse)
    return seen


def test_timed_backup_of_a_snapshot_this_manager_wrote_is_not_decrypted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.3: the state file this manager encoded (its SHA-256 trailer is the one it wrote) is copied
    without a decrypt and parse; the copy is byte-identical."""
    parses = _count_parses(monkeypatch)
    cfg = StateConfig.in_dir(tmp_path, backup_interval=0.0, durability="snapshot")
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos(i) for i in range(10)])
        m._files.last_backup_at = float("-inf")
        _backup_ops.after_save(m._files, m._state)
        assert m.wait_for_backups(30)
        newest = max(m.list_backups(), key=lambda b: b.created_at)
        assert newest.path.read_bytes() == m.path.read_bytes()
    assert parses == []


def test_a_state_file_not_written_by_this_manager_is_verified_in_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14.3: a state file whose checksum the owner does not know (another writer's bytes) is
    decrypted and validated before it becomes a backup; a damaged one never does."""
    parses = _count_parses(monkeypatch)
    cfg = StateConfig.in_dir(tmp_path, backup_interval=1e9, durability="snapshot")
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos(i) for i in range(10)])
        options = m._read
    info = _snapcopy.copy_state_file(
        cfg.state_path,
        cfg.backup_path,
        options=options,
        cache=VerifiedCache(),
        check_account=lambda st: None,
        known=lambda checksum: False,
    )
    assert parses == [cfg.state_path] and info.valid
    data = bytearray(cfg.state_path.read_bytes())
    data[len(data) // 2] ^= 1
    cfg.state_path.write_bytes(bytes(data))
    before = sorted(p.name for p in cfg.backup_path.iterdir())
    with pytest.raises(PosStateError):
        _snapcopy.copy_state_file(
            cfg.state_path,
            cfg.backup_path,
            options=options,
            cache=VerifiedCache(),
            check_account=lambda st: None,
            known=lambda checksum: True,  # even a claim of "known" never passes bytes whose trailer fails
        )
    assert sorted(p.name for p in cfg.backup_path.iterdir()) == before


def test_view_copied_in_slices_while_writers_change_it_is_the_state_at_the_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.3: the view of 6,000 positions is copied a slice at a time while changes, deletes and new
    keys land between slices; the snapshot holds exactly the state at the rotation, and nothing is lost."""
    cfg = StateConfig.in_dir(tmp_path, backup_interval=1e9, journal_max_records=3, compaction="thread")
    m = PositionStateManager(cfg, key=KEY)
    m.save_positions([pos(i) for i in range(6000)])
    for i in range(3):
        m.set_position(pos(i, 50))
    at_rotation = dict(m.get_positions())  # the next change rotates: it is the first record after the snapshot
    calls = {"n": 0}
    real_pause = _compaction._pause

    def pause() -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # between the first and second slice of the positions' copy
            m.set_position(pos(10, 99))  # a key of a slice not copied yet
            m.set_position(pos(1, 98))  # a key of the slice already copied
            m.delete_position("S05000", "long")
            m.set_position(pos(7000, 1))  # a new key
        real_pause()

    monkeypatch.setattr(_compaction, "_pause", pause)
    m.set_position(pos(5999, 60))  # passes the threshold: rotates; the background copies the view
    assert m.compact(wait=True)
    want = dict(m.get_positions())
    m.close()
    loaded = _statefile.read(cfg.state_path, options=_statefile.ReadOptions(keyring=Keyring(key=KEY)))
    assert calls["n"] > 1
    assert loaded.state.positions == at_rotation
    with PositionStateManager(cfg, key=KEY) as m2:
        assert m2.load_positions() == want
    assert want[pos(10).key].contracts == 99 and pos(5000).key not in want and pos(7000).key in want
