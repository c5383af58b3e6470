"""Background compaction (issue 14): the journal rotates to a new segment on the caller's thread (O(1)), and
a background thread writes the snapshot of the state at the rotation point, then retires the old segment.

The view of the state at the rotation point costs the caller nothing: from the rotation on, the journal keeps
the pre-image of every key a change touches (``Journal.remember``, O(1) per change); the background thread
copies the dicts of memory (each copy is one C call, atomic under the GIL, and takes no lock) and then puts
those pre-images back. Whatever a key held when its dict was copied, its pre-image was kept before it first
changed, so the view is exactly the state the snapshot names (journal id of the new segment, sequence number
of the rotation). The thread never takes the manager's lock: a caller holding it may wait for one attempt.

A failed attempt is reported (``error`` event, log) and retried with a growing pause (1 s doubling to 60 s);
meanwhile the writers keep appending to the new segment (never a second rotation, so at most two segments).
``save()``, a load and a synchronous compaction first wait for the attempt in flight, then give the pending
compaction up (a snapshot of memory holds both segments). ``close()`` waits a bounded time. docs/JOURNAL.md,
"Background compaction", has the sequence, the crash analysis and what close() leaves behind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from posstate.core.config import StateConfig
from posstate.core.errors import PosStateError
from posstate.core.events import StatsLogger
from posstate.manager import procompaction as _proc
from posstate.manager.workers import Worker
from posstate.model import document as _document
from posstate.model import ops as _jops
from posstate.model.document import StateData
from posstate.model.ops import Entries, Undo
from posstate.storage import statefile as _statefile
from posstate.storage import turns as _turns

log = logging.getLogger("posstate")

#: First pause before retrying a failed background compaction, doubled per failure up to RETRY_MAX (seconds).
RETRY_FIRST = 1.0
RETRY_MAX = 60.0
#: How long close() waits for a background compaction in flight before leaving the segments to the next load.
CLOSE_WAIT = 30.0


def _pause() -> None:
    """Between two slices of the snapshot's serialization: hand the GIL to any thread that waits for it (the
    bot's set_position after its fdatasync), so no caller waits for more than one slice, and the background
    turn to a backup waiting for it (posstate/storage/turns.py; issue 14.3)."""
    _turns.pause()


_MISSING = object()
_K = TypeVar("_K")
_V = TypeVar("_V")


def _copy(d: dict[_K, _V], size: int = 4096, pause: Callable[[], None] = _pause) -> dict[_K, _V]:
    """A copy of *d*, which other threads may change meanwhile, *size* keys at a time with the GIL handed
    back between slices. Each value is what its key held at some moment after the rotation: the caller puts
    the pre-images back over it."""
    if len(d) <= size:
        return dict(d)
    out: dict[_K, _V] = {}
    keys = list(d)  # one C call: safe while other threads insert or delete
    for i in range(0, len(keys), size):
        for k in keys[i : i + size]:
            v = d.get(k, _MISSING)
            if v is not _MISSING:
                out[k] = v  # type: ignore[assignment]
        pause()
    return out


class _Cancelled(Exception):
    """The job was given up (a save, a load or close) while it ran: stop before the next file step."""


class Job:
    """One background compaction: the live state it copies, the snapshot's journal entry and generation."""

    __slots__ = (
        "attempts",
        "cancelled",
        "done",
        "entries",
        "error",
        "generation",
        "journal",
        "live",
        "positions",
        "proc_failed",
        "sealed",
        "view",
        "worker",
    )

    def __init__(
        self, live: StateData, entries: Entries, generation: int, journal: dict[str, Any], sealed: str | None = None
    ) -> None:
        self.live = live
        self.entries = entries
        self.generation = generation
        self.journal = journal
        self.view: tuple[StateData, Entries] | None = None
        self.attempts = 0
        self.cancelled = False
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.sealed = sealed  # the journal id of the sealed segment (what a compaction worker replays)
        self.worker: Worker | None = None  # the worker process of the attempt in flight
        self.positions = len(live.positions)  # at the rotation (the lock is held): a worker's snapshot must agree
        self.proc_failed = 0  # attempts of this job a worker failed: from WORKER_TRIES on, they compact in process


