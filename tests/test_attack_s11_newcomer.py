"""Session 11, outside review as a newcomer: what the README and docs/ say, run literally."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring, encode_key_text, generate_key

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60


def _key_file(tmp_path: Path) -> tuple[bytes, Path]:
    """A new key and the 0600 file holding it, as `posstate keygen --out` writes it."""
    key = generate_key()
    key_file = tmp_path / "k.key"
    key_file.write_text(encode_key_text(key))
    key_file.chmod(0o600)
    return key, key_file


def _saved_empty(d: Path) -> Path:
    """An unencrypted state directory holding one saved, empty state."""
    with PositionStateManager(StateConfig.in_dir(d, encryption=False, backup_interval=1e9)) as m:
        m.load_positions()
        m.save()
    return d


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("POSSTATE_KEY", "POSSTATE_KEY_FILE", "POSSTATE_PASSPHRASE", "POSSTATE_DIR", "POSSTATE_CONFIG"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "posstate", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def test_key_file_that_is_a_directory_is_a_key_error(tmp_path: Path) -> None:
    """newcomer s11: docs/CLI.md exit 3 for a key file that is a directory (as for POSSTATE_KEY_FILE), not click's exit 2."""
    d = tmp_path / "state"
    d.mkdir()
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    via_flag = _cli("show", "--state-dir", str(d), "--key-file", str(key_dir), cwd=tmp_path)
    assert via_flag.returncode == 3, via_flag.stderr
    lines = via_flag.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "directory" in lines[0]
    json_run = _cli("show", "--json", "--state-dir", str(d), "--key-file", str(key_dir), cwd=tmp_path)
    assert json_run.returncode == 3 and '"MissingKeyError"' in json_run.stdout
    rekey = _cli("rekey", "--state-dir", str(d), "--new-key-file", str(key_dir), "--yes", cwd=tmp_path)
    assert rekey.returncode == 3, rekey.stderr


