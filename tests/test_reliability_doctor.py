"""posstate doctor (library part): each check, its unsafe verdicts, and the text report."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from posstate.selftest.doctor import _check_dir_fsync, _check_filesystem, format_report, mount_of, run_doctor
from posstate.selftest.harness import Fault, HarnessOps
from posstate.storage import fileops as _fileops

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
server:/export /mnt/nfs nfs4 rw 0 0
tmpfs /srv/ram tmpfs rw 0 0
/dev/sdb1 /data\\040disk xfs rw 0 0
"""


def test_doctor_passes_a_local_directory_with_self_tests(tmp_path: Path) -> None:
    """On a local disk every check runs, including the crash and fault self-tests, and the verdict is ok."""
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    report = run_doctor(d)
    checks = {f.check: f.status for f in report.findings}
    for name in (
        "filesystem",
        "directory fsync",
        "exclusive lock",
        "free space",
        "permissions",
        "fault self-test",
        "crash self-test",
    ):
        assert name in checks
    assert report.verdict == "ok", format_report(report)
    assert [p.name for p in d.iterdir()] == []  # the scratch directory is gone
    text = format_report(report)
    assert "verdict: ok" in text and "crash self-test" in text


@pytest.mark.parametrize(
    ("path", "fstype", "status"),
    [
        pytest.param("/home/bot/state", "ext4", "ok", id="ext4"),
        pytest.param("/mnt/nfs/bot", "nfs4", "unsafe", id="nfs"),
        pytest.param("/srv/ram/state", "tmpfs", "unsafe", id="tmpfs"),
        pytest.param("/data disk/state", "xfs", "ok", id="escaped-space"),
    ],
)
def test_filesystem_type_from_proc_mounts(path: str, fstype: str, status: str) -> None:
    """The longest mount point wins; network and RAM file systems are unsafe."""
    found, mnt = mount_of(Path(path), MOUNTS)
    assert found == fstype
    assert _check_filesystem(found, mnt).status == status


def test_directory_fsync_failure_is_unsafe(tmp_path: Path) -> None:
    """A file system whose directory fsync fails (some network file systems) is reported unsafe."""
    with _fileops.use(HarnessOps(fault=Fault(at=1, errno=errno.EINVAL, ops=frozenset({"fsync_dir"})))):
        finding = _check_dir_fsync(tmp_path)
    assert finding.status == "unsafe" and "EINVAL" in finding.detail


def test_world_writable_state_is_unsafe(tmp_path: Path) -> None:
    """A state directory others can write to fails the doctor, naming the chmod to run."""
    d = tmp_path / "state"
    d.mkdir()
    os.chmod(d, 0o777)
    report = run_doctor(d, self_test=False)
    bad = [f for f in report.findings if f.status == "unsafe"]
    assert report.verdict == "unsafe" and bad and "chmod 700" in bad[0].detail
    assert "UNSAFE" in format_report(report)


def test_too_little_free_space_is_unsafe(tmp_path: Path) -> None:
    """Free space below the minimum is unsafe (saves would fail with ENOSPC)."""
    report = run_doctor(tmp_path, self_test=False, min_free_bytes=1 << 62)
    assert {f.check: f.status for f in report.findings}["free space"] == "unsafe"
