"""The ``posstate`` command line through click's CliRunner: exit codes and the exact ``Error:`` lines."""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import re
import socket
import stat
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from posstate import ConfigError
from posstate.cli import base as _cli_base
from posstate.cli.base import exit_code_for
from posstate.cli.main import cli
from posstate.core import errors as _errors
from posstate.core.config import StateConfig
from posstate.core.errors import (
    ConcurrentModificationError,
    CorruptStateError,
    ManagerClosedError,
    MissingKeyError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
    StateLockedError,
    StateNotFoundError,
    UnrecoverableStateError,
    UnsupportedVersionError,
    WrongKeyError,
)
from posstate.manager.manager import PositionStateManager
from posstate.model.position import Position
from posstate.storage import fileops as _fileops
from posstate.storage import statefile as _statefile
from posstate.storage.container import TRAILER_SIZE, parse_header, trailer_for
from posstate.storage.crypto import Keyring, encode_key_text, generate_key, key_id
from posstate.storage.lock import WriterLock

ROOT = Path(__file__).resolve().parent.parent
CLEAN_ENV = {"POSSTATE_KEY": None, "POSSTATE_KEY_FILE": None, "POSSTATE_PASSPHRASE": None, "POSSTATE_DIR": None}


# ------------------------------------------------------------------------------------------ helpers
def pos(symbol: str, side: str = "long", contracts: str = "1", entry: str = "100", **kw: str) -> Position:
    return Position(
        symbol=symbol,
        side=side,
        contracts=Decimal(contracts),
        entry_price=Decimal(entry),
        **{k: Decimal(v) for k, v in kw.items()},
    )  # type: ignore[arg-type]


def snapshot(directory: Path) -> dict[Path, bytes]:
    """Every file under *directory* with its bytes."""
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_key(path: Path, key: bytes) -> Path:
    path.write_text(encode_key_text(key) + "\n")
    path.chmod(0o600)
    return path


def make_state(
    state_dir: Path,
    key: bytes,
    positions: list[Position],
    metadata: dict[str, dict[str, object]] | None = None,
    *,
    durability: str | None = None,
) -> Path:
    """Write a state holding *positions* and *metadata* with one save() (default durability unless given:
    in "sync" mode a fresh state's first change also writes a base snapshot, and a journal is left beside it)."""
    # No timed backups: each test decides which backup files exist.
    extra = {} if durability is None else {"durability": durability}
    with PositionStateManager(StateConfig.in_dir(state_dir, backup_interval=1e9, **extra), key=key) as m:
        m.load_positions()
        for p in positions:
            m.set_position(p)
        for sym, data in (metadata or {}).items():
            m.set_symbol_metadata(sym, data)
        m.save()
    return state_dir / "positions.json"


def generation_of(path: Path) -> int:
    """The generation in a state file's header (read directly, no key needed)."""
    return parse_header(path.read_bytes()).generation


@pytest.fixture
def state(tmp_path: Path, key: bytes) -> Path:
    """A state dir whose file holds two positions and metadata for one symbol."""
    make_state(
        tmp_path / "state",
        key,
        [
            pos("BTC/USDT", "long", "0.5", "60000", mark_price="61000", unrealized_pnl="500", leverage="5"),
            pos("ETH/USDT", "short", "2", "3000"),
        ],
        {"BTC/USDT": {"entries_long": 1}},
    )
    return tmp_path / "state"