def _same_generation_backups(tmp_path: Path, *, later_first: bool) -> tuple[StateConfig, bytes]:
    """A damaged state file and two valid backups of its generation, one stamped 5 ms after the other (as a clean
    close()'s backup of memory and the timed copy of the same snapshot are)."""
    key = generate_key()
    cfg = StateConfig.in_dir(tmp_path / "s", backup_interval=1e9)
    with PositionStateManager(cfg, key=key) as m:
        m.load_positions()
        m.set_position(Position(symbol="BTC/USDT:USDT", side="long", contracts=1, entry_price=2))
        m.save()
    options = _statefile.ReadOptions(keyring=Keyring(key=key))
    loaded = _statefile.read(cfg.state_path, options=options)
    written_ms = int(loaded.header.written_at_ms)
    _, later = _statefile.encode(loaded.state, keyring=Keyring(key=key), compression_level=3, now_ms=written_ms + 5)
    backups = cfg.state_path.parent / "backups"
    for old in backups.glob("positions_*.json"):
        old.unlink()
    copy_bytes = cfg.state_path.read_bytes()
    newer_name, older_name = "positions_20300101_000001.json", "positions_20300101_000000.json"
    (backups / (newer_name if later_first else older_name)).write_bytes(later.data)
    (backups / (older_name if later_first else newer_name)).write_bytes(copy_bytes)
    data = bytearray(copy_bytes)
    data[len(data) // 2] ^= 0xFF
    cfg.state_path.write_bytes(bytes(data))
    return cfg, key


@pytest.mark.parametrize("later_first", [pytest.param(True, id="later-named-newer"), pytest.param(False, id="later-named-older")])
def test_recovery_does_not_call_a_same_generation_copy_older_or_the_clock_wrong(
    tmp_path: Path, later_first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """newcomer s11: after `posstate demo`, `repair` warned "lower generation but a later time; the clock moved"
    about a backup of the chosen copy's own generation; an equal generation is neither older nor a clock step."""
    cfg, key = _same_generation_backups(tmp_path, later_first=later_first)
    with caplog.at_level(logging.WARNING, logger="posstate"), PositionStateManager(cfg, key=key) as m:
        m.load_positions()
        report = m.last_recovery
    assert report is not None
    verdicts = dict(report.candidates)
    same = [v for name, v in verdicts.items() if name.startswith("backup ") and v != "chosen"]
    assert same and all("clock" not in v and "older" not in v for v in same), verdicts
    assert "the clock moved" not in caplog.text


def test_sigterm_without_a_terminal_is_exactly_one_error_line(tmp_path: Path) -> None:
    """newcomer s11: SIGTERM with stderr in a file or pipe (a service manager) printed a blank line before the
    one `Error: terminated (SIGTERM)` line (click's newline for a terminal's ^C echo); `head -1` read nothing."""
    import signal

    key, key_file = _key_file(tmp_path)
    config = tmp_path / "wait.toml"
    config.write_text("lock_timeout = 30\n")  # a file you name may wait longer for the lock than the default
    d = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["-v", "--state-dir", str(d), "--config", str(config), "--key-file", str(key_file), "repair", "--yes"]
    with PositionStateManager(StateConfig.in_dir(d), key=key) as m:
        m.load_positions()
        m.save()
        p = subprocess.Popen(
            [sys.executable, "-m", "posstate", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert p.stderr is not None
        first = p.stderr.readline()  # the --verbose line: the command runs, and waits for the bot's lock
        assert first.startswith("info:"), first
        p.send_signal(signal.SIGTERM)
        _, rest = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 143
    assert rest.splitlines() == [rest.splitlines()[0]] and rest.startswith("Error: terminated (SIGTERM)"), repr(rest)


def test_history_shows_bot_metadata_changes(tmp_path: Path) -> None:
    """newcomer s11: README's `set_bot_metadata({"step": 41})` is journaled, but `posstate history` listed it as
    `(absent) -> (absent)` (JSON old/new null): the old and new bot metadata are shown like symbol metadata."""
    from posstate.journal.audit import history

    key = generate_key()
    cfg = StateConfig.in_dir(tmp_path / "s", backup_interval=1e9)
    m = PositionStateManager(cfg, key=key)
    m.load_positions()
    m.set_bot_metadata({"step": 41})
    m.save()
    m.set_bot_metadata({"step": 42})
    m.set_bot_metadata({"step": 43})
    entries = history(cfg, keyring=Keyring(key=key))
    m.close()
    bot = [(e.old, e.new) for e in entries if e.op == "set_bot_metadata"]
    assert bot == [({"step": 41}, {"step": 42}), ({"step": 42}, {"step": 43})], entries


def test_validate_summary_says_the_journal_is_replayed_on_top(tmp_path: Path) -> None:
    """newcomer s11: after the README's embed example (changes durable by the journal), `posstate validate` ended
    "VALID: generation 1, 0 positions" while `show` listed the position: the summary names the journal records."""
    key, key_file = _key_file(tmp_path)
    d = tmp_path / "state"
    m = PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9), key=key)
    m.load_positions()
    m.save()
    m.set_position(Position(symbol="BTC/USDT:USDT", side="long", contracts=1, entry_price=2))
    m.set_bot_metadata({"step": 41})
    m.set_bot_metadata({"step": 42})
    try:
        out = _cli("validate", "--state-dir", str(d), "--key-file", str(key_file), cwd=tmp_path)
        as_json = _cli("validate", "--json", "--state-dir", str(d), "--key-file", str(key_file), cwd=tmp_path)
    finally:
        m.close()
    assert out.returncode == 0, out.stderr
    applied = json.loads(as_json.stdout)["journal"]["applied"]
    assert applied >= 1
    last = out.stdout.splitlines()[-1]
    assert last.startswith("VALID: generation ") and f"+ {applied} journal record" in last, last


def test_manager_signature_is_the_documented_one() -> None:
    """newcomer s11: README's `PositionStateManager(config=None, *, key=None, passphrase=None, stats_logger=None)`;
    help() and IDEs showed `(*args, **kwargs)` (a subclass's pass-through), and mypy let `passphrse=` through."""
    import inspect

    params = inspect.signature(PositionStateManager).parameters
    assert list(params) == ["config", "key", "passphrase", "stats_logger"]
    assert [p.kind for p in params.values()] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] + [inspect.Parameter.KEYWORD_ONLY] * 3


def test_history_of_an_unknown_order_names_the_next_step(tmp_path: Path) -> None:
    """newcomer s11: `posstate history --orders --id X` for an unknown X said only "no order X in the ledger";
    every message names the next step (docs/CLI.md: exit 1)."""
    key, key_file = _key_file(tmp_path)
    d = tmp_path / "state"
    with PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9), key=key) as m:
        m.load_positions()
        m.save()
    out = _cli("history", "--orders", "--id", "nope", "--state-dir", str(d), "--key-file", str(key_file), cwd=tmp_path)
    assert out.returncode == 1
    (line,) = out.stderr.splitlines()
    assert line.startswith("Error:") and "`posstate history --orders`" in line, line


