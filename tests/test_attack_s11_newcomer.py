"""Session 11, outside review as a newcomer: what the README and docs/ say, run literally."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60


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
