"""Issue 15.7: bot-wide metadata (set_bot_metadata / get_bot_metadata): journaled and validated like symbol
metadata, in the JSON schema, and it survives restart, compaction, backups, restore, export and import."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from posstate import Position, PositionStateManager, SchemaValidationError, StateConfig, UnsupportedVersionError
from posstate.cli.main import cli
from posstate.model import document as _document
from posstate.model import merge as _merge
from posstate.model import schema as _schema
from posstate.storage import codec as _codec
from posstate.storage import statefile as _statefile

P = Position(symbol="BTCUSDT", side="long", contracts=Decimal("1"), entry_price=Decimal("50000"))
DATA = {"step": 41, "strategy": {"regime": "trend", "weights": [0.5, 0.25]}}


def make(cfg: StateConfig, key: bytes, **kw: Any) -> PositionStateManager:
    return PositionStateManager(cfg.replace(**kw) if kw else cfg, key=key)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param([1, 2], id="list"),
        pytest.param({"x": math.nan}, id="nan"),
        pytest.param({"x": Decimal("1")}, id="decimal"),
        pytest.param({1: "a"}, id="int-key"),
        pytest.param({"x": "\ud800"}, id="lone-surrogate"),
    ],
)
def test_bad_bot_metadata_is_refused_and_changes_nothing(cfg: StateConfig, key: bytes, bad: Any) -> None:
    """issue 15.7: bot metadata is validated like symbol metadata; a refused value changes nothing."""
    with make(cfg, key) as m:
        m.set_bot_metadata(DATA)
        gen = m.generation
        with pytest.raises(SchemaValidationError):
            m.set_bot_metadata(bad)
        assert m.get_bot_metadata() == DATA and m.generation == gen


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_journaled_and_survives_restart(cfg: StateConfig, key: bytes, durability: str) -> None:
    """issue 15.7: set_bot_metadata is a journaled change: durable when it returns, replayed after a restart."""
    with make(cfg, key, durability=durability) as m:
        assert m.get_bot_metadata() is None
        m.set_position(P)
        before = m.generation
        m.set_bot_metadata(DATA)
        assert m.generation == before + 1  # an acknowledged change moves the generation
        got = m.get_bot_metadata()
        assert got == DATA
        assert got is not None
        got["step"] = 0  # a copy: editing it changes nothing
        assert m.get_bot_metadata() == DATA
    with make(cfg, key, durability=durability) as m2:
        assert m2.get_bot_metadata() == DATA and m2.get_position("BTCUSDT", "long") == P


def test_survives_compaction_backup_and_restore(cfg: StateConfig, key: bytes) -> None:
    """issue 15.7: bot metadata is in the snapshot a compaction writes, in backups, and comes back on restore."""
    with make(cfg, key, journal_max_records=3) as m:
        for step in range(10):  # several compactions
            m.set_bot_metadata({"step": step})
        m.save()
        backup = m.create_backup()
        m.set_bot_metadata({"step": 99})
        m.restore_from_backup(backup.id, accept_older=True)
        assert m.get_bot_metadata() == {"step": 9}
    from posstate.storage.crypto import Keyring

    in_backup = _statefile.read(backup.path, options=_statefile.ReadOptions(keyring=Keyring(key=key)), what="backup")
    assert in_backup.state.bot_metadata == {"step": 9}
    with make(cfg, key) as m2:
        assert m2.get_bot_metadata() == {"step": 9}


def test_background_compaction_keeps_bot_metadata_without_a_save(cfg: StateConfig, key: bytes) -> None:
    """issue 14 x 15.7 (integration review): the snapshot a background compaction writes holds the bot metadata,
    including a change made while it runs; the retired journal segment is not needed to get it back."""
    with make(cfg, key, journal_max_records=3) as m:
        m.set_bot_metadata({"step": 1})  # the first one goes into a schema-2 snapshot
        m.set_bot_metadata({"step": 2})  # this one only into the journal
        for i in range(6):  # passes the threshold: a rotation, then the background compaction
            m.set_position(Position(symbol=f"S{i}USDT", side="long", contracts=Decimal("1"), entry_price=Decimal("10")))
        m.set_bot_metadata({"step": 3})
        m.compact(wait=True)
        snap = _statefile.read(cfg.state_path, options=_statefile.ReadOptions(keyring=_keyring(key)))
        assert snap.state.bot_metadata in ({"step": 2}, {"step": 3})  # the state at its rotation point
    with make(cfg, key) as m2:
        assert m2.get_bot_metadata() == {"step": 3}


def _keyring(key: bytes) -> Any:
    from posstate.storage.crypto import Keyring

    return Keyring(key=key)


def test_transaction_rolls_bot_metadata_back(cfg: StateConfig, key: bytes) -> None:
    """issue 15.7: inside a transaction that fails, set_bot_metadata is undone with the rest."""
    with make(cfg, key) as m:
        m.set_bot_metadata({"a": 1})
        with pytest.raises(RuntimeError), m.transaction():
            m.set_bot_metadata({"a": 2})
            m.set_position(P)
            raise RuntimeError("abort")
        assert m.get_bot_metadata() == {"a": 1} and m.get_positions() == {}


def test_schema_version_2_only_with_bot_metadata(cfg: StateConfig, key: bytes) -> None:
    """issue 15.7: a state without bot metadata is still written as schema 1 (older releases read it); with it,
    schema 2, valid against schemas/state.schema.json; a version 1 document holding bot metadata is refused."""
    with make(cfg, key, encryption=False) as m:
        m.set_position(P)
        m.save()
        assert _codec.inspect(cfg.state_path.read_bytes(), path=cfg.state_path).schema_version == 1
        m.set_bot_metadata(DATA)
        m.save()
        raw = cfg.state_path.read_bytes()
        assert _codec.inspect(raw, path=cfg.state_path).schema_version == 2
        doc = _document.build_document(m._state)
    assert doc["schema_version"] == 2 and doc["bot_metadata"]["data"] == DATA
    assert _schema.schema_errors(doc) == []
    assert _document.decode_document(orjson.loads(orjson.dumps(doc)), path=None).bot_metadata == DATA
    old = {**doc, "schema_version": 1}
    assert _schema.schema_errors(old) != []
    with pytest.raises(SchemaValidationError):
        _document.decode_document(old, path=None)
    bad = {**doc, "bot_metadata": {"rev": 1, "data": [1]}}
    with pytest.raises(SchemaValidationError):
        _document.decode_document(bad, path=None)


def test_older_release_refuses_the_file_as_newer(cfg: StateConfig, key: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 15.7: a release that reads only schema 1 refuses a file holding bot metadata as newer
    (UnsupportedVersionError), never as damage to recover from."""
    with make(cfg, key) as m:
        m.set_bot_metadata(DATA)
        m.save()
    monkeypatch.setattr(_codec, "SCHEMA_VERSION", 1)
    with pytest.raises(UnsupportedVersionError):
        _statefile.read(cfg.state_path, options=_statefile.ReadOptions(keyring=None))


