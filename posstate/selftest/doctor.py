"""``posstate doctor``: is this directory a safe place for a bot's state?

:func:`run_doctor` checks the directory a user will run in: the file-system type (network and RAM file
systems are unsafe), whether a directory fsync works, whether the writer lock is exclusive against another
process, free space, the permissions of the directory and its files, and runs a short crash and fault
self-test in a scratch subdirectory (real child processes killed with SIGKILL at each step of a save; ENOSPC
and EIO injected through the harness). It returns a frozen :class:`DoctorReport`; :func:`format_report`
renders it. Nothing outside the scratch subdirectory is written; the scratch directory is removed after.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Literal

from posstate.core.config import StateConfig
from posstate.core.errors import PersistenceError, PosStateError
from posstate.manager.manager import PositionStateManager
from posstate.model.position import Position
from posstate.selftest.harness import Fault, HarnessOps
from posstate.storage import fileops as fs
from posstate.storage.crypto import generate_key
from posstate.storage.lock import WriterLock, is_locked

Status = Literal["ok", "warn", "unsafe"]

#: File systems whose fsync or locking cannot be trusted for crash safety (or that a reboot erases).
UNSAFE_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "sshfs", "9p", "ceph", "glusterfs", "fuse.glusterfs", "tmpfs", "ramfs"}
)
#: Below this much free space a save of a large state can fail with ENOSPC.
DEFAULT_MIN_FREE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    status: Status
    detail: str


@dataclass(frozen=True, slots=True)
class DoctorReport:
    """What the doctor found; ``verdict`` is "unsafe" when any finding is unsafe."""

    state_dir: Path
    filesystem: str
    mount_point: str
    findings: tuple[Finding, ...]

    @property
    def verdict(self) -> Literal["ok", "unsafe"]:
        return "unsafe" if any(f.status == "unsafe" for f in self.findings) else "ok"

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


def mount_of(path: Path, mounts_text: str | None = None) -> tuple[str, str]:
    """(file-system type, mount point) of *path*, from /proc/mounts (longest matching mount point)."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "unknown", "?"
    real = os.path.realpath(path)
    best = ("unknown", "?")
    best_len = -1
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) > best_len:
            best, best_len = (parts[2], mnt), len(mnt)
    return best


def _existing(path: Path) -> Path:
    p = path
    while not fs.exists(p) and p.parent != p:
        p = p.parent
    return p


def _check_filesystem(fstype: str, mnt: str) -> Finding:
    if fstype in UNSAFE_FILESYSTEMS or fstype.startswith("nfs"):
        why = "is erased by a reboot" if fstype in ("tmpfs", "ramfs") else "may not honour fsync or exclusive locks"
        return Finding("filesystem", "unsafe", f"{fstype} at {mnt} {why}; use a local disk (ext4, xfs, btrfs, zfs)")
    if fstype == "unknown":
        return Finding("filesystem", "warn", "file-system type unknown (no /proc/mounts)")
    return Finding("filesystem", "ok", f"{fstype} at {mnt}")


def _check_dir_fsync(scratch: Path) -> Finding:
    try:
        fs.fsync_dir(scratch)
    except OSError as exc:
        return Finding(
            "directory fsync",
            "unsafe",
            f"fsync of a directory fails ({errno.errorcode.get(exc.errno or 0, exc)}): renames are not durable",
        )
    return Finding("directory fsync", "ok", "works")


_PROBE = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "try:\n"
    "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "except OSError:\n"
    "    sys.exit(3)\n"
    "sys.exit(0)\n"
)


