"""The demo tells the whole story (issue 15.12): SIGKILL and an exact resume, a damaged state file recovered at the
next start, the operator's commands, and a directory with its key left to explore. CliRunner and a real process."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from test_cli import ROOT, run

from posstate import PositionStateManager, StateConfig
from posstate.cli import demo as _demo
from posstate.storage.crypto import read_key_file


def _check_story(out: str, workdir: Path) -> None:
    """What every run of the demo must show and leave behind."""
    acts = ["== 1. SIGKILL", "== 2. Damage", "== 3. The operator's view", "== Explore it yourself"]
    assert [out.index(a) for a in acts] == sorted(out.index(a) for a in acts), out
    assert re.search(r"\[operator\] OK: (exactly the state after trade #\d+|trade #\d+ was in flight)", out), out
    assert "[bot] started: the state file was damaged (checksum mismatch" in out
    assert re.search(r"\[bot\] recovered automatically from (backup \S+|positions\.json\.bak)", out), out
    assert "[operator] OK: " in out.split("== 2. Damage")[1]
    for command in ("$ posstate validate", "$ posstate backups list", "$ posstate diff ", "$ posstate backups restore "):
        assert command in out, command
    assert "VALID: generation" in out
    assert re.search(r"restored backup \S+ .* as generation \d+", out), out
    state, key_file = workdir / "state", workdir / "demo.key"
    assert f"export POSSTATE_DIR={state} POSSTATE_KEY_FILE={key_file}" in out
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [p.name for p in (state / "quarantine").iterdir() if p.name.endswith(".corrupt")], "the damaged file was not kept"
    # the directory it leaves is a valid state the printed key opens, at realistic prices
    with PositionStateManager(StateConfig.in_dir(state, backup_interval=1e9), key=read_key_file(key_file)) as m:
        positions = m.load_positions()
    assert positions
    for (symbol, _side), p in positions.items():
        low, high = {"BTC": (20000, 300000), "ETH": (500, 20000), "SOL": (10, 2000), "XRP": ("0.1", 20), "DOGE": ("0.01", 5)}[
            symbol.split("/")[0]
        ]
        assert Decimal(low) < p.entry_price < Decimal(high), (symbol, p.entry_price)


def test_demo_tells_the_whole_story(tmp_path: Path) -> None:
    """issue 15.12: `posstate demo` (CliRunner): crash and exact resume, damage and automatic recovery, the operator's view."""
    r = run(["demo", "--state-dir", str(tmp_path / "demo"), "--saves", "30", "--seed", "7"])
    assert r.exit_code == 0, r.output
    _check_story(r.stdout, tmp_path / "demo")


def test_demo_as_a_process(tmp_path: Path) -> None:
    """issue 15.12: `python -m posstate demo` (what scripts/demo.sh runs) as a real process, random kill point."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run(
        [sys.executable, "-m", "posstate", "demo", "--state-dir", str(tmp_path / "demo")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    _check_story(r.stdout, tmp_path / "demo")
    assert "Traceback" not in r.stderr
    script = (ROOT / "scripts" / "demo.sh").read_text()
    assert script.rstrip().endswith('exec posstate demo "$@"')


def test_demo_detects_a_resume_that_lost_a_trade(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 15.12: the demo's check can fail: a restart that holds less than the last acknowledged trade is FAILED."""
    real_load = _demo._Demo.load

    def forgetful(self: _demo._Demo) -> tuple[object, ...]:
        positions, metadata, report = real_load(self)
        metadata = {s: {**d, "last_trade": 0} for s, d in metadata.items()}
        return positions, metadata, report

    monkeypatch.setattr(_demo._Demo, "load", forgetful)
    lines: list[str] = []
    assert _demo.run_demo(state_dir=str(tmp_path / "demo"), saves=10, seed=3, echo=lines.append) is False
    assert any(line.startswith("[operator] FAILED: expected the state after trade #") for line in lines)
