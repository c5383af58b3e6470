"""PositionStateManager: the public API, round trips, events, concurrency guards, secrecy."""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posstate import (
    ConcurrentModificationError,
    CorruptStateError,
    ManagerClosedError,
    OutcomeUnknownError,
    PersistenceError,
    Position,
    PositionStateManager,
    SchemaValidationError,
    StateConfig,
    UnrecoverableStateError,
    WrongKeyError,
    generate_key,
)
from posstate.storage import fileops as _fileops

Factory = Callable[..., PositionStateManager]


def pos(symbol: str = "BTC/USDT", side: str = "long", contracts: str = "1", price: str = "100", **kw: Any) -> Position:
    return Position(symbol=symbol, side=side, contracts=Decimal(contracts), entry_price=Decimal(price), **kw)  # type: ignore[arg-type]


def full_position(symbol: str = "ETH/USDT:USDT", side: str = "short") -> Position:
    return Position(
        symbol=symbol,
        side=side,
        contracts=Decimal("12.5"),
        contract_size=Decimal("0.01"),
        entry_price=Decimal("2050.55"),  # type: ignore[arg-type]
        mark_price=Decimal("2049.1"),
        notional=Decimal("256.1375"),
        leverage=Decimal(20),
        unrealized_pnl=Decimal("0.18125"),
        realized_pnl=Decimal("-1.2"),
        liquidation_price=Decimal("2150"),
        margin_mode="isolated",
        stop_loss_price=Decimal("2100"),
        take_profit_price=Decimal("1900.5"),
        timestamp=1_700_000_000_000,
    )


def test_fresh_start_is_empty_and_creates_private_dir(manager: Factory, cfg: StateConfig) -> None:
    """No file, no .bak, no backups: an empty state; the state dir is created 0700."""
    m = manager()
    assert m.load_positions() == {} and m.generation == 0
    assert stat.S_IMODE(os.stat(cfg.state_dir).st_mode) == 0o700


def test_save_and_load_positions_round_trip(manager: Factory, cfg: StateConfig) -> None:
    """save_positions writes every field; a new manager loads equal Positions; file is 0600."""
    m = manager()
    a, b = pos(), full_position()
    assert m.save_positions([a, b]) == 1
    assert stat.S_IMODE(os.stat(cfg.state_path).st_mode) == 0o600
    m.close()
    loaded = manager().load_positions()
    assert loaded == {a.key: a, b.key: b}


def test_save_positions_accepts_mapping_and_replaces_all(manager: Factory) -> None:
    """A mapping is accepted; positions not given are removed; metadata is kept."""
    m = manager()
    m.save_positions([pos("A"), pos("B")])
    m.set_symbol_metadata("A", {"strategy": "x"})
    m.save_positions({"whatever": pos("C")})
    assert set(m.load_positions()) == {("C", "long")}
    assert m.get_symbol_metadata("A") == {"strategy": "x"}


def test_set_get_delete_position_and_save(manager: Factory) -> None:
    """set/get/delete change memory; save() makes it durable and returns the new generation."""
    m = manager()
    m.set_position(pos("A"))
    assert m.get_position("A", "long") == pos("A") and m.dirty
    before = m.generation  # sync mode: a fresh state's first change wrote a base snapshot
    first = m.save()
    assert first == before + 1 == m.generation and not m.dirty
    assert m.delete_position("A", "long") is True
    assert m.delete_position("A", "long") is False
    assert m.get_position("A", "long") is None
    changed = m.generation  # the journaled delete moved it on (issue 12.10)
    assert changed > first
    second = m.save()
    assert second == changed + 1 == m.generation and not m.dirty
    m.close()
    again = manager()
    assert again.load_positions() == {} and again.generation == second


def test_set_position_requires_position(manager: Factory) -> None:
    """set_position refuses a dict; save_positions refuses duplicates."""
    m = manager()
    with pytest.raises(SchemaValidationError):
        m.set_position({"symbol": "A"})  # type: ignore[arg-type]
    with pytest.raises(SchemaValidationError, match="two positions"):
        m.save_positions([pos("A"), pos("A", contracts="2")])