def _check_lock(scratch: Path) -> Finding:
    lock_path = scratch / "probe.lock"
    try:
        lock = WriterLock(lock_path, state_path=scratch / "positions.json")
    except PosStateError as exc:
        return Finding("exclusive lock", "unsafe", f"cannot take the writer lock: {exc}")
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(lock_path)], capture_output=True, timeout=60, check=False)
    finally:
        lock.release()
    if proc.returncode == 3:
        return Finding("exclusive lock", "ok", "another process is refused while the lock is held")
    if proc.returncode == 0:
        return Finding(
            "exclusive lock", "unsafe", "another process took the lock while it was held: two writers could run at once"
        )
    return Finding("exclusive lock", "warn", f"lock probe failed (rc {proc.returncode})")


def _check_space(path: Path, min_free: int) -> Finding:
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return Finding("free space", "warn", f"cannot stat the file system ({exc.strerror})")
    free = st.f_bavail * st.f_frsize
    text = f"{free / 1024 / 1024:.0f} MiB free"
    if free < min_free:
        return Finding("free space", "unsafe", f"{text}, below {min_free // 1024 // 1024} MiB: saves may fail with ENOSPC")
    if free < 10 * min_free:
        return Finding("free space", "warn", f"{text}; getting low")
    return Finding("free space", "ok", text)


def _check_permissions(state_dir: Path) -> list[Finding]:
    out: list[Finding] = []
    if not fs.exists(state_dir):
        return [Finding("permissions", "ok", f"{state_dir} does not exist yet; it will be created 0700")]
    cfg = StateConfig.in_dir(state_dir)
    targets = [state_dir, cfg.state_path, cfg.bak_path, cfg.journal_path]
    backups = cfg.backup_path
    try:
        names = fs.listdir(backups)
    except OSError:
        names = []
    else:
        targets.append(backups)
    targets.extend(backups / n for n in sorted(names))
    bad = []
    for p in targets:
        try:
            st = fs.lstat(p)
        except OSError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        fix = 700 if stat.S_ISDIR(st.st_mode) else 600
        if stat.S_ISLNK(st.st_mode):
            bad.append(("unsafe", f"{p} is a symlink (posstate never follows one)"))
        elif mode & 0o022:
            bad.append(("unsafe", f"{p} is writable by group or others (mode {mode:o}); chmod {fix} it"))
        elif mode & 0o044:
            bad.append(("warn", f"{p} is readable by group or others (mode {mode:o}); chmod {fix} it"))
        if st.st_uid != os.getuid():
            bad.append(("warn", f"{p} belongs to uid {st.st_uid}, not to this user ({os.getuid()})"))
    for status, detail in bad:
        out.append(Finding("permissions", status, detail))  # type: ignore[arg-type]
    if not bad:
        out.append(Finding("permissions", "ok", "directory 0700 and files 0600 (or stricter)"))
    return out


def _pos(n: int) -> Position:
    return Position(symbol="DOCTOR/TEST", side="long", contracts=Decimal(n), entry_price=Decimal("1.5"))


def _fault_self_test(scratch: Path) -> Finding:
    """ENOSPC and EIO injected at the write, the fsync and the rename of a save: typed error, old state intact."""
    key = generate_key()
    cfg = StateConfig.in_dir(scratch / "faults", backup_interval=1e9)
    problems = []
    cases = 0
    with PositionStateManager(cfg, key=key) as m:
        m.load_positions()
        m.save_positions([_pos(1)])
        for code in (errno.ENOSPC, errno.EIO):
            for op in ("write", "fsync", "replace"):
                cases += 1
                try:
                    with fs.use(HarnessOps(fault=Fault(at=1, errno=code, persistent=True, ops=frozenset({op})))):
                        m.save_positions([_pos(2)])
                    problems.append(f"{op}: an injected error was not reported")
                except PersistenceError:
                    pass
                if m.get_positions() != {_pos(1).key: _pos(1)}:
                    problems.append(f"{op}: memory changed after a failed save")
        m.save_positions([_pos(3)])
    with PositionStateManager(cfg, key=key) as m2:
        if m2.load_positions() != {_pos(3).key: _pos(3)}:
            problems.append("the save after the faults did not load back")
    if problems:
        return Finding("fault self-test", "unsafe", "; ".join(problems))
    return Finding("fault self-test", "ok", f"{cases} injected faults: typed error, previous state intact, next save fine")


