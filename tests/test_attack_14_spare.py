"""Issue 14.3 attack: the spare ``.next`` segment under a slow disk, planted files and power loss.

Each test failed on the branch before its fix (named in the commit). Nothing sleeps: the tests wait on events
with a timeout, and a blocked background step is released by the test itself.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from posstate.journal.files import BLANK_MAX, next_path
from posstate.journal.spare import SPARE_THREAD, JournalSpare
from posstate.storage import fileops as fs
from tests.test_spare_segment import contracts, fill_until_spare, make, pos, settle, spare_ready

SPARE_MAX = BLANK_MAX  # the largest spare a journal prepares (the header and the next segment's zeros)


class _Reads(fs.FileOps):
    """The real OS, recording how many bytes each read of *watch* returned."""

    def __init__(self, watch: Path) -> None:
        self.watch = str(watch)
        self.sizes: list[int] = []

    def read_file(self, path: Any, limit: int | None = None, max_size: int | None = fs.DEFAULT_MAX_READ_BYTES) -> bytes:
        data = super().read_file(path, limit, max_size=max_size)
        if str(path) == self.watch:
            self.sizes.append(len(data))
        return data


def test_a_planted_huge_blank_next_is_not_read_into_memory(tmp_path: Path) -> None:
    """issue 14.3 attack: a blank (sparse) ``.next`` far larger than any spare is not read whole to decide
    it is blank (up to 1 GiB of memory and reading, on the spare's thread or the caller's): a spare is never
    larger than BLANK_MAX, so it is no spare of ours and goes to quarantine, kept."""
    with make(tmp_path) as m:
        m.set_position(pos("S0", 1))  # the state and its journal exist (a first save clears .next)
        nxt = next_path(m.config.journal_path)
        with open(nxt, "wb") as f:
            f.truncate(32 * 1024 * 1024)  # sparse: no disk space, all zeros
        rec = _Reads(nxt)
        with fs.use(rec):
            fill_until_spare(m, 1)
        assert spare_ready(m) and m._journal.spare_error is None
        assert max(rec.sizes, default=0) <= SPARE_MAX, rec.sizes
        kept = [p for p in m.config.quarantine_dir.iterdir() if ".next" in p.name]
        assert len(kept) == 1 and kept[0].stat().st_size == 32 * 1024 * 1024


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_non_regular_next_does_not_stop_the_spare(tmp_path: Path, kind: str) -> None:
    """issue 14.3 attack: a FIFO, a symlink or a directory planted at ``.next`` is moved to quarantine by the
    spare's thread (as the rotation's create path does), instead of failing every preparation (an ``error``
    event each time) until the next rotation."""
    events: list[tuple[str, dict[str, Any]]] = []
    with make(tmp_path) as m:
        m.on("error", lambda data: events.append(("error", data)))
        m.set_position(pos("S0", 1))  # the state and its journal exist (a first save clears .next)
        nxt = next_path(m.config.journal_path)
        if kind == "fifo":
            os.mkfifo(nxt, 0o600)
        elif kind == "symlink":
            (tmp_path / "elsewhere").write_bytes(bytes(100))
            nxt.symlink_to(tmp_path / "elsewhere")
        else:
            nxt.mkdir()
        fill_until_spare(m, 1)
        assert m._journal.spare_error is None, m._journal.spare_error
        assert spare_ready(m) and nxt.is_file() and not nxt.is_symlink()
        assert not [e for e in events if e[1].get("context") == "journal segment preparation"]
        assert [p for p in m.config.quarantine_dir.iterdir() if ".next" in p.name]
        assert (tmp_path / "elsewhere").exists() or kind != "symlink"


class _HoldGroupSync(fs.FileOps):
    """The real OS, except that the bot's fdatasync (the group sync) waits until the spare's thread renamed
    ``.next`` over the journal's name (or 20 s passed); records which thread synced what, and the rename."""

    def __init__(self, journal: Path, only: str | None = None) -> None:
        self.journal = journal
        self.only = only  # hold only this thread's fdatasync (default: every thread but the spare's)
        self.renamed = threading.Event()
        self.waiting = threading.Event()  # the spare's thread waits for this sync before it renames
        self.log: list[tuple[str, str, int]] = []  # (thread, operation, inode)

    def fdatasync(self, fd: int) -> None:
        name = threading.current_thread().name
        if (name == self.only) if self.only is not None else not name.startswith(SPARE_THREAD):
            for _ in range(2000):
                if self.renamed.wait(0.01) or self.waiting.is_set():
                    break
        self.log.append((name, "fdatasync", os.fstat(fd).st_ino))
        super().fdatasync(fd)

    def fsync(self, fd: int) -> None:
        self.log.append((threading.current_thread().name, "fsync", os.fstat(fd).st_ino))
        super().fsync(fd)

    def replace(self, src: Any, dst: Any) -> None:
        if Path(dst) == self.journal and Path(src) == next_path(self.journal):
            self.log.append((threading.current_thread().name, "replace", os.lstat(src).st_ino))
            super().replace(src, dst)
            self.renamed.set()
            return
        super().replace(src, dst)


