"""The command line with the write-ahead journal: show/export/diff/validate read the journal, import is one
transaction and one save, `history` and `doctor` (CliRunner: exit codes and the exact ``Error:`` lines)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from posstate.cli.main import cli
from posstate.core.config import StateConfig
from posstate.journal import format as jf
from posstate.journal.current import read_current
from posstate.manager.manager import PositionStateManager
from posstate.model import document as _document
from posstate.model.position import Position
from posstate.selftest.harness import copy_tree
from posstate.storage import fileops as fs
from posstate.storage.container import parse_header
from posstate.storage.crypto import Keyring, encode_key_text, generate_key
from posstate.storage.statefile import ReadOptions
from tests.killed import as_if_killed

CLEAN_ENV = {"POSSTATE_KEY": None, "POSSTATE_KEY_FILE": None, "POSSTATE_PASSPHRASE": None, "POSSTATE_DIR": None}


def pos(symbol: str, contracts: str = "1", side: str = "long", entry: str = "100") -> Position:
    return Position(symbol=symbol, side=side, contracts=Decimal(contracts), entry_price=Decimal(entry))  # type: ignore[arg-type]


def run(args: list[str]) -> Result:
    return CliRunner().invoke(cli, args, env=CLEAN_ENV, catch_exceptions=False)


def err_line(result: Result) -> str:
    """The stderr of a failed command: exactly one line starting with 'Error: '."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def files_of(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_key(path: Path, key: bytes) -> Path:
    path.write_text(encode_key_text(key) + "\n")
    path.chmod(0o600)
    return path


def config(state_dir: Path) -> StateConfig:
    return StateConfig.in_dir(state_dir, backup_interval=1e9)


def journaled_state(state_dir: Path, key: bytes) -> None:
    """Default (sync) durability: A=1 and B=2 saved in the snapshot, then A=3, B deleted, metadata for A
    and a transaction (C, metadata) recorded in the journal only (closed without a save)."""
    with PositionStateManager(config(state_dir), key=key) as m:
        m.set_position(pos("A", "1"))
        m.set_position(pos("B", "2"))
        m.save()
        m.set_position(pos("A", "3"))
        m.delete_position("B", "long")
        m.set_symbol_metadata("A", {"n": 1})
        with m.transaction():
            m.set_position(pos("C", "1"))
            m.set_symbol_metadata("A", {"n": 2})


#: The first record of that journal: A=1 and B=2 were records 1 and 2, the save's fold record 3 (issue 15.4).
FIRST_RECORD = 4


@pytest.fixture
def state(tmp_path: Path, key: bytes) -> Path:
    journaled_state(tmp_path / "state", key)
    return tmp_path / "state"


def keyed(state: Path, key_file: Path) -> list[str]:
    return ["--state-dir", str(state), "--key-file", str(key_file)]


def flip_middle_record(journal: Path) -> None:
    """Damage the first record's body (records follow it): damage before the last record."""
    data = bytearray(journal.read_bytes())
    data[jf.HEADER_SIZE + 30] ^= 1
    journal.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ show / export / diff