def _crash_self_test(scratch: Path) -> Finding:
    from posstate.selftest.crashchild import crash_matrix
    from posstate.selftest.harness import MUTATING
    from posstate.selftest.scenarios import record_save

    key = generate_key()
    # Kill around the steps that matter most (the temp fsync, the renames, the directory fsync), found by
    # recording one save here, so the self-test stays short.
    rec = record_save(scratch / "probe", key=key)
    counted = [op.name for op in rec.ops if op.name in MUTATING]
    steps = frozenset(i for i, name in enumerate(counted, 1) if name in ("fsync", "replace", "fsync_dir"))
    cases = crash_matrix(scratch / "crash", key=key, only=steps)
    bad = [c for c in cases if not c.ok]
    if not cases or bad:
        first = bad[0] if bad else None
        what = f"{first.label}: {first.error or first.loaded}" if first else "no crash case ran"
        return Finding("crash self-test", "unsafe", f"{len(bad)} of {len(cases)} kills lost the last acknowledged save ({what})")
    return Finding(
        "crash self-test",
        "ok",
        f"{len(cases)} SIGKILLs before/after the fsyncs and renames of a save: last acknowledged state always loaded",
    )


def run_doctor(state_dir: str | Path, *, self_test: bool = True, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES) -> DoctorReport:
    """Check *state_dir* (or, if it does not exist yet, the nearest existing parent) and return a report."""
    target = Path(state_dir)
    where = _existing(target)
    fstype, mnt = mount_of(where)
    findings: list[Finding] = [_check_filesystem(fstype, mnt)]
    if where != target:
        findings.append(Finding("directory", "ok", f"{target} does not exist yet; checked {where} instead"))
    elif is_locked(StateConfig.in_dir(target).lock_path):
        findings.append(Finding("directory", "ok", "a writer holds the lock now (a bot is running here)"))
    scratch = where / f".posstate-doctor-{secrets.token_hex(6)}"
    try:
        fs.mkdir(scratch, 0o700)
    except OSError as exc:
        findings.append(Finding("writable", "unsafe", f"cannot create a file in {where} ({exc.strerror})"))
        return DoctorReport(target, fstype, mnt, tuple(findings))
    try:
        findings.append(_check_dir_fsync(scratch))
        findings.append(_check_lock(scratch))
        findings.append(_check_space(where, min_free_bytes))
        findings.extend(_check_permissions(target))
        if self_test:
            for test in (_fault_self_test, _crash_self_test):
                try:
                    findings.append(test(scratch))
                except (OSError, PosStateError, RuntimeError) as exc:
                    findings.append(Finding(test.__name__.strip("_").replace("_", " "), "unsafe", f"could not run: {exc}"))
    finally:
        # Our own scratch directory, created above under a random name: safe to remove whole.
        shutil.rmtree(scratch, ignore_errors=True)
    return DoctorReport(target, fstype, mnt, tuple(findings))


def format_report(report: DoctorReport) -> str:
    """A short text report: one line per finding, then the verdict."""
    marks = {"ok": "ok    ", "warn": "warn  ", "unsafe": "UNSAFE"}
    lines = [f"posstate doctor: {report.state_dir} ({report.filesystem} at {report.mount_point})"]
    width = max((len(f.check) for f in report.findings), default=0)
    lines += [f"  [{marks[f.status]}] {f.check.ljust(width)}  {f.detail}" for f in report.findings]
    verdict = "safe for posstate state" if report.ok else "UNSAFE: fix the findings marked UNSAFE above"
    lines.append(f"verdict: {report.verdict} - {verdict}")
    return "\n".join(lines)


__all__ = ["DEFAULT_MIN_FREE_BYTES", "DoctorReport", "Finding", "format_report", "mount_of", "run_doctor"]