def test_after_a_save_the_spare_is_renamed_over_the_journal_only_once_its_header_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.3 attack (power loss, group mode): after save() the first record goes into the spare and
    the spare's thread renames it over the journal's name. Until the group's fdatasync ran, the header is
    only in the page cache; a rename made durable (directory fsync) before it lets a power loss leave a blank
    file under the journal's name, which the next load takes for a damaged journal (recovery, quarantine).
    The rename must follow a sync of the segment's bytes."""
    with make(tmp_path, durability="group") as m:
        i = fill_until_spare(m)
        assert spare_ready(m)
        m.save()
        hold = _HoldGroupSync(m.config.journal_path)
        ready = getattr(JournalSpare, "_promote_ready", None)
        if ready is not None:

            def seen(self: JournalSpare) -> bool:
                ok = bool(ready(self))
                if not ok:
                    hold.waiting.set()
                return ok

            monkeypatch.setattr(JournalSpare, "_promote_ready", seen)
        with fs.use(hold):
            m.set_position(pos(f"S{i % 4}", 9999))  # adopts the spare; its group sync is held meanwhile
            settle(m)
        assert hold.renamed.is_set(), hold.log
        ino = next(op[2] for op in hold.log if op[1] == "replace")
        at = next(k for k, op in enumerate(hold.log) if op[1] == "replace")
        synced = [op for op in hold.log[:at] if op[2] == ino and op[1] in ("fdatasync", "fsync")]
        assert synced, f"the segment was renamed over the journal before its header was synced: {hold.log}"
        want = contracts(m)
    with make(tmp_path, durability="group") as m:
        assert contracts(m) == want and m.last_recovery is None


def test_a_rotated_segment_in_the_spare_is_renamed_over_the_journal_only_once_its_header_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.3 attack (power loss, group mode): the background compaction renames the new segment (started
    in the spare) over the journal's name once its snapshot is durable. If the group's fdatasync of the
    segment's first record has not returned by then (its wait for that record is bounded), the rename must
    wait for it: else a power loss leaves a blank file under the journal's name, which a load takes for a
    damaged journal."""
    from posstate.journal import spare as _spare

    monkeypatch.setattr(_spare, "SEGMENT_START_WAIT", 0.0)  # the compaction does not wait for the record
    with make(tmp_path, durability="group") as m:
        i = fill_until_spare(m)
        assert spare_ready(m)
        while m._journal.records < m.config.journal_max_records:
            m.set_position(pos(f"S{i % 4}", i + 1))
            i += 1
        hold = _HoldGroupSync(m.config.journal_path, only="MainThread")
        durable = getattr(JournalSpare, "_segment_durable", None)
        if durable is not None:

            def seen(self: JournalSpare) -> bool:
                ok = bool(durable(self))
                if not ok:
                    hold.waiting.set()
                return ok

            monkeypatch.setattr(JournalSpare, "_segment_durable", seen)
        with fs.use(hold):
            m.set_position(pos("S0", 9999))  # rotates into the spare; its group sync is held meanwhile
            assert m._journal.rotating or hold.renamed.is_set()
            assert m.compact(wait=True)
        assert hold.renamed.is_set(), hold.log
        ino = next(op[2] for op in hold.log if op[1] == "replace")
        at = next(k for k, op in enumerate(hold.log) if op[1] == "replace")
        synced = [op for op in hold.log[:at] if op[2] == ino and op[1] in ("fdatasync", "fsync")]
        assert synced, f"the segment was renamed over the journal before its header was synced: {hold.log}"
        want = contracts(m)
    with make(tmp_path, durability="group") as m:
        assert contracts(m) == want and m.last_recovery is None