def test_hedge_mode_long_and_short(manager: Factory) -> None:
    """A long and a short of one symbol are two positions."""
    m = manager()
    m.save_positions([pos("BTC/USDT", "long"), pos("BTC/USDT", "short", contracts="3")])
    m.close()
    m2 = manager()
    assert m2.get_position("BTC/USDT", "short") == pos("BTC/USDT", "short", contracts="3")
    assert m2.get_position("BTC/USDT", "long") == pos("BTC/USDT", "long")


def test_metadata_outlives_position(manager: Factory) -> None:
    """Closing (deleting) a position keeps its symbol's metadata, across save and reload."""
    m = manager()
    m.set_position(pos("SOL/USDT"))
    meta = {
        "entries": {"long": 2, "short": 0},
        "trailing": {"active": True, "peak": "101.5"},
        "first_open": 1700000000000,
        "strategy": "s1",
    }
    m.set_symbol_metadata("SOL/USDT", meta)
    m.save()
    m.delete_position("SOL/USDT", "long")
    m.save()
    m.close()
    m2 = manager()
    assert m2.load_positions() == {}
    assert m2.get_symbol_metadata("SOL/USDT") == meta
    assert m2.get_all_symbol_metadata() == {"SOL/USDT": meta}
    assert m2.delete_symbol_metadata("SOL/USDT") is True and m2.delete_symbol_metadata("SOL/USDT") is False
    m2.save()
    m2.close()
    assert manager().get_symbol_metadata("SOL/USDT") is None


def test_metadata_is_copied(manager: Factory) -> None:
    """The caller's dict is copied on set and on get: later edits do not leak in."""
    m = manager()
    d = {"a": [1]}
    m.set_symbol_metadata("X", d)
    d["a"].append(2)
    got = m.get_symbol_metadata("X")
    assert got == {"a": [1]}
    assert got is not None
    got["a"].append(3)
    assert m.get_symbol_metadata("X") == {"a": [1]}


def test_tiny_decimal_keeps_digits(manager: Factory) -> None:
    """Decimal('0.00000001') comes back equal and with the same digits and exponent."""
    m = manager()
    m.save_positions([pos("A", contracts="0.00000001", price="0.10")])
    m.close()
    p = manager().get_position("A", "long")
    assert p is not None
    assert p.contracts == Decimal("0.00000001") and p.contracts.as_tuple() == Decimal("0.00000001").as_tuple()
    assert str(p.entry_price) == "0.10"


def test_ccxt_float_round_trip(manager: Factory) -> None:
    """A float from ccxt is stored as the Decimal of its shortest repr and loads as exactly that."""
    m = manager()
    p = Position.from_ccxt({"symbol": "X", "side": "long", "contracts": 0.1, "entryPrice": 0.3, "markPrice": 1e-7, "info": {}})
    m.save_positions([p])
    m.close()
    q = manager().get_position("X", "long")
    assert q is not None and (str(q.contracts), str(q.entry_price), q.mark_price) == ("0.1", "0.3", Decimal("1e-7"))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.decimals(allow_nan=False, allow_infinity=False).filter(lambda d: len(str(d)) <= 64), min_size=1, max_size=20))
def test_decimals_round_trip_through_file(values: list[Decimal]) -> None:
    """Any Decimals saved through the manager load back with identical sign, digits and exponent."""
    key = generate_key()
    with tempfile.TemporaryDirectory() as d:
        cfg = StateConfig.in_dir(Path(d) / "state")
        ps = [
            Position(symbol=f"S{i}", side="long", contracts=abs(v), entry_price=v, realized_pnl=v) for i, v in enumerate(values)
        ]
        with PositionStateManager(cfg, key=key) as m:
            m.save_positions(ps)
        with PositionStateManager(cfg, key=key) as m:
            loaded = m.load_positions()
        for p in ps:
            q = loaded[p.key]
            assert q.entry_price.as_tuple() == p.entry_price.as_tuple()
            assert q.contracts.as_tuple() == p.contracts.as_tuple()