class BackgroundCompaction(_proc.ProcessCompaction):
    """rotate on the caller's thread, write the snapshot on a background thread; compact(wait=True)."""

    _bg_cond: threading.Condition
    _bg_job: Job | None
    _bg_busy: bool  # an attempt is in flight (between its first and last file step)
    _bg_thread: threading.Thread | None
    _bg_wake: threading.Event

    def __init__(
        self,
        config: StateConfig | None = None,
        *,
        key: bytes | str | None = None,
        passphrase: str | None = None,
        stats_logger: StatsLogger | None = None,
    ) -> None:  # the manager's documented signature, spelled out for help(), IDEs and mypy
        self._bg_init()
        super().__init__(config, key=key, passphrase=passphrase, stats_logger=stats_logger)

    def _bg_init(self) -> None:
        self._bg_cond = threading.Condition()
        self._bg_job = None
        self._bg_busy = False
        self._bg_thread = None
        self._bg_wake = threading.Event()
        self._kept = None

    # ------------------------------------------------------------------ caller's thread (manager lock held)
    def _rotate_journal(self) -> None:
        """The journal passed a threshold: rotate to a new segment and hand the snapshot to the thread. O(1)."""
        generation = max(self._state.generation, self._highest_generation) + 1
        sealed = self._journal.journal_id  # the segment being sealed (rotate() leaves it the current one)
        meta = self._journal.rotate(generation)
        if meta is None:
            return
        self._highest_generation = generation  # later changes get revisions above the snapshot's generation
        job = Job(self._state, self._entries, generation, meta, sealed)
        with self._bg_cond:
            self._bg_job = job
        self._bg_start()

    def compact(self, *, wait: bool = True, timeout: float | None = None) -> bool:
        """Fold the journal into a snapshot now (journal modes; ``"snapshot"`` mode: :meth:`save` when dirty).

        Starts a background compaction (or retries a pending one at once) and, with *wait*, returns once its
        snapshot is durable and the old segment retired: True, or False when *timeout* passed first. A
        failure of that attempt is raised (the compaction stays pending and is retried later). From the
        background compaction's own thread (a ``stateSaved`` handler) it cannot wait for itself: it starts the
        compaction and returns False."""
        if not self._journal.active:
            with self._lock:
                self._check_writable("compact")
                self._ensure_loaded()
                if self._dirty:
                    self.save()
            return True
        self._journal.drain()  # group mode: sync the records already written, outside the manager's lock
        with self._lock:
            self._check_writable("compact")
            self._ensure_loaded()
            job = self._bg_job
            if job is None:
                if self._journal.records == 0 and not self._journal.failed:
                    return True  # nothing after the snapshot
                self._rotate_journal()
                job = self._bg_job
                if job is None:  # no rotation possible now (no open segment, or records pending): do it here
                    self._commit(self._state.copy(), dict(self._entries))
                    return True
        if not wait:
            self._bg_wake.set()
            return True
        if threading.current_thread() is self._bg_thread:  # a stateSaved handler: only this thread can write it
            self._bg_wake.set()
            return False
        return self._await_job(job, None if timeout is None else time.monotonic() + timeout)

    def _await_job(self, job: Job, deadline: float | None = None) -> bool:
        """Without the manager's lock: wait for *job*'s next attempt. True once it finished or was given up
        (a save, a load, close), False at *deadline* (monotonic); raises what a failed attempt raised."""
        with self._bg_cond:  # an attempt already in flight may have started before the call: wait for the next one
            while self._bg_busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._bg_cond.wait(left)
            if self._bg_job is not job:
                return True  # finished (or given up for a snapshot of memory) meanwhile
            done = job.done
        self._bg_wake.set()
        if not done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
            return False
        if job.error is not None and self._bg_job is job:
            raise job.error
        return True

    def _halt_compaction(self, *, timeout: float | None = None) -> bool:
        """Give up the pending background compaction: wait for the attempt in flight (at most *timeout*),
        then stop it. Returns False when the attempt was still running at *timeout*. (A save, a load, close.)"""
        cond = getattr(self, "_bg_cond", None)
        if cond is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with cond:
            job = self._bg_job
            if job is None:
                return True
            job.cancelled = True
            if job.worker is not None:
                job.worker.kill()  # SIGKILL: its attempt ends at once, and removes the worker's temp
            _turns.wake()  # an attempt waiting for the background turn gives up at once
            while self._bg_busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                cond.wait(left)
            self._bg_job = None
            job.done.set()
        self._bg_wake.set()  # a thread pausing before a retry finds no job and ends
        self._journal.cancel_rotation()
        return True

    def _finish_compaction(self, *, timeout: float) -> bool:
        """close(): wake a pending compaction and wait for it, at most *timeout* seconds in all; then stop it,
        and the kept worker. False when an attempt was still writing at the deadline (the segments stay; a
        load replays them)."""
        try:
            return self._finish_pending(timeout=timeout)
        finally:
            self._drop_kept()

    def _finish_pending(self, *, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        job = self._bg_job
        if job is not None and job.attempts == 0 and threading.current_thread() is not self._bg_thread:
            self._bg_wake.set()  # (from a handler on the compaction thread it cannot run: given up at once)
            job.done.wait(timeout)
        if not self._halt_compaction(timeout=max(0.0, deadline - time.monotonic())):
            return False
        thread = self._bg_thread  # still running the after-save hook of a finished compaction: let it end
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
            return not thread.is_alive() or self._bg_job is None  # no job: its handlers run on (they may want the lock)
        return True

    # ----------------------------------------------------------------------------------- background thread
    def _bg_start(self) -> None:
        self._bg_wake.set()
        with self._bg_cond:
            if self._bg_thread is None:
                t = threading.Thread(target=self._bg_loop, name=f"posstate-compact-{self._path.name}", daemon=True)
                self._bg_thread = t
                t.start()

    def _bg_loop(self) -> None:
        pause: float | None = None
        while True:
            self._bg_wake.wait(pause)
            self._bg_wake.clear()
            with self._bg_cond:
                job = self._bg_job
                if job is None or self._closed:
                    self._bg_thread = None
                    return
                self._bg_busy = True
            err: BaseException | None = None
            saved: tuple[StateData, int, int] | None = None
            try:
                saved = self._bg_attempt(job)
            except (_Cancelled, _turns.Abandoned):
                pass
            except BaseException as exc:  # reported and retried; never lost: the segments hold every record
                err = exc
            with self._bg_cond:
                self._bg_busy = False
                finished = saved is not None and self._bg_job is job
                if finished and saved is not None:
                    self._note_durable(saved[0].generation)  # before any waiter wakes: a backup's fold reads it (15)
                    self._bg_job = None
                job.error = err
                failed_done = job.done
                if err is not None:  # the next attempt's waiters (compact) wait on a fresh event
                    job.done = threading.Event()
                self._bg_cond.notify_all()
            if err is not None:
                job.attempts += 1
                pause = min(RETRY_MAX, RETRY_FIRST * 2 ** (job.attempts - 1))
                log.warning(
                    "%s: background compaction failed (attempt %d, retry in %.0f s): %s", self._path, job.attempts, pause, err
                )
                self._events.emit(
                    "error", {"context": "background compaction", "error": str(err), "attempt": job.attempts, "retry_in_s": pause}
                )
                failed_done.set()  # compact(wait=True) learns of the failure; the job stays pending
                continue
            pause = None
            if job.cancelled:  # given up (close() past its deadline): a waiter (create_backup) must not wait for ever
                job.done.set()
            if finished and saved is not None:
                st, count, size = saved
                job.done.set()
                self._events.emit(
                    "stateSaved",
                    {"path": str(self._path), "generation": st.generation, "positions": count, "bytes": size, "background": True},
                )
                try:
                    self._after_save(st)
                except (PosStateError, OSError) as exc:
                    log.warning("%s: after-save hook of a background compaction failed (%s)", self._path, exc)
            with self._bg_cond:
                if self._bg_job is None:
                    self._bg_thread = None
                    return

    def _bg_attempt(self, job: Job) -> tuple[StateData, int, int]:
        """One attempt: build the view (first attempt only), encode, write the snapshot, retire the segment.
        With ``compaction="process"`` a worker process does the O(state) part (manager/procompaction.py);
        when it refuses, this attempt does it here. Returns (the state saved, its positions, its bytes)."""
        if job.cancelled:
            raise _Cancelled
        if job.view is None:  # issue 14.3: the change that rotated first writes (and syncs) its record
            self._journal.wait_segment_start()

        def check() -> None:
            if job.cancelled:
                raise _Cancelled

        def register(worker: Worker | None) -> None:
            with self._bg_cond:
                if worker is not None and job.cancelled:
                    worker.kill()
                job.worker = worker

        if job.view is None and job.proc_failed < _proc.WORKER_TRIES and self._proc_enabled():
            done = self._proc_attempt(job, check, register)
            if done is not None:
                return done

        # The O(state) part holds the process's one background turn: a backup's full check waits asleep
        # meanwhile instead of competing for the processor and the GIL (posstate/storage/turns.py). Each slice
        # is freed before the next: no collector pass over the heap (with the collector on, the slices'
        # survivors start full passes over the whole state, 80 ms at 100,000 positions, on any thread).
        # A save, load or close that gives the job up stops it while it waits for the turn
        # (turns.Abandoned) or at its next slice, never after the whole O(state) encode.
        def pause() -> None:
            if job.cancelled:
                raise _Cancelled
            _pause()

        with _turns.turn(abandon=lambda: job.cancelled), _document.pause_gc():
            if job.view is None:
                job.view = self._bg_view(job, pause)
            st, entries = job.view
            if self._files.tombstone_floor is not None:
                from posstate.model import merge as _merge

                _merge.drop_old_tombstones(st, floor=self._files.tombstone_floor)
            st, encoded = _statefile.encode(
                st,
                keyring=self._write_keyring,
                compression_level=self.config.compression_level if self.config.compression else None,
                entries=entries,
                pause=pause,
            )
        if job.cancelled:
            raise _Cancelled
        self._writer_lock.check()
        self._write_main(encoded)
        self._expected_on_disk = {encoded.checksum}
        if job.cancelled:
            raise _Cancelled
        self._journal.retire_segment()
        return st, len(st.positions), len(encoded.data)

    def _bg_view(self, job: Job, pause: Callable[[], None] = _pause) -> tuple[StateData, Entries]:
        live = job.live
        # The dicts are copied a slice of keys at a time with the GIL handed back between slices (issue 14.3),
        # without the manager's lock, while writers go on: the pre-images put back every key changed since
        # the rotation, whatever it held when its slice was copied (a key added since is removed again).
        view = StateData(
            generation=job.generation,
            written_at=live.written_at,
            writer=dict(live.writer),
            account=dict(live.account) if live.account is not None else None,
            positions=_copy(live.positions, pause=pause),
            position_revs=_copy(live.position_revs, pause=pause),
            metadata=_copy(live.metadata, pause=pause),
            metadata_revs=_copy(live.metadata_revs, pause=pause),
            position_tombstones=_copy(live.position_tombstones, pause=pause),
            metadata_tombstones=_copy(live.metadata_tombstones, pause=pause),
            journal=dict(job.journal),
            # Issue 15.7: replaced whole by set_bot_metadata (never changed in place); a change since the
            # rotation is put back by its pre-image below, with its revision.
            bot_metadata=live.bot_metadata,
            bot_metadata_rev=live.bot_metadata_rev,
        )
        entries = _copy(job.entries, pause=pause)
        pre: list[Undo] = self._journal.stop_capture()
        for undo in pre:
            _jops.undo(view, entries, undo)
        return view, entries
