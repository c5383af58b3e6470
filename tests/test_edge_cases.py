"""Regressions found in review: recovery retries, nested transactions, bad input at the API boundary."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from posstate import ConfigError, CorruptStateError, Position, PositionStateManager, SchemaValidationError, StateConfig
from posstate.storage import fileops as fs

KEY = bytes(range(32))


def pos(symbol: str, contracts: str = "1") -> Position:
    return Position(symbol=symbol, side="long", contracts=contracts, entry_price="100")


def held(m: PositionStateManager) -> dict[str, str]:
    return {k[0]: str(p.contracts) for k, p in m.get_positions().items()}


class _FailFirstStateTemp(fs.FileOps):
    """ENOSPC on the first temp file of the state file (the first write of the recovered state)."""

    def __init__(self) -> None:
        self.hit = False

    def open(self, path: Any, flags: int, mode: int = 0o600) -> int:
        p = str(path)
        verdicts = "/.positions.json.verdicts." in p  # a background prune's verdict file, not the state
        if not self.hit and p.endswith(".tmp") and "/.positions.json." in p and not verdicts:
            self.hit = True
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().open(path, flags, mode)


@pytest.mark.parametrize("durability", ["sync", "snapshot"])
def test_a_failed_write_of_the_recovered_state_retries_the_same_copy(tmp_path: Path, durability: str) -> None:
    """The first write of the recovered state fails: the retry writes the copy chosen first (memory, newest),
    not an older one recomputed after the damaged file and the journal were set aside."""
    cfg = StateConfig.in_dir(tmp_path / "state", durability=durability, backup_interval=1e9)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos("A", "1")])
        m.save_positions([pos("A", "2")])
        m.set_position(pos("X", "9"))
        if durability == "snapshot":
            m.save()
        data = bytearray(cfg.state_path.read_bytes())
        data[250] ^= 4
        cfg.state_path.write_bytes(bytes(data))
        ops = _FailFirstStateTemp()
        with fs.use(ops):
            report = m.attempt_recovery()
        assert ops.hit and report is not None and report.attempts == 2 and report.source == "memory"
        assert held(m) == {"A": "2", "X": "9"}
    with PositionStateManager(cfg, key=KEY) as m2:
        assert held(m2) == {"A": "2", "X": "9"}


def test_a_failing_nested_transaction_discards_only_its_own_changes(tmp_path: Path) -> None:
    """An inner transaction that raises is undone on its own; the outer one commits the rest."""
    cfg = StateConfig.in_dir(tmp_path / "state")
    with PositionStateManager(cfg, key=KEY) as m:
        with m.transaction():
            m.set_position(pos("A"))
            with pytest.raises(RuntimeError), m.transaction():
                m.set_position(pos("B"))
                raise RuntimeError("inner block fails")
        assert set(held(m)) == {"A"}
    with PositionStateManager(cfg, key=KEY) as m2:
        assert set(held(m2)) == {"A"}


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m: m.get_position(["a"], "long"), id="get-unhashable-symbol"),
        pytest.param(lambda m: m.get_position("A", "up"), id="get-bad-side"),
        pytest.param(lambda m: m.delete_position(None, "long"), id="delete-no-symbol"),
        pytest.param(lambda m: m.batch_save_positions(deletes=[("A",)]), id="batch-short-key"),
        pytest.param(lambda m: m.batch_save_positions(deletes=[("A", "up")]), id="batch-bad-side"),
        pytest.param(lambda m: Position.from_ccxt(None), id="from-ccxt-none"),
    ],
)
def test_bad_input_at_the_api_is_a_schema_error(tmp_path: Path, call: Any) -> None:
    """Malformed keys and arguments raise SchemaValidationError (a PosStateError), not TypeError/IndexError."""
    with PositionStateManager(StateConfig.in_dir(tmp_path / "state"), key=KEY) as m, pytest.raises(SchemaValidationError):
        call(m)


def test_key_and_passphrase_together_is_a_config_error(tmp_path: Path) -> None:
    """Both key= and passphrase=: ConfigError (a PosStateError and a ValueError) naming the conflict."""
    with pytest.raises(ConfigError, match="not both"):
        PositionStateManager(StateConfig.in_dir(tmp_path / "state"), key=KEY, passphrase="x")


def test_a_clock_stepped_back_does_not_roll_an_authentic_state_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saves made while the clock was 30 min ahead load normally once it is corrected (AES-GCM says the key
    holder wrote them): no recovery to an older copy, a warning only. A plaintext file keeps the check."""
    import time

    real = time.time
    cfg = StateConfig.in_dir(tmp_path / "state", backup_interval=1e9)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos("A", "1")])
    monkeypatch.setattr(time, "time", lambda: real() + 1800)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos("A", "2")])
        m.save_positions([pos("A", "3"), pos("B", "5")])
    monkeypatch.setattr(time, "time", real)
    with PositionStateManager(cfg, key=KEY) as m:
        assert held(m) == {"A": "3", "B": "5"} and m.last_recovery is None

    plain = StateConfig.in_dir(tmp_path / "plain", backup_interval=1e9, encryption=False, durability="snapshot")
    monkeypatch.setattr(time, "time", lambda: real() + 1800)
    with PositionStateManager(plain) as m:
        m.save_positions([pos("A", "1")])
    monkeypatch.setattr(time, "time", real)
    with PositionStateManager(plain) as m, pytest.raises(CorruptStateError, match="in the future"):
        m.load_positions()