def test_missing_file_with_bak_is_not_a_fresh_start(manager: Factory, cfg: StateConfig) -> None:
    """State file gone while positions.json.bak exists: recovered from the .bak, never started empty. (Snapshot
    mode: in the journal modes a clean close backs up the last save, issue 15.2, and recovery takes that.)"""
    m = manager(cfg.replace(backup_interval=1e9, durability="snapshot"))
    m.save_positions([pos("A")])
    assert m.wait_for_backups(30)  # the first timed backup holds generation 1, not a later save (a race under load)
    m.save_positions([pos("B")])
    m.close()
    assert cfg.bak_path.exists()
    os.unlink(cfg.state_path)
    m2 = manager()
    assert set(m2.load_positions()) == {("A", "long")}  # the .bak holds generation 1
    # .bak and the first timestamped backup both hold generation 1; either is a correct source.
    assert m2.last_recovery is not None and m2.last_recovery.generation == 1
    assert "missing" in m2.last_recovery.reason


def test_missing_file_with_backups_is_not_a_fresh_start(manager: Factory, cfg: StateConfig) -> None:
    """A timestamped backup in backups/ also means the state was lost, not never written."""
    cfg.backup_path.mkdir(parents=True)
    (cfg.backup_path / "positions_20240101T000000Z.json").write_bytes(b"x")
    with pytest.raises(CorruptStateError, match="missing"):
        manager().load_positions()


def test_bak_holds_previous_generation(manager: Factory, cfg: StateConfig, key: bytes) -> None:
    """After two saves, .bak is the first file byte for byte."""
    m = manager()
    m.save_positions([pos("A")])
    first = cfg.state_path.read_bytes()
    m.save_positions([pos("B")])
    assert cfg.bak_path.read_bytes() == first


def test_concurrent_replace_is_detected(manager: Factory, cfg: StateConfig, key: bytes, tmp_path: Path) -> None:
    """Someone replaces the file bypassing the lock: the next save raises and leaves their file alone."""
    m = manager()
    m.save_positions([pos("A")])
    other_cfg = StateConfig.in_dir(tmp_path / "other")
    with PositionStateManager(other_cfg, key=key) as other:
        other.save_positions([pos("INTRUDER")])
        other.save_positions([pos("INTRUDER", contracts="2")])
    os.replace(other_cfg.state_path, cfg.state_path)
    theirs = cfg.state_path.read_bytes()
    with pytest.raises(ConcurrentModificationError) as info:
        m.save_positions([pos("B")])
    assert (info.value.expected, info.value.found) == (1, 2)
    assert cfg.state_path.read_bytes() == theirs
    assert m.get_position("A", "long") is not None and m.get_position("B", "long") is None


def test_deleted_file_is_detected(manager: Factory, cfg: StateConfig) -> None:
    """The state file deleted behind our back: the save refuses instead of writing from memory silently."""
    m = manager()
    m.save_positions([pos("A")])
    os.unlink(cfg.state_path)
    with pytest.raises(ConcurrentModificationError, match="disappeared"):
        m.save()