def test_merge_keeps_the_newer_bot_metadata() -> None:
    """issue 15.7: a merge keeps the bot metadata of the higher revision."""
    a = _document.StateData(generation=5, bot_metadata={"v": "a"}, bot_metadata_rev=5)
    b = _document.StateData(generation=7, bot_metadata={"v": "b"}, bot_metadata_rev=7)
    assert _merge.merge_states(a, b).state.bot_metadata == {"v": "b"}
    assert _merge.merge_states(b, a).state.bot_metadata == {"v": "b"}
    assert _merge.merge_states(a, _document.StateData()).state.bot_metadata == {"v": "a"}


def test_show_export_import_carry_bot_metadata(tmp_path: Path, key_file: Path, key: bytes) -> None:
    """issue 15.7: `show` prints the bot metadata beside symbol metadata; export holds it; import brings it back."""
    state = tmp_path / "state"
    cfg = StateConfig.in_dir(state)
    with make(cfg, key) as m:
        m.set_position(P)
        m.set_symbol_metadata("BTCUSDT", {"entries": 1})
        m.set_bot_metadata(DATA)
    runner = CliRunner()
    base = ["--state-dir", str(state), "--key-file", str(key_file)]
    r = runner.invoke(cli, [*base, "show"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert 'bot metadata: {"step":41' in r.output
    r = runner.invoke(cli, [*base, "show", "--json"], catch_exceptions=False)
    assert json.loads(r.output)["bot_metadata"]["data"] == DATA
    out = tmp_path / "export.json"
    r = runner.invoke(cli, [*base, "export", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["bot_metadata"]["data"] == DATA
    with make(cfg, key) as m:
        m.set_bot_metadata({"step": 0})
    r = runner.invoke(cli, [*base, "import", str(out), "--yes"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "bot metadata:" in r.output or "bot metadata:" in (r.stderr if r.stderr_bytes is not None else "")
    with make(cfg, key) as m:
        assert m.get_bot_metadata() == DATA
