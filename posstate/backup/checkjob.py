"""The backup-check worker (issue 14): the full checks a prune needs (decrypt + validate every backup not in
the verified cache), in a process of its own, so that the bot's process never spends O(state) processor time
on them.

Run as ``python -m posstate.backup.checkjob`` by posstate/manager/procheck.py, with the compaction worker's
plumbing (posstate/manager/procompaction.py: ``subprocess``, never ``fork()``; ``-P``; a minimal environment;
the keys only in the job on its stdin pipe; nice 19; one framed JSON answer on stdout, nothing secret on
stdout or stderr). For each file of the job, in order: its probe (trailer, size, mtime, ctime, inode:
posstate/backup/verified.py), its full check (posstate/backup/backups.py ``full_check``, the check a prune
runs in process), its probe again; the verdict is reported with the first probe, and nothing is reported for
a file that changed while it was read. It reads only; it never writes, renames or deletes anything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from posstate.backup import backups as _backups
from posstate.backup.verified import probe
from posstate.journal.compactjob import _hook
from posstate.journal.jobpipe import answer, failure, prepare_process, read_job, yield_processor
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

#: The most files one job may name.
MAX_FILES = 4096


def check(job: dict[str, Any], keyring: Keyring | None) -> list[dict[str, Any]]:
    """The verdict of each file of *job* that was unchanged while it was checked (see the module's docstring)."""
    options = _statefile.ReadOptions(
        keyring=keyring,
        max_document_bytes=int(job["max_document_bytes"]),
        clock_skew=float(job["clock_skew"]),
        require_encryption=bool(job["require_encryption"]),
    )
    paths = [str(p) for p in job["paths"]][:MAX_FILES]
    parent = int(job["parent_pid"])
    out: list[dict[str, Any]] = []
    for text in paths:
        if os.getppid() != parent:  # the manager is gone: nobody will read the answer
            os._exit(3)
        path = Path(text)
        parsed = _backups.parse_name(path.name)
        seen = probe(path)
        if parsed is None or seen is None:
            continue
        info, _ = _backups.full_check(_backups.inspect_file(path, parsed[0], parsed[1]), options=options)
        if probe(path) != seen:
            continue  # changed while it was read: no verdict (the manager checks it itself)
        out.append(  # no reason: the manager never reads it, and each verdict must stay small (procheck.CHECK_CHUNK)
            {
                "name": path.name,
                "valid": info.valid,
                "probe": [seen.trailer.hex(), seen.size, seen.mtime_ns, seen.ctime_ns, seen.inode],
            }
        )
        _hook("checked")
    return out


def main() -> int:
    prepare_process()
    out: dict[str, Any]
    try:
        job, keyring = read_job(sys.stdin.buffer)
        yield_processor(int(job.get("nice", 19)))
        _hook("check")
        out = {"ok": True, "verdicts": check(job, keyring)}
    except Exception as exc:  # one line of the answer: the prune fails and is retried
        out = {"ok": False, "error": failure(exc)}
    return 0 if answer(out) else 3


if __name__ == "__main__":
    sys.exit(main())