def test_show_replays_the_journal_and_writes_nothing(state: Path, key_file: Path) -> None:
    """show prints the state a restart loads (snapshot + journal), says so, and changes no file."""
    before = files_of(state)
    r = run([*keyed(state, key_file), "show"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1] == "journal: 4 change records since that snapshot, replayed (as a restart loads them)"
    rows = {line.split()[0]: line.split() for line in lines if line[:2] in ("A ", "B ", "C ")}
    assert set(rows) == {"A", "C"} and rows["A"][2] == "3"
    assert '  A: {"n":2}' in lines
    snap = run([*keyed(state, key_file), "show", "--snapshot-only"])
    assert snap.exit_code == 0 and "journal:" not in snap.stdout
    assert {line.split()[0] for line in snap.stdout.splitlines() if line[:2] in ("A ", "B ", "C ")} == {"A", "B"}
    assert files_of(state) == before


def test_show_json_is_a_valid_document_of_the_replayed_state(state: Path, key_file: Path) -> None:
    """show --json: the document a save would write now; it passes full validation."""
    r = run([*keyed(state, key_file), "show", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc["positions"]) == {"A|long", "C|long"} and doc["positions"]["A|long"]["position"]["contracts"] == "3"
    assert doc["symbol_metadata"]["A"]["data"] == {"n": 2} and "B|long" in doc["tombstones"]["positions"]
    assert doc["generation"] > parse_header((state / "positions.json").read_bytes()).generation
    st = _document.decode_document(doc, path=None)  # raises if the document does not validate
    assert set(st.positions) == {("A", "long"), ("C", "long")}
    only_a = json.loads(run([*keyed(state, key_file), "show", "--json", "--symbol", "A"]).stdout)
    assert set(only_a["positions"]) == {"A|long"}


def test_export_includes_journaled_changes_and_reimports_as_identical(state: Path, key_file: Path, tmp_path: Path) -> None:
    """export writes the replayed state without a validation warning; importing it back changes nothing."""
    out = tmp_path / "out.json"
    r = run([*keyed(state, key_file), "export", "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    assert "warning" not in r.stderr and "+ 4 journal records" in r.stderr
    doc = json.loads(out.read_text())
    assert set(doc["positions"]) == {"A|long", "C|long"}
    again = run([*keyed(state, key_file), "import", str(out), "--yes"])
    assert again.exit_code == 0, again.stderr
    assert "nothing to import" in again.stderr


def test_diff_sees_journaled_changes(state: Path, key_file: Path, tmp_path: Path) -> None:
    """diff of a plain copy of the snapshot against the state file lists the journal's changes."""
    copy = tmp_path / "copy.json"
    shutil.copyfile(state / "positions.json", copy)
    r = run([*keyed(state, key_file), "diff", str(copy), str(state / "positions.json")])
    assert r.exit_code == 0, r.stderr
    assert "+ C long" in r.stdout and "- B long" in r.stdout and "~ A long" in r.stdout
    assert r.stdout.splitlines()[1].endswith("(generation 4 + 4 journal records)")
    j = json.loads(run([*keyed(state, key_file), "diff", "--json", str(copy), str(state / "positions.json")]).stdout)
    assert not j["identical"] and j["b"]["journal_records"] == 4 and j["a"]["journal_records"] == 0
    same = run([*keyed(state, key_file), "diff", "--snapshot-only", str(copy), str(state / "positions.json")])
    assert "no differences" in same.stdout


def test_show_refuses_a_damaged_journal(state: Path, key_file: Path) -> None:
    """A journal damaged before its last record is reported (exit 1), never silently skipped; the snapshot
    alone stays viewable with --snapshot-only; nothing is written."""
    journal = state / "positions.json.journal"
    flip_middle_record(journal)
    before = files_of(state)
    r = run([*keyed(state, key_file), "show"])
    assert r.exit_code == 1
    line = err_line(r)
    assert line.startswith(f"Error: {journal}: record {FIRST_RECORD} at byte {jf.HEADER_SIZE} is damaged")
    assert "`posstate repair --dry-run`" in line and "--snapshot-only" in line
    assert run([*keyed(state, key_file), "export", "--out", "-"]).exit_code == 1
    src = _import_doc(state.parent)
    for args in (["--dry-run"], ["--yes"]):  # import refuses too, before any load could recover unasked
        refused = run([*keyed(state, key_file), "import", str(src), *args])
        assert refused.exit_code == 1 and err_line(refused) == line, args
    assert run([*keyed(state, key_file), "show", "--snapshot-only"]).exit_code == 0
    assert files_of(state) == before


def test_read_current_reports_damage_and_keeps_the_prefix(state: Path, key: bytes) -> None:
    """read_current never raises for journal damage: error set, state = snapshot + records before it."""
    flip_middle_record(state / "positions.json.journal")
    cur = read_current(config(state), ReadOptions(keyring=Keyring(key=key)))
    assert cur.error is not None and cur.problems and cur.applied == 0
    assert set(cur.state.positions) == {("A", "long"), ("B", "long")}


# ------------------------------------------------------------------------------------------ validate
def test_validate_reports_a_clean_journal(state: Path, key_file: Path) -> None:
    """validate adds a journal check: ok with the record count, in text and in --json."""
    r = run([*keyed(state, key_file), "validate"])
    assert r.exit_code == 0, r.stderr
    assert "  ok    journal        4 records, 4 after the snapshot (replayed on load)" in r.stdout.splitlines()
    j = json.loads(run([*keyed(state, key_file), "validate", "--json"]).stdout)
    assert j["valid"] and j["checks"][-1] == {
        "name": "journal",
        "ok": True,
        "detail": "4 records, 4 after the snapshot (replayed on load)",
    }
    assert j["journal"]["records"] == 4 and j["journal"]["matches_snapshot"] is True


def test_validate_torn_tail_is_a_note_and_nothing_is_cut(
    state: Path, key_file: Path, journal_records: Callable[[Path], bytes]
) -> None:
    """A torn last record: exit 0, the check says a load cuts it off; validate itself leaves it in place."""
    journal = state / "positions.json.journal"
    journal.write_bytes(journal_records(journal)[:-7] + bytes(100))  # torn over the zeros written ahead
    before = files_of(state)
    r = run([*keyed(state, key_file), "validate"])
    assert r.exit_code == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("  ") and " journal " in x]  # a check line, not the summary
    assert line.startswith("  ok    journal        3 records, 3 after the snapshot") and "torn last record" in line
    assert files_of(state) == before
    shown = run([*keyed(state, key_file), "show"])
    assert shown.exit_code == 0 and shown.stderr.startswith(f"warning: {journal}: torn last record")


def test_validate_damaged_middle_exit_1(state: Path, key_file: Path) -> None:
    """Damage before the last record: the journal check FAILs and validate exits 1 with one Error line."""
    flip_middle_record(state / "positions.json.journal")
    r = run([*keyed(state, key_file), "validate"])
    assert r.exit_code == 1
    assert any(x.startswith("  FAIL  journal") for x in r.stdout.splitlines())
    assert r.stdout.splitlines()[-1] == "INVALID"
    line = err_line(r)
    assert line.startswith(
        f"Error: {state / 'positions.json.journal'}: record {FIRST_RECORD} at byte {jf.HEADER_SIZE} is damaged"
    )
    assert line.endswith("see what it would choose with `posstate repair --dry-run`")
    j = json.loads(run([*keyed(state, key_file), "validate", "--json"]).stdout)
    assert j["valid"] is False and j["checks"][-1]["ok"] is False


def test_validate_journal_of_another_key_exit_3(state: Path, key_file: Path, tmp_path: Path) -> None:
    """A journal written under another key: FAIL and exit 3 (a key problem), naming both key ids."""
    other = tmp_path / "other"
    journaled_state(other, generate_key())
    shutil.copyfile(other / "positions.json.journal", state / "positions.json.journal")
    r = run([*keyed(state, key_file), "validate"])
    assert r.exit_code == 3
    line = err_line(r)
    assert line.startswith(f"Error: {state / 'positions.json.journal'}: written with key id ")
    assert any(x.startswith("  FAIL  journal") for x in r.stdout.splitlines())


def test_validate_and_show_refuse_a_newer_journal_format_exit_4(state: Path, key_file: Path) -> None:
    """A journal whose intact header names a newer format: validate FAILs the journal line and exits 4 (not
    1: it is not damage), and show refuses with exit 4; neither changes a file."""
    journal = state / "positions.json.journal"
    data = journal.read_bytes()
    head = bytearray(data[:88])
    head[6:8] = (jf.VERSION + 1).to_bytes(2, "big")
    journal.write_bytes(bytes(head) + hashlib.sha256(bytes(head)).digest()[:8] + data[jf.HEADER_SIZE :])
    before = files_of(state)
    r = run([*keyed(state, key_file), "validate"])
    assert r.exit_code == 4
    assert any(x.startswith("  FAIL  journal") for x in r.stdout.splitlines())
    assert err_line(r).startswith(f"Error: {journal}: journal format version {jf.VERSION + 1} is newer than this posstate")
    shown = run([*keyed(state, key_file), "show"])
    assert shown.exit_code == 4 and err_line(shown).startswith(f"Error: {journal}: journal format version")
    assert files_of(state) == before


def test_validate_without_a_journal_and_of_a_backup(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """No journal file: an ok line saying so. A file that is not the state file gets no journal line."""
    d = tmp_path / "snap"
    with PositionStateManager(config(d).replace(durability="snapshot"), key=key) as m:
        m.set_position(pos("A"))
        m.save()
    r = run([*keyed(d, key_file), "validate"])
    assert r.exit_code == 0 and f"  ok    journal        no journal at {d / 'positions.json.journal'}" in r.stdout
    bak = run([*keyed(d, key_file), "validate", str(d / "positions.json.bak")]) if (d / "positions.json.bak").exists() else None
    copy = tmp_path / "copy.json"
    shutil.copyfile(d / "positions.json", copy)
    other = run([*keyed(d, key_file), "validate", str(copy)])
    assert other.exit_code == 0 and " journal " not in other.stdout
    assert bak is None or " journal " not in bak.stdout


# ------------------------------------------------------------------------------------------ import
class Recorder(fs.FileOps):
    """Records each mutating call; raises EIO at call number *fail_at* (1-based), once."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_at = fail_at

    def _step(self, name: str, target: Any) -> None:
        self.calls.append((name, str(target)))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise OSError(errno.EIO, "injected I/O error")

    def open(self, path: Any, flags: int, mode: int = 0o600) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            self._step("open", path)
        return super().open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self._step("write", fd)
        return super().write(fd, data)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        self._step("write", fd)
        return super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        self._step("fsync", fd)
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._step("fdatasync", fd)
        super().fdatasync(fd)

    def replace(self, src: Any, dst: Any) -> None:
        self._step("replace", dst)
        super().replace(src, dst)

    def link(self, src: Any, dst: Any) -> None:
        self._step("link", dst)
        super().link(src, dst)

    def unlink(self, path: Any) -> None:
        self._step("unlink", path)
        super().unlink(path)

    def fsync_dir(self, path: Any) -> None:
        self._step("fsync_dir", path)
        super().fsync_dir(path)


def _import_doc(tmp_path: Path) -> Path:
    doc = {
        "schema_version": 1,
        "generation": 1,
        "written_at": "2024-01-01T00:00:00.000Z",
        "writer": {"host": "h", "pid": 1, "version": "0.1.0"},
        "positions": {
            "X|long": {"rev": 1, "position": pos("X", "7").to_dict()},
            "A|long": {"rev": 1, "position": pos("A", "9").to_dict()},
        },
        "symbol_metadata": {"X": {"rev": 1, "data": {"k": "v"}}},
        "tombstones": {"positions": {}, "symbol_metadata": {}},
    }
    src = tmp_path / "import.json"
    src.write_text(json.dumps(doc))
    return src


def _positions(state: Path, key: bytes) -> dict[Any, Position]:
    return dict(read_current(config(state), ReadOptions(keyring=Keyring(key=key))).state.positions)


def test_import_is_one_transaction_and_one_save(state: Path, key: bytes, key_file: Path, tmp_path: Path) -> None:
    """import writes exactly one snapshot (one rename onto the state file), no journal record, and reports the
    generation that save returned; the journaled changes it started from were folded in, not lost."""
    src = _import_doc(tmp_path)
    rec = Recorder()
    with fs.use(rec):
        r = run([*keyed(state, key_file), "import", str(src), "--yes"])
    assert r.exit_code == 0, r.stderr
    renames = [t for name, t in rec.calls if name == "replace" and t.endswith(".json")]
    assert renames == [str(state / "positions.json")]
    assert not any(name == "fdatasync" for name, _ in rec.calls)  # no journal append
    generation = parse_header((state / "positions.json").read_bytes()).generation
    assert r.stderr.strip().endswith(f"as generation {generation} (encrypted)")
    assert "- C long" in r.stdout and "~ A long" in r.stdout  # the preview started from the replayed state
    assert _positions(state, key) == {("X", "long"): pos("X", "7"), ("A", "long"): pos("A", "9")}


def test_import_failure_at_any_step_is_all_or_nothing(state: Path, key: bytes, key_file: Path, tmp_path: Path) -> None:
    """EIO injected at each file operation of an import (fresh copy each time): the state on disk is either
    the old one ("nothing was imported") or the whole new one; the message says which; a rerun succeeds."""
    src = _import_doc(tmp_path)
    template = tmp_path / "template"
    copy_tree(state, template)
    old = _positions(state, key)
    new = {("X", "long"): pos("X", "7"), ("A", "long"): pos("A", "9")}
    rec = Recorder()
    with fs.use(rec):
        assert run([*keyed(state, key_file), "import", str(src), "--yes"]).exit_code == 0
    total = len(rec.calls)
    assert total >= 8, rec.calls
    outcomes = set()
    for k in range(1, total + 1):
        work = tmp_path / f"run{k}"
        copy_tree(template, work)
        with fs.use(Recorder(fail_at=k)):
            r = run([*keyed(work, key_file), "import", str(src), "--yes"])
        on_disk = _positions(work, key)
        assert on_disk in (old, new), (k, rec.calls[k - 1])
        if r.exit_code == 0:
            assert on_disk == new, k
            outcomes.add("ok")
            continue
        assert r.exit_code == 1, (k, r.stderr)
        line = err_line(r)
        if on_disk == old:
            assert "nothing was imported" in line or "the previous file is intact" in line, (k, line)
            outcomes.add("nothing")
        else:
            assert "the import IS on disk" in line, (k, line)
            outcomes.add("landed")
        again = run([*keyed(work, key_file), "import", str(src), "--yes"])
        assert again.exit_code == 0 and _positions(work, key) == new, (k, again.stderr)
    assert "nothing" in outcomes and "landed" in outcomes


def test_import_fault_at_the_rename_leaves_everything_as_it_was(state: Path, key: bytes, key_file: Path, tmp_path: Path) -> None:
    """The rename of the new snapshot fails: exact Error line; the state file and the journal byte-identical,
    no temp left (the .bak is a link to the unchanged state file, as before every save)."""
    src = _import_doc(tmp_path)
    before = files_of(state)

    class FailRename(fs.FileOps):
        def replace(self, src_: Any, dst: Any) -> None:
            if str(dst) == str(state / "positions.json"):
                raise OSError(errno.EIO, "injected I/O error")
            super().replace(src_, dst)

    with fs.use(FailRename()):
        r = run([*keyed(state, key_file), "import", str(src), "--yes"])
    assert r.exit_code == 1
    assert err_line(r) == (
        f"Error: {state / 'positions.json'}: rename failed (EIO: injected I/O error); the previous file is intact; "
        "free space or fix permissions and save again (`posstate doctor` checks the directory); "
        "nothing was imported (the state on disk is unchanged)"
    )
    after = files_of(state)
    for name in ("positions.json", "positions.json.journal"):
        assert after[state / name] == before[state / name], name
    assert after[state / "positions.json.bak"] == before[state / "positions.json"]  # .bak = the previous file
    assert not [p for p in after if p not in before and p.name != "positions.json.bak"]  # no temp left


# ------------------------------------------------------------------------------------------ history
def test_history_lists_changes_with_old_and_new(state: Path, key_file: Path) -> None:
    """history: one row per change with old -> new; --symbol filters; --json has the full values."""
    r = run([*keyed(state, key_file), "history"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"{state / 'positions.json.journal'}: 5 changes"
    rows = lines[3:]
    assert len(rows) == 5
    assert rows[0].split()[3:] == ["set_position", "A|long", "contracts:", '"1"', "->", '"3"']
    assert rows[1].split()[3:5] == ["delete_position", "B|long"] and rows[1].endswith("-> (absent)")
    assert '"contracts":"2"' in rows[1]
    assert rows[4].split()[3:] == ["set_symbol_metadata", "(txn)", "A", "n:", "1", "->", "2"]
    only = run([*keyed(state, key_file), "history", "--symbol", "C"])
    assert only.stdout.splitlines()[0].endswith("1 change for C") and len(only.stdout.splitlines()) == 4
    j = json.loads(run([*keyed(state, key_file), "history", "--json"]).stdout)
    assert [e["op"] for e in j] == [
        "set_position",
        "delete_position",
        "set_symbol_metadata",
        "set_position",
        "set_symbol_metadata",
    ]
    assert j[1]["old"]["contracts"] == "2" and j[1]["new"] is None and j[0]["time"].endswith("Z")
    assert j[3]["transaction"] and j[3]["old"] is None and j[3]["new"]["symbol"] == "C"


def test_history_without_journal_and_damaged(tmp_path: Path, key: bytes, key_file: Path, state: Path) -> None:
    """No journal: a clear line, exit 0. Damaged journal: one Error line, exit 1. Another key: exit 3."""
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run([*keyed(empty, key_file), "history"])
    assert r.exit_code == 0
    assert r.stdout.strip() == (
        f"no journal at {empty / 'positions.json.journal'}: no changes recorded since the last snapshot (durability 'sync')"
    )
    other = run(["--state-dir", str(state), "--key-file", str(write_key(tmp_path / "o.key", generate_key())), "history"])
    assert other.exit_code == 3 and "written with key id" in err_line(other)
    flip_middle_record(state / "positions.json.journal")
    bad = run([*keyed(state, key_file), "history"])
    assert bad.exit_code == 1
    assert err_line(bad).startswith(
        f"Error: {state / 'positions.json.journal'}: record {FIRST_RECORD} at byte {jf.HEADER_SIZE} is damaged"
    )


# ------------------------------------------------------------------------------------------ doctor
def test_doctor_ok_on_a_local_directory(tmp_path: Path) -> None:
    """A real doctor run (fs type, dir fsync, lock via a child, space, permissions, crash/fault self-test):
    exit 0, no key needed, nothing left behind; --json has the verdict and every finding."""
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    r = run(["--state-dir", str(d), "doctor"])
    assert r.exit_code == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "verdict: ok - safe for posstate state"
    checks = ("filesystem", "directory fsync", "exclusive lock", "free space", "permissions", "fault self-test")
    checks += ("crash self-test",)
    for check in checks:
        assert any(f"] {check}" in line for line in lines), check
    assert list(d.iterdir()) == []
    j = json.loads(run(["--state-dir", str(d), "doctor", "--json"]).stdout)
    assert j["verdict"] == "ok" and j["ok"] is True and j["state_dir"] == str(d)
    assert {f["check"] for f in j["findings"]} >= {"exclusive lock", "crash self-test", "fault self-test"}
    assert all(f["status"] in ("ok", "warn") for f in j["findings"])


def test_doctor_unsafe_exits_1(tmp_path: Path) -> None:
    """A directory writable by others: UNSAFE, exit 1 and one Error line. A state dir under a file is refused
    (exit 1), a state dir that is a file is a usage error (exit 2), each with one Error line."""
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    r = run(["--state-dir", str(loose), "doctor", "--json"])
    assert r.exit_code == 1
    assert json.loads(r.stdout)["verdict"] == "unsafe"
    assert err_line(r) == (
        f"Error: {loose}: unsafe for posstate state: 1 finding(s) marked UNSAFE (first: permissions: {loose} is "
        "writable by group or others (mode 777); chmod 700 it); fix them and rerun `posstate doctor`"
    )
    afile = tmp_path / "afile"
    afile.write_text("x")
    under = run(["--state-dir", str(afile / "state"), "doctor"])
    assert under.exit_code == 1
    assert err_line(under) == (
        f"Error: {afile / 'state'}: a parent of this path is a file, not a directory; choose a directory with --state-dir"
    )
    itself = run(["--state-dir", str(afile), "doctor"])  # click refuses a file for --state-dir: usage error
    assert itself.exit_code == 2
    assert err_line(itself).startswith("Error: Invalid value for '--state-dir'")


# ------------------------------------------------------------------------------------------ repair / rekey
def test_repair_recovers_a_damaged_journal(state: Path, key: bytes, key_file: Path) -> None:
    """repair no longer calls a state with a damaged journal valid: --dry-run shows the recovery, the real
    run recovers as a load would (journal to quarantine) and show/validate then pass."""
    as_if_killed(StateConfig.in_dir(state))  # what the journal alone gives (no close backup, issue 15.2)
    flip_middle_record(state / "positions.json.journal")
    before = files_of(state)
    dry = run([*keyed(state, key_file), "repair", "--dry-run"])
    assert dry.exit_code == 0, dry.stderr
    assert dry.stdout.splitlines()[0].startswith(f"{state / 'positions.json'}: the snapshot is valid but its journal is not")
    assert files_of(state) == before
    r = run([*keyed(state, key_file), "repair", "--yes"])
    assert r.exit_code == 0, r.stderr
    assert any(p.name.startswith("positions.json.journal.") for p in (state / "quarantine").iterdir())
    assert run([*keyed(state, key_file), "validate"]).exit_code == 0
    assert _positions(state, key) == {("A", "long"): pos("A", "1"), ("B", "long"): pos("B", "2")}


def test_rekey_folds_the_journal_first(state: Path, key: bytes, key_file: Path, tmp_path: Path) -> None:
    """rekey with journal records not yet in the snapshot: they are saved into it first, so after the rekey
    a load with the new key has every change (the journal under the old key would be refused)."""
    expected = _positions(state, key)
    new_key = generate_key()
    new_file = write_key(tmp_path / "new.key", new_key)
    dry = run([*keyed(state, key_file), "rekey", "--new-key-file", str(new_file), "--dry-run"])
    assert dry.exit_code == 0 and "4 journal records not yet in the state file" in dry.stdout
    r = run([*keyed(state, key_file), "rekey", "--new-key-file", str(new_file), "--yes"])
    assert r.exit_code == 0, r.stderr
    assert not (state / "positions.json.journal").exists()
    with PositionStateManager(config(state), key=new_key) as m:
        assert m.load_positions() == expected
    assert run(["--state-dir", str(state), "--key-file", str(new_file), "validate"]).exit_code == 0


def test_rekey_sets_a_redundant_journal_aside(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """A journal the snapshot already holds (after a save) is moved to quarantine, not left under the old key."""
    d = tmp_path / "state"
    with PositionStateManager(config(d), key=key) as m:
        m.set_position(pos("A"))
        m.save()
    old_journal = (d / "positions.json.journal").read_bytes()
    new_key = generate_key()
    r = run([*keyed(d, key_file), "rekey", "--new-key-file", str(write_key(tmp_path / "n.key", new_key)), "--yes"])
    assert r.exit_code == 0, r.stderr
    assert not (d / "positions.json.journal").exists()
    assert [p.read_bytes() for p in (d / "quarantine").iterdir()] == [old_journal]
    with PositionStateManager(config(d), key=new_key) as m:
        assert m.load_positions() == {("A", "long"): pos("A")}


def test_validate_without_key_checks_the_journal_framing(state: Path) -> None:
    """No key: exit 3 as before, and the journal line says framing and checksums hold, contents NOT checked;
    framing damage without a key is still found (exit 1)."""
    r = run(["--state-dir", str(state), "validate"])
    assert r.exit_code == 3
    assert "  -     journal        4 records, framing and checksums ok; contents NOT checked (no key)" in r.stdout.splitlines()
    flip_middle_record(state / "positions.json.journal")
    bad = run(["--state-dir", str(state), "validate"])
    assert bad.exit_code == 1 and any(x.startswith("  FAIL  journal") for x in bad.stdout.splitlines())
    assert err_line(bad).startswith(f"Error: {state / 'positions.json.journal'}: damage at byte {jf.HEADER_SIZE}")


def test_validate_and_history_count_the_same_records_after_a_save(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """newcomer leftovers 1: after a save, validate splits its record count (changes, fold) as history counts them."""
    with PositionStateManager(config(tmp_path / "s"), key=key) as m:
        m.set_position(pos("A", "1"))
        m.set_position(pos("B", "2"))
        m.save()  # records 1 and 2 are changes, record 3 the save's fold record
    v = run([*keyed(tmp_path / "s", key_file), "validate"])
    assert v.exit_code == 0, v.stderr
    assert (
        "  ok    journal        3 records (2 change records, 1 fold record) of an older journal, all held by the "
        "snapshot (ignored; replaced by the next change)" in v.stdout.splitlines()
    )
    assert json.loads(run([*keyed(tmp_path / "s", key_file), "validate", "--json"]).stdout)["journal"]["folds"] == 1
    h = run([*keyed(tmp_path / "s", key_file), "history"])
    assert h.stdout.strip().endswith("since the last snapshot (2 older change records already in the snapshot)"), h.stdout


def test_import_says_what_it_does_with_bot_metadata(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """newcomer leftovers 2: import's --help and result line name the bot metadata: taken from the document,
    or cleared (loudly) when the document holds none while the state does; never dropped silently."""
    assert "bot metadata" in " ".join(run(["import", "--help"]).stdout.split())
    state = tmp_path / "s"
    with PositionStateManager(config(state), key=key) as m:
        m.set_position(pos("A", "1"))
        m.set_symbol_metadata("A", {"entries": 2, "trail": "0.5", "first_open_ms": 1})
        m.set_bot_metadata({"step": 41, "regime": "trend"})
    out = tmp_path / "e.json"
    assert run([*keyed(state, key_file), "export", "--out", str(out)]).exit_code == 0
    with PositionStateManager(config(state), key=key) as m:
        m.set_bot_metadata({"step": 0})
        m.set_symbol_metadata("A", {"entries": 0})
    r = run([*keyed(state, key_file), "import", str(out), "--yes"])
    assert r.exit_code == 0, r.stderr
    assert "imported 1 positions, metadata for 1 symbols and the bot metadata (2 keys) into" in r.stderr
    with PositionStateManager(config(state), key=key) as m:
        assert m.get_bot_metadata() == {"step": 41, "regime": "trend"}
        assert m.get_symbol_metadata("A") == {"entries": 2, "trail": "0.5", "first_open_ms": 1}
    doc = json.loads(out.read_text())
    del doc["bot_metadata"]
    doc["schema_version"] = 1
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(doc))
    r = run([*keyed(state, key_file), "import", str(bare), "--yes"])
    assert r.exit_code == 0, r.stderr
    assert "warning: the document holds no bot metadata: the state's bot metadata (2 keys) is cleared" in r.stderr
    with PositionStateManager(config(state), key=key) as m:
        assert not m.get_bot_metadata()