def run(args: list[str], *, input: str | None = None, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(cli, args, input=input, env={**CLEAN_ENV, **(env or {})}, catch_exceptions=False)


def err_line(result: Result) -> str:
    """The stderr of a failed command: exactly one line starting with 'Error: '."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def keyed(state: Path, key_file: Path) -> list[str]:
    return ["--state-dir", str(state), "--key-file", str(key_file)]


# ------------------------------------------------------------------------------------------ validate
def test_validate_valid_file_prints_every_check_ok(state: Path, key_file: Path) -> None:
    """A good file: exit 0, every check listed as ok, a VALID summary."""
    r = run([*keyed(state, key_file), "validate"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in ("read", "header", "checksum", "version", "decryption", "decompression", "json", "schema", "relationships"):
        assert any(re.match(rf"\s+ok\s+{name}\b", line) for line in lines), (name, r.stdout)
    assert lines[-1].startswith(f"VALID: generation {generation_of(state / 'positions.json')}, 2 positions")
    assert r.stderr == ""


def test_validate_without_key_says_contents_not_checked(state: Path, key: bytes) -> None:
    """No key: header and checksum pass, the contents are declared unchecked, exit 3."""
    r = run(["--state-dir", str(state), "validate"])
    assert r.exit_code == 3
    kid = key_id(key)
    assert err_line(r) == (
        f"Error: {state}/positions.json: header and checksum are fine, but the contents were NOT checked: the file is "
        f"encrypted (key id {kid}) and no key was given; rerun with --key-file FILE or set POSSTATE_KEY, "
        "POSSTATE_KEY_FILE or POSSTATE_PASSPHRASE"
    )
    assert "contents were NOT checked" in r.stdout
    assert re.search(r"ok\s+checksum", r.stdout)


def test_validate_wrong_key_exit_3(state: Path, tmp_path: Path, key: bytes) -> None:
    """A different key: exit 3 and both key ids named."""
    other = generate_key()
    kf = write_key(tmp_path / "other.key", other)
    r = run([*keyed(state, kf), "validate"])
    assert r.exit_code == 3
    assert err_line(r) == (
        f"Error: {state}/positions.json: written with key id {key_id(key)}, but the key given has id {key_id(other)}; "
        "supply the key with that id (POSSTATE_KEY, POSSTATE_KEY_FILE or --key-file)"
    )


def test_validate_key_from_environment(state: Path, key: bytes) -> None:
    """POSSTATE_KEY is used when no --key-file is given."""
    r = run(["--state-dir", str(state), "validate"], env={"POSSTATE_KEY": encode_key_text(key)})
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize(
    ("name", "content", "code", "message"),
    [
        pytest.param(
            "random",
            os.urandom(300).replace(b"P", b"Q"),
            1,
            "not a posstate file (no PSTATE magic); if it is a state document, load it with `posstate import FILE`",
            id="random-bytes",
        ),
        pytest.param(
            "empty",
            b"",
            1,
            "file is empty (0 bytes); recover with `posstate repair` or restore a backup with `posstate backups restore latest`",
            id="empty",
        ),
        pytest.param(
            "plain.json",
            b'{"positions": {}}',
            1,
            "plain JSON, not a posstate container; if it is a state document, load it with `posstate import FILE`",
            id="json",
        ),
        pytest.param(
            "adir",
            None,
            1,
            "is a directory, not a state file; give the path of a positions file (posstate reads regular files only)",
            id="directory",
        ),
        pytest.param(
            "missing",
            "absent",
            6,
            "no such state file; check --state-dir or the path, or list backups with `posstate backups list`",
            id="missing",
        ),
    ],
)
@pytest.mark.parametrize("command", ["validate", "show"])
def test_bad_files_get_their_error_and_code(
    tmp_path: Path, key_file: Path, name: str, content: bytes | str | None, code: int, message: str, command: str
) -> None:
    """Random bytes, empty file, a directory, plain JSON, a missing file: each its own line and exit code."""
    target = tmp_path / name
    if content is None:
        target.mkdir()
    elif isinstance(content, bytes):
        target.write_bytes(content)
    r = run(["--key-file", str(key_file), command, str(target)])
    assert r.exit_code == code
    assert err_line(r) == f"Error: {target}: {message}"


def test_validate_flipped_bit_is_damaged(state: Path, key_file: Path) -> None:
    """One flipped bit in the payload: checksum mismatch, exit 1, the check marked FAIL."""
    path = state / "positions.json"
    data = bytearray(path.read_bytes())
    data[200] ^= 0x01
    path.write_bytes(bytes(data))
    r = run([*keyed(state, key_file), "validate"])
    assert r.exit_code == 1
    assert re.search(r"FAIL\s+checksum\s+checksum mismatch", r.stdout)
    assert err_line(r) == (
        f"Error: {path}: checksum mismatch (file damaged on disk); recover with `posstate repair` or restore a backup "
        "with `posstate backups restore latest`"
    )


def test_validate_newer_format_exit_4(state: Path, key_file: Path) -> None:
    """A file from a newer container format version: exit 4."""
    path = state / "positions.json"
    body = b"PSTATE02" + path.read_bytes()[8:-TRAILER_SIZE]
    path.write_bytes(body + trailer_for(body))
    r = run([*keyed(state, key_file), "validate"])
    assert r.exit_code == 4
    assert err_line(r) == (
        f"Error: {path}: container format version 2 is newer than this posstate supports (1); upgrade posstate to read it, "
        "and do not overwrite it with this version"
    )


def test_validate_json_report(state: Path, key_file: Path) -> None:
    """--json prints valid, path, checks (name, ok, detail) and errors (path, message)."""
    r = run([*keyed(state, key_file), "validate", "--json"])
    assert r.exit_code == 0
    report = json.loads(r.stdout)
    assert report["valid"] is True and report["path"] == str(state / "positions.json")
    assert [c["name"] for c in report["checks"]][:3] == ["read", "header", "checksum"]
    assert all({"name", "ok", "detail"} <= set(c) for c in report["checks"])
    assert report["errors"] == []


def test_validate_json_report_lists_schema_errors(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """A decrypting file whose document breaks a rule: valid false, the JSON path in errors, exit 1."""
    st = _statefile.read(
        make_state(tmp_path / "s", key, [pos("A", contracts="1")]), options=_statefile.ReadOptions(keyring=Keyring(key=key))
    ).state
    st.generation = 5
    st.position_revs = {("A", "long"): 9}  # a revision after the generation: a relationship error
    _, enc = _statefile.encode(st, keyring=Keyring(key=key), compression_level=3)
    bad = tmp_path / "bad.json"
    bad.write_bytes(enc.data)
    r = run(["--key-file", str(key_file), "--json", "validate", str(bad)])
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report["valid"] is False
    assert report["errors"][0]["path"] == "$.positions['A|long'].rev"
    assert "revision 9 is after generation 5" in report["errors"][0]["message"]
    assert err_line(r).startswith(f"Error: {bad}: $.positions['A|long'].rev: revision 9 is after generation 5")


def test_validate_takes_no_lock_and_writes_nothing(state: Path, key_file: Path) -> None:
    """validate works while a bot holds the lock and leaves the directory byte-for-byte as it was."""
    cfg = StateConfig.in_dir(state)
    lock = WriterLock(cfg.lock_path, state_path=cfg.state_path)
    try:
        before = snapshot(state)
        r = run([*keyed(state, key_file), "validate"])
        assert r.exit_code == 0
        assert snapshot(state) == before
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------ show
def test_show_table_and_metadata(state: Path, key_file: Path) -> None:
    """The table has the issue's columns and the values as stored; metadata follows."""
    r = run([*keyed(state, key_file), "show"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{state}/positions.json: generation {generation_of(state / 'positions.json')}, written ")
    head = next(i for i, line in enumerate(lines) if line.startswith("symbol"))
    assert lines[head].split() == ["symbol", "side", "contracts", "entry", "mark", "uPnL", "leverage"]
    assert lines[head + 2].split() == ["BTC/USDT", "long", "0.5", "60000", "61000", "500", "5"]
    assert lines[head + 3].split() == ["ETH/USDT", "short", "2", "3000", "-", "-", "-"]
    assert '  BTC/USDT: {"entries_long":1}' in lines


def test_show_symbol_filter(state: Path, key_file: Path) -> None:
    """--symbol keeps only that symbol's rows and metadata."""
    r = run([*keyed(state, key_file), "show", "--symbol", "ETH/USDT"])
    assert r.exit_code == 0
    assert "ETH/USDT" in r.stdout and "BTC/USDT" not in r.stdout
    assert "no symbol metadata for ETH/USDT" in r.stdout


def test_show_json_is_the_decrypted_document(state: Path, key: bytes, key_file: Path) -> None:
    """--json prints exactly the document inside the file; with --symbol only that symbol."""
    r = run([*keyed(state, key_file), "show", "--json"])
    assert r.exit_code == 0
    _, doc = _statefile.read_document(state / "positions.json", options=_statefile.ReadOptions(keyring=Keyring(key=key)))
    assert json.loads(r.stdout) == doc
    r = run([*keyed(state, key_file), "show", "--json", "--symbol", "BTC/USDT"])
    shown = json.loads(r.stdout)
    assert list(shown["positions"]) == ["BTC/USDT|long"] and list(shown["symbol_metadata"]) == ["BTC/USDT"]


def test_show_without_key_exit_3(state: Path, key: bytes) -> None:
    """show needs the key: exit 3 with the command-line way to give it."""
    r = run(["--state-dir", str(state), "show"])
    assert r.exit_code == 3
    kid = key_id(key)
    assert err_line(r) == (
        f"Error: {state}/positions.json: the file is encrypted (key id {kid}) and no key was supplied; pass --key-file FILE, "
        "or set POSSTATE_KEY, POSSTATE_KEY_FILE or POSSTATE_PASSPHRASE (make a key with `posstate keygen`)"
    )


# ------------------------------------------------------------------------------------------ diff
def test_diff_text_and_json(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """Added, removed and changed positions (field by field) and metadata changes, as text and JSON."""
    a = make_state(tmp_path / "a", key, [pos("A", contracts="1"), pos("B")], {"A": {"n": 1}, "B": {"x": 1}})
    b = make_state(tmp_path / "b", key, [pos("A", contracts="2"), pos("C", "short")], {"A": {"n": 2}, "C": {"y": True}})
    r = run(["--key-file", str(key_file), "diff", str(a), str(b)])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"--- {a} (generation {generation_of(a)})",
        f"+++ {b} (generation {generation_of(b)})",
        "+ C short  contracts=1 entry_price=100",
        "- B long  contracts=1 entry_price=100",
        "~ A long",
        '    contracts: "1" -> "2"',
        "symbol metadata:",
        '+ C: {"y":true}',
        '- B: {"x":1}',
        "~ A",
        "    n: 1 -> 2",
    ]
    r = run(["--key-file", str(key_file), "diff", "--json", str(a), str(b)])
    d = json.loads(r.stdout)
    assert d["identical"] is False
    assert [p["symbol"] for p in d["positions"]["added"]] == ["C"]
    assert [p["symbol"] for p in d["positions"]["removed"]] == ["B"]
    assert d["positions"]["changed"] == [
        {"key": "A|long", "symbol": "A", "side": "long", "fields": {"contracts": {"old": "1", "new": "2"}}}
    ]
    assert d["symbol_metadata"] == {
        "added": {"C": {"y": True}},
        "removed": {"B": {"x": 1}},
        "changed": {"A": {"n": {"old": 1, "new": 2}}},
    }


def test_diff_identical_and_missing(state: Path, key_file: Path, tmp_path: Path) -> None:
    """A file against itself is identical; a missing side is exit 6."""
    p = str(state / "positions.json")
    r = run(["--key-file", str(key_file), "diff", p, p])
    assert r.exit_code == 0 and "no differences" in r.stdout
    r = run(["--key-file", str(key_file), "diff", p, str(tmp_path / "nope")])
    assert r.exit_code == 6
    assert (
        err_line(r) == f"Error: {tmp_path}/nope: no such state file; check --state-dir or the path, "
        "or list backups with `posstate backups list`"
    )


# ------------------------------------------------------------------------------------------ keygen
def test_keygen_stdout_is_a_key(tmp_path: Path) -> None:
    """Without --out the base64 of 32 fresh bytes goes to stdout, different every time."""
    a, b = run(["keygen"]), run(["keygen"])
    assert a.exit_code == 0
    assert len(base64.b64decode(a.stdout.strip(), validate=True)) == 32
    assert a.stdout != b.stdout


def test_keygen_out_creates_0600_and_refuses_overwrite(tmp_path: Path, key: bytes) -> None:
    """--out makes a 0600 file that works as --key-file; a second run refuses to overwrite it (exit 2)."""
    out = tmp_path / "new.key"
    r = run(["keygen", "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert f"to {out}" in r.stdout
    first = out.read_bytes()
    r = run(["keygen", "--out", str(out)])
    assert r.exit_code == 2
    assert err_line(r) == f"Error: {out}: already exists; refusing to overwrite it; choose another path or move it away first"
    assert out.read_bytes() == first
    make_state(tmp_path / "s", base64.b64decode(first), [pos("A")])
    assert run(["--state-dir", str(tmp_path / "s"), "--key-file", str(out), "validate"]).exit_code == 0


def test_keygen_out_missing_directory_exit_6(tmp_path: Path) -> None:
    """A --out in a directory that does not exist: exit 6."""
    r = run(["keygen", "--out", str(tmp_path / "no" / "k.key")])
    assert r.exit_code == 6
    assert err_line(r) == f"Error: {tmp_path}/no: no such directory; create it first or choose another path"


# ------------------------------------------------------------------------------------------ export / import
def test_export_writes_plain_0600_json(state: Path, key: bytes, key_file: Path, tmp_path: Path) -> None:
    """export writes the decrypted document, 0600, and never overwrites."""
    out = tmp_path / "exp.json"
    r = run([*keyed(state, key_file), "export", "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    _, doc = _statefile.read_document(state / "positions.json", options=_statefile.ReadOptions(keyring=Keyring(key=key)))
    assert json.loads(out.read_text()) == doc
    r = run([*keyed(state, key_file), "export", "--out", str(out)])
    assert r.exit_code == 2
    assert err_line(r) == f"Error: {out}: already exists; refusing to overwrite it; choose another path or move it away first"
    r = run([*keyed(state, key_file), "export", "--out", "-"])
    assert json.loads(r.stdout) == doc


class _NoNewFiles(_fileops.FileOps):
    """A directory that takes no new files, as /proc answers (ENOENT for a create in a directory that exists)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def open(self, path: Any, flags: int, mode: int = 0o600) -> int:
        if flags & os.O_CREAT and Path(path).parent == self.directory:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return super().open(path, flags, mode)


def test_export_into_a_directory_that_takes_no_new_files(state: Path, key_file: Path, tmp_path: Path) -> None:
    """newcomer leftovers 3: --out in a directory that exists but refuses a create (/proc) never says "no such
    directory": an existing target is "already exists" (exit 2), a new one the failed create (exit 1)."""
    odd = tmp_path / "procfs"
    odd.mkdir()
    (odd / "version").write_text("Linux\n")
    with _fileops.use(_NoNewFiles(odd)):
        r = run([*keyed(state, key_file), "export", "--out", str(odd / "version")])
        assert r.exit_code == 2
        assert err_line(r) == (
            f"Error: {odd}/version: already exists; refusing to overwrite it; choose another path or move it away first"
        )
        r = run([*keyed(state, key_file), "export", "--out", str(odd / "new.json")])
    assert r.exit_code == 1
    assert err_line(r) == (
        f"Error: {odd}/new.json: create failed (ENOENT: No such file or directory); nothing was written; "
        f"{odd} exists but takes no new file (a virtual file system such as /proc?); choose a path on a disk"
    )
    assert sorted(p.name for p in odd.iterdir()) == ["version"]


@pytest.mark.skipif(not Path("/proc/version").is_file(), reason="no /proc (not Linux)")
def test_export_out_proc_version_is_not_no_such_directory(state: Path, key_file: Path) -> None:
    """newcomer leftovers 3: `export --out /proc/version`: the target exists (exit 2), not "/proc: no such directory"."""
    r = run([*keyed(state, key_file), "export", "--out", "/proc/version"])
    assert r.exit_code == 2
    assert "no such directory" not in r.stderr and "already exists" in err_line(r)


def test_export_edit_import_round_trip(state: Path, key: bytes, key_file: Path, tmp_path: Path) -> None:
    """An exported, edited document imported with --yes becomes the next generation, encrypted."""
    out = tmp_path / "exp.json"
    assert run([*keyed(state, key_file), "export", "--out", str(out)]).exit_code == 0
    doc = json.loads(out.read_text())
    doc["positions"]["ETH/USDT|short"]["position"]["contracts"] = "3.25"
    del doc["positions"]["BTC/USDT|long"]
    doc["symbol_metadata"]["SOL/USDT"] = {"rev": 1, "data": {"strategy": "s1"}}
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    before = generation_of(state / "positions.json")
    r = run([*keyed(state, key_file), "import", str(edited), "--yes"])
    assert r.exit_code == 0, r.stderr
    assert "~ ETH/USDT short" in r.stdout and "- BTC/USDT long" in r.stdout
    loaded = _statefile.read(state / "positions.json", options=_statefile.ReadOptions(keyring=Keyring(key=key)))
    assert loaded.header.encrypted and loaded.state.generation == before + 1
    assert r.stderr.strip().endswith(f"as generation {before + 1} (encrypted)")
    assert loaded.state.positions == {("ETH/USDT", "short"): pos("ETH/USDT", "short", "3.25", "3000")}
    assert loaded.state.metadata == {"BTC/USDT": {"entries_long": 1}, "SOL/USDT": {"strategy": "s1"}}


def test_import_refuses_duplicate_keys(state: Path, key_file: Path, tmp_path: Path) -> None:
    """A document with a duplicate key is refused (exit 1) and the state is untouched."""
    before = (state / "positions.json").read_bytes()
    src = tmp_path / "dup.json"
    src.write_text('{"schema_version": 1, "generation": 1, "generation": 2}')
    r = run([*keyed(state, key_file), "import", str(src), "--yes"])
    assert r.exit_code == 1
    assert err_line(r) == (
        f"Error: {src}: $: duplicate key 'generation' in one JSON object (rule: uniqueKeys); fix the value, or for a stored "
        "file run `posstate validate` and `posstate repair`"
    )
    assert (state / "positions.json").read_bytes() == before


@pytest.mark.parametrize(
    ("content", "code", "expect"),
    [
        pytest.param(b"\xff\xfe garbage", 1, "payload is not valid JSON", id="not-json"),
        pytest.param(b'{"schema_version": 1}', 1, "(rule: required)", id="schema"),
        pytest.param(None, 2, "is a posstate state file, not an exported JSON document", id="container"),
    ],
)
def test_import_refuses_bad_documents(
    state: Path, key_file: Path, tmp_path: Path, content: bytes | None, code: int, expect: str
) -> None:
    """Not JSON, schema-invalid, or a container instead of an export: refused, state untouched."""
    before = (state / "positions.json").read_bytes()
    src = tmp_path / "in.json"
    src.write_bytes(before if content is None else content)
    r = run([*keyed(state, key_file), "import", str(src), "--yes"])
    assert r.exit_code == code
    assert expect in err_line(r)
    assert (state / "positions.json").read_bytes() == before


def _export(state: Path, key_file: Path, tmp_path: Path) -> Path:
    out = tmp_path / "exp.json"
    assert run([*keyed(state, key_file), "export", "--out", str(out)]).exit_code == 0
    doc = json.loads(out.read_text())
    doc["positions"]["ETH/USDT|short"]["position"]["contracts"] = "9"
    out.write_text(json.dumps(doc))
    return out


def test_import_needs_yes_without_terminal_and_asks_on_one(
    state: Path, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No terminal and no --yes: exit 2; on a terminal a 'no' aborts (exit 1) and nothing is written."""
    src = _export(state, key_file, tmp_path)
    before = (state / "positions.json").read_bytes()
    r = run([*keyed(state, key_file), "import", str(src)])
    assert r.exit_code == 2
    assert err_line(r) == "Error: import needs confirmation and there is no terminal to ask on; rerun with --yes"
    monkeypatch.setattr(_cli_base, "is_terminal", lambda: True)
    r = run([*keyed(state, key_file), "import", str(src)], input="n\n")
    assert r.exit_code == 1
    assert r.stderr.splitlines()[-1] == "Error: import not confirmed; nothing was changed"
    assert (state / "positions.json").read_bytes() == before
    r = run([*keyed(state, key_file), "import", str(src)], input="y\n")
    assert r.exit_code == 0, r.stderr
    assert (state / "positions.json").read_bytes() != before


def test_import_into_an_empty_directory(tmp_path: Path, key: bytes, key_file: Path, state: Path) -> None:
    """Importing into a directory with no state starts it: encrypted, the same positions, and the message names
    the generation written (a fresh state in sync mode first writes a base snapshot, so it is not pinned to 1)."""
    src = tmp_path / "exp.json"
    assert run([*keyed(state, key_file), "export", "--out", str(src)]).exit_code == 0
    fresh = tmp_path / "fresh"
    r = run([*keyed(fresh, key_file), "import", str(src), "--yes"])
    assert r.exit_code == 0, r.stderr
    assert r.stderr.strip().endswith(f"as generation {generation_of(fresh / 'positions.json')} (encrypted)")
    ro = _statefile.ReadOptions(keyring=Keyring(key=key))
    assert (
        _statefile.read(fresh / "positions.json", options=ro).state.positions
        == _statefile.read(state / "positions.json", options=ro).state.positions
    )


def test_import_dry_run_writes_nothing(state: Path, key_file: Path, tmp_path: Path) -> None:
    """--dry-run shows the changes and leaves the directory exactly as it was."""
    src = _export(state, key_file, tmp_path)
    before = snapshot(state)
    r = run([*keyed(state, key_file), "import", str(src), "--dry-run"])
    assert r.exit_code == 0, r.stderr
    assert '    contracts: "2" -> "9"' in r.stdout
    assert snapshot(state) == before


def test_import_refused_while_locked(state: Path, key_file: Path, tmp_path: Path) -> None:
    """A bot holds the writer lock: import (and its dry run) exit 5 naming pid and host."""
    src = _export(state, key_file, tmp_path)
    cfg = StateConfig.in_dir(state)
    lock = WriterLock(cfg.lock_path, state_path=cfg.state_path)
    try:
        for extra in (["--yes"], ["--dry-run"]):
            r = run([*keyed(state, key_file), "import", str(src), *extra])
            assert r.exit_code == 5
            assert err_line(r) == (
                f"Error: {state}/positions.json: locked by pid {os.getpid()} on host {socket.gethostname()}; stop that process "
                "first, or use a read-only command such as `posstate validate` or `posstate show`"
            )
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------ common behaviour
def test_usage_error_is_one_line_exit_2() -> None:
    """An unknown option: exit 2 and one Error line pointing at the command's help."""
    r = run(["validate", "--bogus"])
    assert r.exit_code == 2
    assert err_line(r) == "Error: No such option '--bogus' (did you mean '--verbose'?); see `posstate validate --help`"


def test_missing_option_value_points_at_the_command_help() -> None:
    """An option without its value after the command name: the hint names that command's help."""
    r = run(["validate", "--state-dir"])
    assert r.exit_code == 2
    assert err_line(r) == "Error: Option '--state-dir' requires an argument; see `posstate validate --help`"


def test_loose_key_file_is_warned_about(state: Path, key_file: Path) -> None:
    """A key file readable by others works, with one warning line on stderr (the library's log, shown by the CLI)."""
    key_file.chmod(0o644)
    r = run([*keyed(state, key_file), "validate"])
    assert r.exit_code == 0
    assert r.stderr == f"warning: key file {key_file} is readable by group or others (mode 644); chmod 600 it\n"


def test_cli_leaves_the_library_logger_as_it_was(state: Path, key_file: Path) -> None:
    """In-process runs (--debug included) restore the posstate logger's handlers and level afterwards."""
    log = logging.getLogger("posstate")
    before = (list(log.handlers), log.level)
    assert run(["--debug", *keyed(state, key_file), "validate"]).exit_code == 0
    assert run([*keyed(state, key_file), "validate", "--debug"]).exit_code == 0
    assert (list(log.handlers), log.level) == before


def test_unknown_command_exit_2() -> None:
    """An unknown command: exit 2, one line."""
    r = run(["frobnicate"])
    assert r.exit_code == 2
    assert err_line(r) == "Error: No such command 'frobnicate'; see `posstate --help`"


def test_config_errors_exit_2(tmp_path: Path) -> None:
    """A missing or wrong --config file is a usage error (exit 2)."""
    r = run(["--config", str(tmp_path / "none.toml"), "validate"])
    assert r.exit_code == 2
    assert err_line(r) == f"Error: {tmp_path}/none.toml: config file not found; see the configuration table in README.md"
    bad = tmp_path / "bad.toml"
    bad.write_text("max_backups = 0\n")
    r = run(["--config", str(bad), "validate"])
    assert r.exit_code == 2
    assert err_line(r) == f"Error: {bad}: max_backups must be >= 1, got 0; see the configuration table in README.md"


def test_config_paths_and_state_dir_override(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """--config supplies the state file; --state-dir (or POSSTATE_DIR) moves it to another directory."""
    make_state(tmp_path / "elsewhere", key, [pos("A")])
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_file = "{tmp_path}/elsewhere/positions.json"\nbackup_dir = "{tmp_path}/elsewhere/backups"\n')
    assert run(["--config", str(cfg), "--key-file", str(key_file), "validate"]).exit_code == 0
    r = run(["--config", str(cfg), "--key-file", str(key_file), "--state-dir", str(tmp_path / "empty"), "validate"])
    assert r.exit_code == 6 and f"{tmp_path}/empty/positions.json: no such state file" in r.stderr
    r = run(["--config", str(cfg), "--key-file", str(key_file), "validate"], env={"POSSTATE_DIR": str(tmp_path / "empty")})
    assert r.exit_code == 6


def test_options_after_the_command_name(state: Path, key_file: Path) -> None:
    """Common options work after the command name too."""
    r = run(["validate", "--state-dir", str(state), "--key-file", str(key_file), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["valid"] is True


def test_bad_key_file_exit_3(state: Path, tmp_path: Path) -> None:
    """A key file that is not 32 bytes of base64: exit 3, and the file's text is never echoed."""
    kf = tmp_path / "bad.key"
    kf.write_text("c2VjcmV0LXRleHQ=\n")
    kf.chmod(0o600)
    r = run([*keyed(state, kf), "validate"])
    assert r.exit_code == 3
    assert err_line(r) == (
        f"Error: {kf}: key file decodes to 11 bytes, expected 32; pass --key-file FILE, or set POSSTATE_KEY, "
        "POSSTATE_KEY_FILE or POSSTATE_PASSPHRASE (make a key with `posstate keygen`)"
    )
    assert "c2VjcmV0" not in r.output


def test_debug_shows_traceback_only_when_asked(tmp_path: Path) -> None:
    """Without --debug no traceback; with it the traceback comes before the Error line."""
    r = run(["validate", str(tmp_path / "nope")])
    assert "Traceback" not in r.output
    r = run(["--debug", "show", str(tmp_path / "nope")])
    assert r.exit_code == 6
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("Error: ")


def test_unexpected_exception_is_one_line(tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (a non-posstate exception) still gives one Error line, exit 1, no traceback."""

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr("posstate.cli.inspect_cmd.validate_file", boom)
    r = run(["--key-file", str(key_file), "validate", str(tmp_path)])
    assert r.exit_code == 1
    assert err_line(r) == "Error: unexpected RuntimeError: kaboom; rerun with --debug for the traceback and report it"


def test_version() -> None:
    """--version prints the package version."""
    from posstate import __version__

    r = run(["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"posstate, version {__version__}"


@pytest.mark.parametrize("args", [["--help"], []], ids=["--help", "no-args"])
def test_help_lists_exit_codes(args: list[str]) -> None:
    """--help (or no arguments at all) prints the help with every exit code 0..6."""
    r = run(args)
    assert r.exit_code == 0 and r.stderr == ""
    for code in range(7):
        assert re.search(rf"^\s+{code}\s+\S", r.stdout, re.M), code


def _commands() -> list[tuple[str, click.Command]]:
    out: list[tuple[str, click.Command]] = []
    for name, cmd in sorted(cli.commands.items()):
        out.append((name, cmd))
        if isinstance(cmd, click.Group):
            out += [(f"{name} {sub}", c) for sub, c in sorted(cmd.commands.items())]
    return out


@pytest.mark.parametrize(("name", "command"), _commands(), ids=[n for n, _ in _commands()])
def test_every_command_has_help(name: str, command: click.Command) -> None:
    """Each command has a help text and `--help` works for it."""
    assert (command.help or "").strip(), name
    r = run([*name.split(), "--help"])
    assert r.exit_code == 0 and command.help.split("\n")[0].strip()[:30] in " ".join(r.stdout.split())  # type: ignore[union-attr]


def _command_docs() -> str:
    readme = ROOT / "README.md"
    if readme.exists():
        text = readme.read_text()
        m = re.search(r"^## Command line\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
        if m:
            return m.group(1)
    return (ROOT / "docs" / "CLI.md").read_text()


@pytest.mark.parametrize("name", [n for n, _ in _commands()])
def test_every_command_is_documented(name: str) -> None:
    """Each command appears as `posstate NAME` in the README's command-line section (or docs/CLI.md)."""
    assert re.search(rf"posstate {re.escape(name)}\b", _command_docs()), name


# ------------------------------------------------------------------------------------------ exit code mapping
@pytest.mark.parametrize(
    ("exc", "code"),
    [
        pytest.param(CorruptStateError("p", "bad"), 1, id="corrupt"),
        pytest.param(UnrecoverableStateError("p", [("a", "b")]), 1, id="unrecoverable"),
        pytest.param(SchemaValidationError("p", "$", "type", "bad"), 1, id="schema"),
        pytest.param(PersistenceError("p", operation="write", cause=OSError(28, "full")), 1, id="persistence"),
        pytest.param(ManagerClosedError("p"), 1, id="closed"),
        pytest.param(ConfigError("bad"), 2, id="config"),
        pytest.param(MissingKeyError("p"), 3, id="missing-key"),
        pytest.param(WrongKeyError("p", file_key_id="a", our_key_id="b"), 3, id="wrong-key"),
        pytest.param(UnsupportedVersionError("p", what="schema", found=2, supported=1), 4, id="version"),
        pytest.param(StateLockedError("p", pid=1, host="h"), 5, id="locked"),
        pytest.param(ConcurrentModificationError("p", expected=1, found=2), 5, id="concurrent"),
        pytest.param(StateNotFoundError("p"), 6, id="not-found"),
    ],
)
def test_exit_code_for_each_error(exc: PosStateError, code: int) -> None:
    """The one mapping gives each error class its documented exit code."""
    assert exit_code_for(exc) == code


def test_every_error_class_maps_to_a_documented_code() -> None:
    """Every PosStateError subclass there is (including ones added later) maps to a code in 1..6."""

    def walk(cls: type) -> list[type]:
        return [cls] + [s for c in cls.__subclasses__() for s in walk(c)]

    classes = walk(_errors.PosStateError)
    assert len(classes) >= 12
    for cls in classes:
        exc = cls.__new__(cls)
        assert exit_code_for(exc) in range(1, 7), cls