def test_repair_keeps_changes_acknowledged_in_the_journal(tmp_path: Path) -> None:
    """repair_state() on a snapshot that decrypts but fails the schema replays the journal's acknowledged
    records onto the repaired snapshot (a decision says so) and keeps the journal file in quarantine."""
    import orjson

    from posstate.model import document as _document
    from posstate.storage import codec as _codec
    from posstate.storage.crypto import Keyring

    cfg = StateConfig.in_dir(tmp_path / "state", durability="sync", backup_interval=0.0)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos("BTC/USDT")])
        m.save_positions([pos("BTC/USDT", "2")])
        m.set_position(pos("SOL/USDT", "7"))  # acknowledged: durable in the journal only
    kr = Keyring(key=KEY)
    header, payload = _codec.decode(cfg.state_path.read_bytes(), keyring=kr, path=cfg.state_path)
    doc = orjson.loads(payload)
    bad = {"symbol": "ETH/USDT", "side": "long", "contracts": "1", "entry_price": "x"}
    doc["positions"]["ETH/USDT|long"] = {"rev": header.generation, "position": bad}
    enc = _codec.encode(
        _document.dumps(doc),
        generation=header.generation,
        written_at_ms=header.written_at_ms,
        position_count=2,
        compression_level=3,
        keyring=kr,
    )
    cfg.state_path.write_bytes(enc.data)
    with PositionStateManager(cfg, key=KEY) as m:
        report = m.repair_state()
        assert any(d.kind == "journal" and d.reason.startswith("1 journal records") for d in report.decisions)
        assert held(m) == {"BTC/USDT": "2", "SOL/USDT": "7"}
        m.set_position(pos("XRP/USDT"))
    with PositionStateManager(cfg, key=KEY) as m2:
        assert set(held(m2)) == {"BTC/USDT", "SOL/USDT", "XRP/USDT"}
    assert any(p.name.startswith("positions.json.journal") for p in cfg.quarantine_dir.iterdir())


class _FailFirstDatasync(fs.FileOps):
    def __init__(self) -> None:
        self.calls = 0

    def fdatasync(self, fd: int) -> None:
        self.calls += 1
        if self.calls == 1:
            raise OSError(errno.EIO, "Input/output error")
        super().fdatasync(fd)


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_a_change_whose_sync_failed_never_comes_back(tmp_path: Path, durability: str) -> None:
    """The journal sync of X fails: the caller gets PersistenceError, memory drops X, and X does not reappear
    after close and reopen with no later change (a failed fsync is never just retried, even by close)."""
    from posstate import PersistenceError

    cfg = StateConfig.in_dir(tmp_path / "state", durability=durability, backup_interval=1e9)
    with PositionStateManager(cfg, key=KEY) as m:
        m.set_position(pos("A"))
        ops = _FailFirstDatasync()
        with fs.use(ops):
            with pytest.raises(PersistenceError):
                m.set_position(pos("X", "9"))
            assert set(held(m)) == {"A"}
    with PositionStateManager(cfg, key=KEY) as m2:
        assert set(held(m2)) == {"A"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"[\x93\x00garbage", "no PSTATE magic", id="bracket-then-binary"),
        pytest.param(b" {not json", "no PSTATE magic", id="brace-then-text"),
        pytest.param(b'{"positions": {}}', "plain JSON", id="real-json-object"),
        pytest.param(b"[1, 2]", "plain JSON", id="real-json-array"),
    ],
)
def test_only_real_json_is_called_plain_json(data: bytes, reason: str) -> None:
    """Random bytes that happen to start with '[' or '{' are 'not a posstate file', not 'plain JSON'."""
    from posstate.storage import container as _format

    with pytest.raises(_format.FormatProblem, match=reason):
        _format.check_file(data)