def test_error_line_escapes_undecodable_path_bytes_as_json_does(tmp_path: Path) -> None:
    """newcomer s11: docs/CLI.md shows undecodable bytes of a path as `\\xNN` in the JSON; the `Error:` line
    showed the same byte as `\\udcff` (Python's lone surrogate). Both now say `\\xff`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = os.fsencode(tmp_path) + b"/bad\xff"
    out = subprocess.run(
        [sys.executable, "-m", "posstate", "--json", "show", "--state-dir", bad], env=env, capture_output=True, timeout=TIMEOUT
    )
    assert out.returncode == 6
    assert b"bad\\\\xff" in out.stdout  # JSON escapes the backslash
    (line,) = out.stderr.splitlines()
    assert line.startswith(b"Error:") and b"bad\\xff/" in line and b"udcff" not in line, line


def test_import_of_a_newer_schema_version_is_exit_4(tmp_path: Path) -> None:
    """newcomer s11: README exit 4 is "unsupported format or schema version (a newer posstate wrote it)"; an
    exported document of a newer schema_version was exit 1 "99 is not one of [1, 2] (rule: enum)"."""
    key, key_file = _key_file(tmp_path)
    d = tmp_path / "state"
    with PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9), key=key) as m:
        m.load_positions()
        m.save()
    exported = tmp_path / "doc.json"
    base = ["--state-dir", str(d), "--key-file", str(key_file)]
    assert _cli("export", "--out", str(exported), *base, cwd=tmp_path).returncode == 0
    doc = json.loads(exported.read_text())
    doc["schema_version"] = 99
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(doc))
    out = _cli("import", str(newer), "--dry-run", "--json", *base, cwd=tmp_path)
    assert out.returncode == 4, out.stderr
    assert json.loads(out.stdout)["error"]["type"] == "UnsupportedVersionError"
    (line,) = out.stderr.splitlines()
    assert "schema version 99" in line and "upgrade posstate" in line, line


def test_reconcile_names_the_exchange_file_of_a_bad_value(tmp_path: Path) -> None:
    """newcomer s11: `posstate reconcile --positions FILE` with a NaN in FILE said `<memory>: $[0].contracts ...
    (nothing was stored)`; docs/ACCOUNT.md: the error names the entry, and the message names the file."""
    from posstate import SchemaValidationError, reconcile_file

    d = _saved_empty(tmp_path / "state")
    bad = tmp_path / "exchange.json"
    bad.write_text('[{"symbol": "BTC/USDT:USDT", "side": "long", "contracts": NaN, "entryPrice": 1}]')
    with pytest.raises(SchemaValidationError) as caught:
        reconcile_file(StateConfig.in_dir(d, encryption=False), bad)
    assert caught.value.json_path == "$[0].contracts"
    assert str(caught.value).startswith(f"{bad}: $[0].contracts") and "<memory>" not in str(caught.value)


def test_reconcile_names_the_orders_file_and_entry_of_a_bad_order(tmp_path: Path) -> None:
    """newcomer s11: `posstate reconcile --orders FILE` with a NaN price said `<memory>: $.price`: which file,
    which order? Now `FILE: $[1].price`, as a bad position is named."""
    from posstate import SchemaValidationError, reconcile_file

    d = _saved_empty(tmp_path / "state")
    positions = tmp_path / "positions.json"
    positions.write_text("[]")
    good = {"id": "1", "clientOrderId": "c1", "symbol": "A", "side": "buy", "type": "limit", "status": "open"}
    orders = tmp_path / "orders.json"
    text = json.dumps([{**good, "price": 1, "amount": 1}, {**good, "id": "2", "price": "__NAN__", "amount": 1}])
    orders.write_text(text.replace('"__NAN__"', "NaN"))
    with pytest.raises(SchemaValidationError) as caught:
        reconcile_file(StateConfig.in_dir(d, encryption=False), positions, open_orders_path=orders)
    assert caught.value.json_path == "$[1].price"
    assert str(caught.value).startswith(f"{orders}: $[1].price"), str(caught.value)


@pytest.mark.parametrize("content", [pytest.param(None, id="missing"), pytest.param("short", id="short-token")])
def test_token_file_errors_name_the_file(tmp_path: Path, content: str | None) -> None:
    """newcomer s11: `posstate serve --token-file F` refused F with "the token must be one word ..." or "the
    token file does not exist", naming no file; every message names the file it is about."""
    from posstate import ServeError
    from posstate.serve.tokens import read_token

    token = tmp_path / "token"
    if content is not None:
        token.write_text(content)
        token.chmod(0o600)
    with pytest.raises(ServeError) as caught:
        read_token(token)
    assert str(caught.value).startswith(f"{token}: the token"), str(caught.value)