class _FailFsync(_fileops.FileOps):
    def fsync(self, fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_save_changes_nothing(manager: Factory, cfg: StateConfig) -> None:
    """ENOSPC at fsync: PersistenceError, the file and the in-memory state are unchanged, no temp left; next save works."""
    m = manager()
    m.save_positions([pos("A")])
    m.set_symbol_metadata("A", {"n": 1})
    saved = m.save()
    assert m.wait_for_backups(30)  # the timed backup and its prune (which writes the verdict file) finished
    before = cfg.state_path.read_bytes()
    events: list[dict[str, Any]] = []
    m.on("persistenceError", events.append)
    with _fileops.use(_FailFsync()), pytest.raises(PersistenceError) as info:
        m.save_positions([pos("B")])
    assert info.value.errno == errno.ENOSPC and info.value.operation == "fsync" and isinstance(info.value, OSError)
    assert cfg.state_path.read_bytes() == before
    assert set(m.get_positions()) == {("A", "long")} and m.generation == saved
    listing = ["backups", "positions.json", "positions.json.bak", "positions.json.journal", "positions.json.lock"]
    listing.append("positions.json.verdicts")
    assert sorted(os.listdir(cfg.state_dir)) == listing  # the journal of the sync-mode metadata change; no temp
    assert events and events[0]["operation"] == "fsync"
    assert m.save_positions([pos("B")]) > saved + 1  # a failed attempt's generation is never reused
    m.close()
    assert set(manager().load_positions()) == {("B", "long")}


class _Stats:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def log_stats(self, stats: dict[str, Any]) -> None:
        self.calls.append(stats)


def test_events_and_stats_logger(manager: Factory, key: bytes) -> None:
    """stateLoaded/stateSaved carry path, generation, counts; stats_logger gets STATE_MANAGEMENT records."""
    stats = _Stats()
    m = manager(stats_logger=stats)
    got: list[dict[str, Any]] = []
    m.on("stateSaved", got.append)
    m.on("stateLoaded", got.append)
    m.save_positions([pos("A"), pos("B")])
    assert m.wait_for_backups(30)  # the timed backup runs in the background (issue 14.2)
    assert [e["event"] for e in got] == ["stateLoaded", "stateSaved"]
    saved = got[1]
    assert saved["generation"] == 1 and saved["positions"] == 2 and saved["path"] == str(m.path) and saved["bytes"] > 0
    # The first save also makes the first timestamped backup (backup_interval has passed: there is none).
    assert [c["event"] for c in stats.calls] == ["stateLoaded", "stateSaved", "backupCreated"]
    assert all(c["type"] == "STATE_MANAGEMENT" and isinstance(c["timestamp"], int) for c in stats.calls)
    m.off("stateSaved", got.append)
    m.save()
    assert len(got) == 2
    with pytest.raises(ValueError, match="unknown event"):
        m.on("stateExploded", got.append)


def test_raising_handler_never_breaks_a_save(manager: Factory, caplog: pytest.LogCaptureFixture) -> None:
    """A handler that raises: the save succeeds, the failure is logged and reported as 'error'."""
    m = manager()
    errors: list[dict[str, Any]] = []

    def boom(_: dict[str, Any]) -> None:
        raise RuntimeError("handler bug")

    m.on("stateSaved", boom)
    m.on("error", errors.append)
    m.on("error", boom)  # an error handler that raises is only logged
    assert m.save_positions([pos("A")]) == 1
    assert errors and errors[0]["context"] == "handler:stateSaved" and "handler bug" in errors[0]["error"]
    assert any("handler for stateSaved raised" in r.getMessage() for r in caplog.records)
    assert all(r.name == "posstate" for r in caplog.records)


def test_raising_stats_logger_never_breaks_a_save(manager: Factory) -> None:
    """A stats_logger that raises does not break the save."""

    class Bad:
        def log_stats(self, stats: dict[str, Any]) -> None:
            raise ValueError("no")

    m = manager(stats_logger=Bad())
    assert m.save_positions([pos("A")]) == 1


def test_async_methods(manager: Factory) -> None:
    """asave_positions / asave / aload_positions work from asyncio and do not block the loop."""
    m = manager()

    async def main() -> tuple[int, int, dict[Any, Position], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        g1 = await m.asave_positions([pos("A")])
        m.set_position(pos("B"))
        g2 = await m.asave()
        loaded = await m.aload_positions()
        stop.set()
        await t
        return g1, g2, loaded, ticks

    g1, g2, loaded, ticks = asyncio.run(main())
    assert (g1, g2) == (1, 3) and set(loaded) == {("A", "long"), ("B", "long")}
    assert ticks > 0


def test_context_manager_closes(manager: Factory, cfg: StateConfig, key: bytes) -> None:
    """Leaving the with block releases the lock; a closed manager refuses work."""
    with manager() as m:
        m.save_positions([pos("A")])
    assert m.closed
    with pytest.raises(ManagerClosedError):
        m.load_positions()
    with pytest.raises(ManagerClosedError):
        m.save()
    m.close()  # idempotent
    with PositionStateManager(cfg, key=key) as again:
        assert set(again.load_positions()) == {("A", "long")}


def test_thread_safety_smoke(manager: Factory) -> None:
    """Four threads setting positions and saving at once: no error, every position saved, generations distinct."""
    m = manager()
    gens: list[int] = []
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(10):
                m.set_position(pos(f"T{t}-{i}"))
                m.set_symbol_metadata(f"T{t}", {"i": i})
                if i % 3 == 0:
                    gens.append(m.save())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    m.save()
    assert len(set(gens)) == len(gens)
    m.close()
    m2 = manager()
    assert len(m2.load_positions()) == 40 and m2.get_symbol_metadata("T3") == {"i": 9}


def test_key_never_shown(manager: Factory, key: bytes, cfg: StateConfig, tmp_path: Path) -> None:
    """repr/str of the manager, event payloads, stats records and errors never contain the key."""
    stats = _Stats()
    m = manager(stats_logger=stats)
    seen: list[str] = []
    for name in ("stateSaved", "stateLoaded", "persistenceError", "error"):
        m.on(name, lambda e: seen.append(repr(e)))
    m.save_positions([pos("A")])
    texts = [repr(m), str(m), *seen, *(repr(c) for c in stats.calls)]
    m.close()
    with pytest.raises(Exception) as info:
        PositionStateManager(cfg, key=generate_key()).load_positions()
    texts += [str(info.value), repr(info.value)]
    forms = [key.hex(), base64.b64encode(key).decode(), repr(key)[2:-1], key.hex().upper()]
    for text in texts:
        for form in forms:
            assert form not in text
    assert "key_id=" in repr(m)


def test_validate_state_report(manager: Factory, cfg: StateConfig) -> None:
    """validate_state() on a good file: valid, every check passed; on a damaged file: invalid with a path."""
    m = manager()
    m.save_positions([pos("A")])
    validated: list[dict[str, Any]] = []
    m.on("stateValidated", validated.append)
    report = m.validate_state()
    assert report.valid and report.generation == 1 and report.positions == 1 and validated
    data = bytearray(cfg.state_path.read_bytes())
    data[200] ^= 1
    cfg.state_path.write_bytes(bytes(data))
    bad = m.validate_state()
    assert not bad.valid and bad.errors[0].path == "$"


def test_damaged_file_is_quarantined_on_save(manager: Factory, cfg: StateConfig) -> None:
    """If the file on disk is damaged when we save, it is moved to quarantine, not overwritten or deleted."""
    m = manager()
    m.save_positions([pos("A")])
    data = bytearray(cfg.state_path.read_bytes())
    data[-10] ^= 4
    cfg.state_path.write_bytes(bytes(data))
    m.save_positions([pos("B")])
    q = list(cfg.quarantine_dir.iterdir())
    assert len(q) == 1 and q[0].read_bytes() == bytes(data)
    assert set(m.load_positions()) == {("B", "long")}


def test_unencrypted_uncompressed_state(manager: Factory, cfg: StateConfig) -> None:
    """encryption=False and compression=False: no key needed, the file is readable JSON text."""
    plain = cfg.replace(encryption=False, compression=False)
    m = PositionStateManager(plain)
    try:
        m.save_positions([pos("A", contracts="0.5")])
        assert '"contracts":"0.5"' in plain.state_path.read_text()
    finally:
        m.close()


class _FailReadAfterRename(_fileops.FileOps):
    """EIO on any read of the state file once the rename has happened (the verify step)."""

    def __init__(self) -> None:
        self.renamed = False

    def replace(self, src: Any, dst: Any) -> None:
        super().replace(src, dst)
        if str(dst).endswith("positions.json"):
            self.renamed = True

    def read_file(self, path: Any, limit: int | None = None, max_size: int | None = _fileops.DEFAULT_MAX_READ_BYTES) -> bytes:
        if self.renamed and str(path).endswith("positions.json"):
            raise OSError(errno.EIO, "Input/output error")
        return super().read_file(path, limit, max_size)


def test_failed_verify_then_next_save_succeeds(manager: Factory, cfg: StateConfig) -> None:
    """EIO while re-reading the new file of a save of memory: PersistenceError; once the fault clears the
    next save succeeds (the file this manager itself renamed into place is not mistaken for another writer's)."""
    m = manager()
    m.save_positions([pos("A")])
    with _fileops.use(_FailReadAfterRename()), pytest.raises(PersistenceError) as info:
        m.save()
    assert info.value.errno == errno.EIO and not info.value.outcome_unknown
    assert set(m.get_positions()) == {("A", "long")}
    m.save_positions([pos("C")])
    m.close()
    assert set(manager().load_positions()) == {("C", "long")}


def test_failed_verify_of_a_change_is_outcome_unknown(manager: Factory, cfg: StateConfig) -> None:
    """issue 12.8: EIO re-reading the new file of save_positions([B]): B is in place while memory keeps A, so
    the error says the outcome is unknown, the manager refuses further changes, and the next load reports it."""
    m = manager()
    m.save_positions([pos("A")])
    with _fileops.use(_FailReadAfterRename()), pytest.raises(PersistenceError) as info:
        m.save_positions([pos("B")])
    assert info.value.errno == errno.EIO and info.value.outcome_unknown
    assert set(m.get_positions()) == {("A", "long")}
    with pytest.raises(OutcomeUnknownError):
        m.save_positions([pos("C")])
    m.close()
    m2 = manager()
    assert set(m2.load_positions()) == {("B", "long")}
    assert m2.last_recovery is not None
    assert [c["found_on_disk"] for c in m2.last_recovery.unknown_outcomes] == [True]


@pytest.mark.parametrize(("field", "value"), [("generation", 9), ("position_count", 5)])
def test_header_must_match_document(cfg: StateConfig, field: str, value: int) -> None:
    """A file whose header disagrees with its document (generation, position count) is refused on load."""
    from posstate.model import document as _document
    from posstate.model.document import StateData
    from posstate.storage import codec as _codec

    st_ = StateData(generation=1, written_at="2024-01-01T00:00:00.000Z", writer={"host": "h", "pid": 1, "version": "0"})
    st_.positions[("A", "long")] = pos("A")
    st_.position_revs[("A", "long")] = 1
    kw = {"generation": 1, "position_count": 1, field: value}
    enc = _codec.encode(
        _document.dumps(_document.build_document(st_)), written_at_ms=0, compression_level=None, keyring=None, **kw
    )
    plain = cfg.replace(encryption=False)
    plain.state_dir.mkdir(parents=True)
    plain.state_path.write_bytes(enc.data)
    with PositionStateManager(plain) as m, pytest.raises(UnrecoverableStateError) as info:
        m.load_positions()
    # Refused as invalid, and with no other copy to recover from, never loaded as an empty state.
    assert "header says" in str(info.value) and info.value.candidates[0][0] == "positions.json"


def test_encrypted_manager_refuses_a_plaintext_state_file(cfg: StateConfig, key: bytes) -> None:
    """With encryption on, a plaintext file (valid checksum, planted by anyone) is refused, not loaded or re-encrypted."""
    with PositionStateManager(cfg.replace(encryption=False)) as plain:
        plain.save_positions([pos("FAKE")])
    planted = cfg.state_path.read_bytes()
    with PositionStateManager(cfg, key=key) as m, pytest.raises(WrongKeyError, match="not encrypted"):
        m.load_positions()
    assert cfg.state_path.read_bytes() == planted  # nothing quarantined, nothing rewritten
    assert not cfg.quarantine_dir.exists()


class _FailFsyncDir(_fileops.FileOps):
    def fsync_dir(self, path: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")


def test_failure_after_the_rename_says_so_and_the_next_save_succeeds(manager: Factory, cfg: StateConfig) -> None:
    """fsync of the directory fails after the rename of a save of unsaved changes: the outcome is unknown (the
    new file may or may not survive a crash; issue 15 attack, was reported "failed, known"), the manager
    refuses further changes, and after a reopen the next save accepts the file on disk."""
    m = manager(cfg.replace(durability="snapshot"))
    m.save_positions([pos("A")])
    m.set_position(pos("B"))
    with _fileops.use(_FailFsyncDir()), pytest.raises(PersistenceError) as info:
        m.save()
    assert info.value.operation == "fsync_dir" and "may or may not survive a crash" in str(info.value)
    assert info.value.outcome_unknown
    with pytest.raises(OutcomeUnknownError):
        m.save_positions([pos("C")])
    m.close()
    m2 = manager(cfg.replace(durability="snapshot"))
    assert set(m2.load_positions()) == {("A", "long"), ("B", "long")}
    m2.save_positions([pos("C")])
    m2.close()
    assert set(manager().load_positions()) == {("C", "long")}


def test_snapshot_rename_then_failure_is_outcome_unknown(manager: Factory, cfg: StateConfig) -> None:
    """issue 12.8: snapshot mode, save_positions([B]) renamed into place, then the directory fsync (and the
    marker write) fail: outcome_unknown, memory keeps A, no further change, and a reopen in this process
    reports B as found on disk (the error says a restart would not)."""
    scfg = cfg.replace(durability="snapshot")
    m = manager(scfg)
    m.save_positions([pos("A")])
    events: list[dict[str, object]] = []
    with _fileops.use(_FailFsyncDir()), pytest.raises(PersistenceError) as info:
        m.save_positions([pos("B")])
    err = info.value
    assert err.outcome_unknown and "outcome is unknown" in str(err) and "after a restart it will not be reported" in str(err)
    assert "reopen the manager (a new PositionStateManager)" in str(err)
    assert set(m.get_positions()) == {("A", "long")}  # reads work and return memory: the old value
    for writer in (lambda: m.save(), lambda: m.set_position(pos("C")), lambda: m.batch_save_positions([pos("C")])):
        with pytest.raises(OutcomeUnknownError, match="reopen the manager"):
            writer()
    m.close()
    m2 = manager(scfg)
    m2.on("outcomeUnknown", events.append)
    assert set(m2.load_positions()) == {("B", "long")}
    report = m2.last_recovery
    assert report is not None and [(c["kind"], c["found_on_disk"]) for c in report.unknown_outcomes] == [("snapshot", True)]
    assert len(events) == 1 and events[0]["cleared"] is True
    m2.set_position(pos("C"))
    m2.save()
    m2.close()
    m3 = manager(scfg)
    assert set(m3.load_positions()) == {("B", "long"), ("C", "long")}
    assert m3.last_recovery is None  # reported once, then forgotten


def test_symlink_at_the_state_path_is_not_followed(manager: Factory, cfg: StateConfig, tmp_path: Path) -> None:
    """A symlink planted at positions.json is refused (ELOOP) with a message that says what it is."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    target = tmp_path / "elsewhere.json"
    target.write_bytes(b"{}")
    cfg.state_path.symlink_to(target)
    with pytest.raises(PersistenceError, match="symlink, which posstate never follows"):
        manager().load_positions()
    assert target.read_bytes() == b"{}"
