"""The built wheel works without the checkout: schemas and py.typed travel inside the package."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from decimal import Decimal
    from pathlib import Path
    import posstate
    from posstate import Position, PositionStateManager, StateConfig
    from posstate.model import document as _document
    from posstate.model import schema as _schema

    here = Path(posstate.__file__).resolve().parent
    assert str(here).startswith(sys.argv[1]), here
    assert not (here.parent / "schemas").exists(), "checkout schemas visible"
    assert (here / "schemas" / "state.schema.json").is_file()
    key = bytes(range(32))
    cfg = StateConfig.in_dir(Path(sys.argv[2]) / "state")
    with PositionStateManager(cfg, key=key) as m:
        m.save_positions([Position(symbol="BTC/USDT", side="long", contracts=Decimal("0.00000001"), entry_price=Decimal("1"))])
    with PositionStateManager(cfg, key=key) as m:
        p = m.load_positions()[("BTC/USDT", "long")]
        assert p.contracts == Decimal("0.00000001")
        report = m.validate_state()
        assert report.valid, report
    # The jsonschema path (not only the fast path) works from the installed schema.
    errors = _schema.schema_errors({"schema_version": 1})
    assert errors and errors[0].validator == "required"
    print("OK", posstate.__version__)
    """
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        cwd=out,
    )
    (found,) = out.glob("posstate-*.whl")
    return found


def test_wheel_contents(wheel: Path) -> None:
    """The wheel holds posstate/py.typed and posstate/schemas/state.schema.json, and no tests."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "posstate/py.typed" in names
    assert "posstate/schemas/state.schema.json" in names
    assert not any(n.startswith("tests/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)


def test_installed_wheel_loads_and_saves(wheel: Path, tmp_path: Path) -> None:
    """Installed into a bare directory and run from elsewhere, the package saves, loads and validates."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")}
    env["PYTHONPATH"] = str(target)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(target), str(work)], cwd=work, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK ")


def test_installed_wheel_runs_the_cli(wheel: Path, tmp_path: Path) -> None:
    """issue 13 (tests): the console script the wheel installs runs outside the checkout: a missing state is
    one `Error:` line with its exit code, a saved state validates, and `doctor` loads selftest/ on demand."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    script = target / "bin" / "posstate"
    assert script.is_file(), sorted(p.name for p in (target / "bin").iterdir()) if (target / "bin").exists() else "no bin/"
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")}
    env["PYTHONPATH"] = str(target)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    missing = cli("--state-dir", str(work / "none"), "--json", "validate")
    assert missing.returncode == 6, missing.stderr
    assert missing.stderr.startswith("Error: ") and "Traceback" not in missing.stderr, missing.stderr
    assert json.loads(missing.stdout)["error"]["type"] == "StateNotFoundError"

    made = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(target), str(work)], cwd=work, env=env, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    key = work / "bot.key"
    key.write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
    key.chmod(0o600)
    version = cli("--version")
    assert version.returncode == 0 and made.stdout.split()[1] in version.stdout, (version.stdout, version.stderr)
    checked = cli("--state-dir", str(work / "state"), "--key-file", str(key), "--json", "validate")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["valid"] is True
    doctor = cli("--json", "doctor", "--state-dir", str(work / "state"))
    assert doctor.returncode == 0, doctor.stderr
    assert {f["check"] for f in json.loads(doctor.stdout)["findings"]} >= {"filesystem", "exclusive lock"}