def test_history_of_a_mistyped_state_dir_is_not_found(tmp_path: Path) -> None:
    """newcomer s11: `posstate history --state-dir /typo` said "no changes recorded since the last snapshot", exit
    0, where show, export, watch, repair and backups say "no such state directory", exit 6."""
    out = _cli("history", "--state-dir", str(tmp_path / "typo"), cwd=tmp_path)
    assert out.returncode == 6, out.stdout + out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith("Error:") and "no such state directory" in line, line
    assert not (tmp_path / "typo").exists()


def test_bad_key_file_errors_name_the_file_and_the_option(tmp_path: Path) -> None:
    """newcomer s11: a key file that is not base64 was `<memory>: key file K is not valid base64`; and a bad
    `rekey --new-key-file` was told to "pass --key-file FILE" (the old key's option). Now each names its file and
    the option to fix."""
    key, key_file = _key_file(tmp_path)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key at all\n")
    garbage.chmod(0o600)
    d = tmp_path / "state"
    with PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9), key=key) as m:
        m.load_positions()
        m.save()
    shown = _cli("show", "--state-dir", str(d), "--key-file", str(garbage), cwd=tmp_path)
    assert shown.returncode == 3
    assert shown.stderr.startswith(f"Error: {garbage}: key file is not valid base64"), shown.stderr
    for bad in (garbage, tmp_path / "missing.key", tmp_path):
        rekey = _cli(
            "rekey", "--state-dir", str(d), "--key-file", str(key_file), "--new-key-file", str(bad), "--yes", cwd=tmp_path
        )
        assert rekey.returncode == 3, rekey.stderr
        (line,) = rekey.stderr.splitlines()
        assert line.startswith(f"Error: {bad}: ") and "--new-key-file" in line and "pass --key-file" not in line, line


def test_import_dry_run_labels_the_current_state_as_the_import_does(tmp_path: Path) -> None:
    """newcomer s11: with journal records after the snapshot, `import --dry-run` labelled the current state with
    the snapshot's generation and the import itself with the generation after the replay (5, then 6)."""
    key, key_file = _key_file(tmp_path)
    d = tmp_path / "state"
    m = PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9), key=key)
    m.load_positions()
    m.save()
    for step in range(3):
        m.set_bot_metadata({"step": step})
    m.close()
    base = ["--state-dir", str(d), "--key-file", str(key_file)]
    doc = tmp_path / "doc.json"
    assert _cli("export", "--out", str(doc), *base, cwd=tmp_path).returncode == 0
    edited = json.loads(doc.read_text())
    edited["bot_metadata"]["data"] = {"step": 99}
    doc.write_text(json.dumps(edited))
    dry = _cli("import", str(doc), "--dry-run", *base, cwd=tmp_path)
    real = _cli("import", str(doc), "--yes", *base, cwd=tmp_path)
    assert dry.returncode == 0 and real.returncode == 0, dry.stderr + real.stderr
    assert dry.stdout.splitlines()[0] == real.stdout.splitlines()[0], (dry.stdout, real.stdout)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"PERSISTENCE": {"COMPRESSION": "false"}}, id="string-false-became-true"),
        pytest.param({"VALIDATION": {"ENABLED": "no"}}, id="string-no-became-true"),
        pytest.param({"PERSISTENCE": {"ENCRYPTION": {"ENABLED": "false"}}}, id="encryption-string"),
        pytest.param({"PERSISTENCE": {"COMPRES": False}}, id="typo-in-a-section"),
        pytest.param({"RECOVERY": {"BACKUP_TRESHOLD": 60000}}, id="typo-in-recovery"),
        pytest.param({"MAX_BACKUPS": "5"}, id="string-number"),
        pytest.param({"MAX_BACKUPS": 2.7}, id="fraction-truncated"),
        pytest.param({"BACKUP_INTERVAL": True}, id="bool-as-number"),
    ],
)
def test_reference_form_is_as_strict_as_the_flat_form(data: dict[str, Any]) -> None:
    """newcomer s11: README's `StateConfig.from_mapping({"PERSISTENCE": {"COMPRESSION": ...}})` took "false" as
    true (bool() of a string) and ignored a misspelt key inside a section; the flat form refuses both."""
    from posstate import ConfigError

    with pytest.raises(ConfigError):
        StateConfig.from_mapping(data)


def test_a_key_put_where_the_encryption_flag_goes_is_never_echoed() -> None:
    """newcomer s11 (review): `PERSISTENCE.ENCRYPTION` holding a key string by mistake is refused without the
    string in the error (secrets never appear in an exception)."""
    from posstate import ConfigError

    secret = "c2VjcmV0LWtleS1tYXRlcmlhbC0xMjM0NTY3ODkwYWJjZGVm"
    for data in ({"PERSISTENCE": {"ENCRYPTION": secret}}, {"PERSISTENCE": {"ENCRYPTION": {"ENABLED": secret}}}):
        with pytest.raises(ConfigError) as err:
            StateConfig.from_mapping(data)
        assert secret not in str(err.value) and secret not in repr(err.value)


def test_a_call_with_an_argument_posstate_does_not_take_is_a_typed_error(tmp_path: Path) -> None:
    """newcomer s11: an unknown event name, subscribe(maxsize=1), persist_interval=0 and an unknown stream-gap
    subject raised a plain ValueError; each is an InvalidArgumentError (a PosStateError, still a ValueError)
    that names the next step."""
    from posstate import AccountStateStore, ExchangeAccountStateStore, InvalidArgumentError, PersistedAccountStateStore

    m = PositionStateManager(StateConfig.in_dir(tmp_path / "s", encryption=False))
    try:
        calls = [
            lambda: m.on("sved", lambda *a: None),
            lambda: AccountStateStore().on("updatd", lambda *a: None),
            lambda: AccountStateStore().subscribe(maxsize=1),
            lambda: PersistedAccountStateStore(m, persist_interval=0),
            lambda: ExchangeAccountStateStore(m).record_stream_gap(subjects=("ordrs",)),
        ]
        for call in calls:
            with pytest.raises(InvalidArgumentError, match=r"; use one of|; give") as err:
                call()
            assert isinstance(err.value, ValueError)
    finally:
        m.close()


def test_a_bad_posstate_key_is_named_without_a_memory_prefix(tmp_path: Path) -> None:
    """newcomer s11: `POSSTATE_KEY=notbase64` was `Error: <memory>: POSSTATE_KEY is not valid base64 ...`; the
    variable is the thing to fix, and the error names it alone (never its value)."""
    env = {**os.environ, "POSSTATE_KEY": "not-base64!!"}
    env.pop("POSSTATE_KEY_FILE", None)
    out = subprocess.run(
        [sys.executable, "-m", "posstate", "show", "--state-dir", str(tmp_path / "s")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3, out
    assert out.stderr.startswith("Error: POSSTATE_KEY is not valid base64"), out.stderr
    assert "not-base64!!" not in out.stderr
