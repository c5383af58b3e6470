"""How the command line behaves as a Unix tool (issue 15.8-15.10): a closed pipe, errors under --json, --quiet and
--verbose, colour, examples in every --help, shell completion, configuration from POSSTATE_CONFIG and the state
directory's posstate.toml, hidden options. CliRunner in-process and real processes."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from test_cli import CLEAN_ENV, ROOT, make_state, pos, run

from posstate.cli import base as _cli_base
from posstate.cli.main import cli

ANSI = "\x1b["


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_") and k not in ("NO_COLOR", "FORCE_COLOR")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def posstate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "posstate", *args], env=child_env(**env), capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def big_state(tmp_path: Path, key: bytes) -> Path:
    """A state with enough positions that `show` writes far more than a pipe buffer holds."""
    positions = [pos(f"S{i:04d}/USDT:USDT", "long", "1.5", "100.25") for i in range(1500)]
    make_state(tmp_path / "state", key, positions)
    return tmp_path / "state"


# ------------------------------------------------------------------------------------------ 8: a closed pipe
@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["show"], id="show"),
        pytest.param(["--json", "show"], id="show-json"),
        pytest.param(["export", "--out", "-"], id="export-stdout"),
    ],
)
def test_closed_pipe_ends_quietly_with_141(big_state: Path, key_file: Path, command: list[str]) -> None:
    """issue 15.8: `posstate show | head -1` with a real pipe closed early: exit 141 (128 + SIGPIPE), nothing on stderr."""
    with subprocess.Popen(
        [sys.executable, "-m", "posstate", "--state-dir", str(big_state), "--key-file", str(key_file), *command],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        assert first  # the command started writing; now the reader goes away, as `head -1` does
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == _cli_base.EXIT_CLOSED_PIPE == 141
    assert err == ""


def test_closed_pipe_in_a_shell_pipeline(big_state: Path, key_file: Path) -> None:
    """issue 15.8: through a real shell, `posstate show | head -1` prints one line, no error, and the status is 141."""
    script = f'{sys.executable} -m posstate show | head -1; echo "status=${{PIPESTATUS[0]}}"'
    r = subprocess.run(
        ["bash", "-c", script],
        env=child_env(POSSTATE_DIR=str(big_state), POSSTATE_KEY_FILE=str(key_file)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{big_state}/positions.json: generation"), r.stdout
    assert lines[1] == "status=141"
    assert r.stderr == ""


def test_broken_pipe_in_process_is_not_an_unexpected_error(
    state_dir: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 15.8: a BrokenPipeError while printing is exit 141 and no `unexpected BrokenPipeError` line."""
    real_echo = click.echo

    def echo(message: object = None, *a: object, **kw: object) -> None:
        if not kw.get("err"):
            raise BrokenPipeError(32, "Broken pipe")
        real_echo(message, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(click, "echo", echo)
    r = run(["--state-dir", str(state_dir), "--key-file", str(key_file), "show"])
    assert r.exit_code == 141
    assert "unexpected" not in r.stderr and "BrokenPipe" not in r.stderr


@pytest.fixture
def state_dir(tmp_path: Path, key: bytes) -> Path:
    make_state(
        tmp_path / "state", key, [pos("BTC/USDT:USDT", "long", "0.25", "97250.5"), pos("ETH/USDT:USDT", "short", "3", "3412.75")]
    )
    return tmp_path / "state"


# ------------------------------------------------------------------------------------------ 9: --json errors
def _error_doc(stdout: str) -> dict[str, object]:
    doc = json.loads(stdout)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), stdout
    err = doc["error"]
    assert set(err) >= {"message", "exit_code", "type"}, err
    return err


@pytest.mark.parametrize(
    ("args", "code", "kind"),
    [
        pytest.param(["show", "nosuch"], 6, "StateNotFoundError", id="not-found"),
        pytest.param(["validate"], 3, "CliError", id="no-key"),
        pytest.param(["bogus"], 2, "UsageError", id="unknown-command"),
        pytest.param(["show", "--bogus"], 2, "UsageError", id="unknown-option"),
        pytest.param(["backups", "restore"], 2, "UsageError", id="missing-argument"),
        pytest.param(["keygen", "--out", "EXISTING"], 2, "CliError", id="refused-overwrite"),
        pytest.param(["--key-file", "NOKEY", "show"], 3, "MissingKeyError", id="key-file-missing"),
    ],
)
@pytest.mark.parametrize("where", ["before", "after"])
def test_json_errors_are_json_on_stdout(
    state_dir: Path, tmp_path: Path, args: list[str], code: int, kind: str, where: str
) -> None:
    """issue 15.9: with --json every error is {"error": {message, exit_code, type}} on stdout, exit code unchanged."""
    existing = tmp_path / "existing.key"
    existing.write_text("x\n")
    args = [a.replace("EXISTING", str(existing)).replace("NOKEY", str(tmp_path / "none.key")) for a in args]
    full = (
        ["--json", "--state-dir", str(state_dir), *args]
        if where == "before"
        else ["--state-dir", str(state_dir), *args, "--json"]
    )
    if where == "after" and args[0] == "bogus":
        full = ["--state-dir", str(state_dir), "bogus", "--json"]
    r = run(full)
    assert r.exit_code == code, (r.stdout, r.stderr)
    err = _error_doc(r.stdout)
    assert err["exit_code"] == code
    assert err["type"] == kind
    assert isinstance(err["message"], str) and err["message"]
    assert "\n" not in err["message"]


def test_json_error_as_a_process(state_dir: Path) -> None:
    """issue 15.9: a real process under --json: stdout parses as the error document, the exit code is the documented one."""
    r = posstate("--json", "--state-dir", str(state_dir / "nowhere"), "show")
    assert r.returncode == 6
    err = _error_doc(r.stdout)
    assert err == {
        "message": f"{state_dir}/nowhere/positions.json: no such state file; check --state-dir or the path, or list backups "
        "with `posstate backups list`",
        "exit_code": 6,
        "type": "StateNotFoundError",
    }
    u = posstate("--json", "frobnicate")
    assert u.returncode == 2
    assert _error_doc(u.stdout)["type"] == "UsageError"


def test_json_report_and_error_are_one_document(state_dir: Path, key_file: Path) -> None:
    """issue 15.9: a command that prints a report and then fails (validate of a damaged file) prints ONE JSON document:
    the report with an "error" member."""
    f = state_dir / "positions.json"
    data = bytearray(f.read_bytes())
    data[-40] ^= 0xFF
    f.write_bytes(bytes(data))
    r = run(["--json", "--state-dir", str(state_dir), "--key-file", str(key_file), "validate"])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["valid"] is False
    assert doc["error"]["exit_code"] == 1 and doc["error"]["type"] == "CorruptStateError"


def test_json_unexpected_error(state_dir: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 15.9: an internal error under --json is JSON too (type InternalError, exit 1)."""
    from posstate.cli import inspect_cmd

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(inspect_cmd, "read_state", boom)
    r = run(["--json", "--state-dir", str(state_dir), "--key-file", str(key_file), "show"])
    assert r.exit_code == 1
    err = _error_doc(r.stdout)
    assert err["type"] == "InternalError" and "RuntimeError: boom" in str(err["message"])


# ------------------------------------------------------------------------------------------ 10: quiet and verbose
def test_quiet_drops_notes_keeps_data_and_errors(state_dir: Path, key_file: Path, tmp_path: Path) -> None:
    """issue 15.10: --quiet leaves stdout alone, drops the notes on stderr, and still prints the Error line."""
    out = tmp_path / "out.json"
    loud = run(["--state-dir", str(state_dir), "--key-file", str(key_file), "export", "--out", str(out)])
    assert loud.exit_code == 0 and "exported" in loud.stderr
    out.unlink()
    quiet = run(["--state-dir", str(state_dir), "--key-file", str(key_file), "export", "--out", str(out), "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and out.exists()
    failed = run(["--quiet", "--state-dir", str(state_dir), "show", "nosuch"])
    assert failed.exit_code == 6
    assert failed.stderr.startswith("Error: nosuch: no such file or backup")


def test_quiet_as_a_process(state_dir: Path, key_file: Path, tmp_path: Path) -> None:
    """issue 15.10: a real `posstate -q export --out FILE` writes the file and nothing on stderr."""
    r = posstate("-q", "--state-dir", str(state_dir), "--key-file", str(key_file), "export", "--out", str(tmp_path / "q.json"))
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""
    assert json.loads((tmp_path / "q.json").read_text())["positions"]
    loud = posstate("--state-dir", str(state_dir), "--key-file", str(key_file), "export", "--out", str(tmp_path / "l.json"))
    assert loud.returncode == 0 and "exported" in loud.stderr


def test_verbose_says_where_the_config_came_from(state_dir: Path, key_file: Path) -> None:
    """issue 15.10: --verbose names the state directory and config file it used, and their sources."""
    r = run(["--verbose", "--key-file", str(key_file), "show"], env={"POSSTATE_DIR": str(state_dir)})
    assert r.exit_code == 0, r.stderr
    assert f"info: state directory {state_dir} (from POSSTATE_DIR); config file none (defaults)" in r.stderr
    both = run(["-q", "-v", "--state-dir", str(state_dir), "show"])
    assert both.exit_code == 2 and "--quiet and --verbose" in both.stderr


# ------------------------------------------------------------------------------------------ 10: colour
def test_colour_only_when_asked_and_never_with_no_color(state_dir: Path, key_file: Path) -> None:
    """issue 15.10: colour on a terminal (CliRunner color=True stands for one), off with NO_COLOR or --no-color."""
    args = ["--state-dir", str(state_dir), "--key-file", str(key_file), "validate"]
    runner = CliRunner()
    tty = runner.invoke(cli, args, env={**CLEAN_ENV}, color=True)
    assert tty.exit_code == 0 and ANSI in tty.stdout
    assert ANSI not in runner.invoke(cli, args, env={**CLEAN_ENV, "NO_COLOR": "1"}, color=True).stdout
    assert ANSI not in runner.invoke(cli, [*args, "--no-color"], env={**CLEAN_ENV}, color=True).stdout
    assert ANSI not in runner.invoke(cli, args, env={**CLEAN_ENV}).stdout  # not a terminal
    err = runner.invoke(cli, ["--state-dir", str(state_dir), "show", "nosuch"], env={**CLEAN_ENV}, color=True)
    assert err.stderr.startswith("\x1b[31m\x1b[1mError:")


def _on_a_terminal(args: list[str], **env: str) -> str:
    """Run posstate with stdout on a pseudo-terminal; everything it printed there."""
    main, child = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "posstate", *args], env=child_env(**env), stdout=child, stderr=subprocess.DEVNULL
    ) as proc:
        os.close(child)
        chunks = []
        while True:
            ready, _, _ = select.select([main], [], [], 60)
            if not ready:
                break
            try:
                data = os.read(main, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=60)
    os.close(main)
    return b"".join(chunks).decode()


def test_colour_on_a_real_terminal_and_not_in_a_pipe(state_dir: Path, key_file: Path) -> None:
    """issue 15.10: a real process: ANSI colour on a pseudo-terminal, none in a pipe, none on a terminal with NO_COLOR."""
    args = ["--state-dir", str(state_dir), "--key-file", str(key_file), "validate"]
    assert ANSI in _on_a_terminal(args)
    assert "VALID" in _on_a_terminal(args, NO_COLOR="1") and ANSI not in _on_a_terminal(args, NO_COLOR="1")
    piped = posstate(*args)
    assert piped.returncode == 0 and ANSI not in piped.stdout


# ------------------------------------------------------------------------------------------ 10: help
def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


@pytest.mark.parametrize("path", [(), *_commands(cli)], ids=lambda p: " ".join(p) or "posstate")
def test_every_help_has_an_example(path: tuple[str, ...]) -> None:
    """issue 15.10: every command's --help ends with an Examples block that runs that command."""
    r = run([*path, "--help"])
    assert r.exit_code == 0
    assert "Examples:" in r.stdout
    block = r.stdout.split("Examples:", 1)[1]
    assert f"posstate {' '.join(path)}".strip() in block


def test_irrelevant_options_are_hidden_but_accepted(tmp_path: Path) -> None:
    """issue 15.10: `keygen --help` lists no --state-dir/--config/--key-file (a new key needs none), yet they are accepted."""
    r = run(["keygen", "--help"])
    for option in ("--state-dir", "--config", "--key-file"):
        assert option not in r.stdout
    assert "--out" in r.stdout and "--json" in r.stdout
    ok = run(["keygen", "--state-dir", str(tmp_path), "--out", str(tmp_path / "k")])
    assert ok.exit_code == 0 and (tmp_path / "k").exists()
    assert "--key-file" not in run(["doctor", "--help"]).stdout


def test_shell_completion_scripts_and_words() -> None:
    """issue 15.10: click's completion works for the installed name (bash and zsh scripts; command words)."""
    for shell in ("bash", "zsh", "fish"):
        r = subprocess.run(
            [sys.executable, "-c", "from posstate.cli.main import main; main()"],
            env=child_env(_POSSTATE_COMPLETE=f"{shell}_source"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0 and "_POSSTATE_COMPLETE" in r.stdout, (shell, r.stderr)
    words = subprocess.run(
        [sys.executable, "-c", "from posstate.cli.main import main; main()"],
        env=child_env(_POSSTATE_COMPLETE="bash_complete", COMP_WORDS="posstate back", COMP_CWORD="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "plain,backups" in words.stdout.splitlines()


# ------------------------------------------------------------------------------------------ 10: configuration
def _toml(path: Path, **fields: object) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()))
    return path


def test_config_from_posstate_config_and_the_state_directory(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 15.10: config from POSSTATE_CONFIG, and from posstate.toml in the state directory; flags > env > file."""
    book = tmp_path / "book"
    make_state(book, key, [pos("SOL/USDT:USDT", "long", "12", "181.42")])
    (book / "positions.json").rename(book / "book.json")
    (book / "positions.json.bak").unlink(missing_ok=True)
    kf = ["--key-file", str(key_file)]
    # the state directory's own posstate.toml names its state file
    _toml(book / "posstate.toml", state_file="book.json")
    r = run([*kf, "--state-dir", str(book), "show"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith(f"{book}/book.json: generation")
    # POSSTATE_CONFIG (env) beats the file in the state directory
    other = _toml(tmp_path / "other.toml", state_file=str(tmp_path / "elsewhere" / "positions.json"))
    r = run([*kf, "show"], env={"POSSTATE_CONFIG": str(other)})
    assert r.exit_code == 6 and f"{tmp_path}/elsewhere/positions.json" in r.stderr
    # --config (flag) beats POSSTATE_CONFIG; --state-dir (flag) places the file's state file in that directory
    r = run([*kf, "--config", str(book / "posstate.toml"), "--state-dir", str(book), "show"], env={"POSSTATE_CONFIG": str(other)})
    assert r.exit_code == 0, r.stderr
    # POSSTATE_DIR (env) beats the paths of the config file
    r = run([*kf, "show"], env={"POSSTATE_CONFIG": str(book / "posstate.toml"), "POSSTATE_DIR": str(book)})
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith(f"{book}/book.json")


def test_config_that_is_a_device_is_refused(state_dir: Path) -> None:
    """issue 15.11: --config /dev/null names a device (exit 2), instead of reading as an empty config."""
    r = run(["--config", "/dev/null", "--state-dir", str(state_dir), "show"])
    assert r.exit_code == 2
    assert r.stderr.startswith("Error: /dev/null: is a character device, not a config file")


def test_tables_are_laid_out_by_rich_and_print_symbols_verbatim(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 15.10: tables come from rich (a kept library, not hand padding); a symbol that looks like rich markup
    is printed exactly, numbers are right-aligned, nothing is cut to a terminal width."""
    long_symbol = "[bold]1000PEPE/USDT:USDT[/bold]" + "X" * 90  # wider than any terminal with the other columns
    make_state(
        tmp_path / "state", key, [pos(long_symbol, "long", "1250000", "0.0123"), pos("BTC/USDT:USDT", "long", "0.5", "97250.5")]
    )
    probe = (
        "import sys; from posstate.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit:\n"
        "    print('rich loaded' if 'rich.table' in sys.modules else 'no rich', file=sys.stderr)\n"
        "    raise\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, "--state-dir", str(tmp_path / "state"), "--key-file", str(key_file), "show"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "rich loaded"
    lines = r.stdout.splitlines()
    rows = [next(line for line in lines if line.startswith(s)) for s in (long_symbol + " ", "BTC/USDT:USDT ")]
    header = next(line for line in r.stdout.splitlines() if line.startswith("symbol"))
    end = header.index("contracts") + len("contracts")
    assert rows[0][:end].endswith("1250000") and rows[1][:end].endswith("0.5")  # right-aligned under the header


def test_quiet_never_hides_a_question(state_dir: Path, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 15.10: under --quiet a confirmation prompt is still shown on a terminal (only notes are dropped)."""
    src = tmp_path / "exp.json"
    assert run(["--state-dir", str(state_dir), "--key-file", str(key_file), "export", "--out", str(src)]).exit_code == 0
    doc = json.loads(src.read_text())
    doc["positions"] = {k: v for k, v in doc["positions"].items() if k.startswith("BTC")}  # the import closes ETH
    src.write_text(json.dumps(doc))
    monkeypatch.setattr(_cli_base, "is_terminal", lambda: True)
    r = run(["-q", "--state-dir", str(state_dir), "--key-file", str(key_file), "import", str(src)], input="n\n")
    assert r.exit_code == 1
    assert "[y/N]" in r.stderr
    assert r.stderr.splitlines()[-1] == "Error: import not confirmed; nothing was changed"


def test_json_interrupted(state_dir: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 15.9: Ctrl-C under --json is a JSON error of type Interrupted (exit 1)."""
    from posstate.cli import inspect_cmd

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_cmd, "read_state", interrupted)
    r = run(["--json", "--state-dir", str(state_dir), "--key-file", str(key_file), "show"])
    assert r.exit_code == 1
    assert _error_doc(r.stdout)["type"] == "Interrupted"


def test_config_precedence_as_a_process(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 15.10 as a real process: posstate.toml in the state directory, POSSTATE_CONFIG over it, --config over both."""
    book = tmp_path / "book"
    make_state(book, key, [pos("SOL/USDT:USDT", "long", "12", "181.42")])
    (book / "positions.json").rename(book / "book.json")
    _toml(book / "posstate.toml", state_file="book.json")
    other = _toml(tmp_path / "other.toml", state_file=str(tmp_path / "elsewhere" / "positions.json"))
    found = posstate("--state-dir", str(book), "--key-file", str(key_file), "-v", "show")
    assert found.returncode == 0 and found.stdout.startswith(f"{book}/book.json: generation")
    assert f"config file {book}/posstate.toml (from state directory)" in found.stderr
    env = posstate("--key-file", str(key_file), "show", POSSTATE_CONFIG=str(other))
    assert env.returncode == 6 and f"{tmp_path}/elsewhere/positions.json" in env.stderr
    flag = posstate(
        "--config",
        str(book / "posstate.toml"),
        "--state-dir",
        str(book),
        "--key-file",
        str(key_file),
        "show",
        POSSTATE_CONFIG=str(other),
    )
    assert flag.returncode == 0, flag.stderr


@pytest.mark.parametrize(
    "args",
    [pytest.param(["show", "nosuch"], id="command-error"), pytest.param(["show", "--bogus"], id="usage-error")],
)
def test_error_line_with_no_reader_is_141_too(state_dir: Path, args: list[str]) -> None:
    """issue 15.8: an error whose stderr is a pipe nobody reads (closed before the command starts, as in
    `posstate show nosuch 2>&1 >/dev/null | true`) also ends with 141, not 1 and a complaint."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "posstate", *args],
            env=child_env(POSSTATE_DIR=str(state_dir)),
            stdout=subprocess.DEVNULL,
            stderr=write_end,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert r.returncode == 141
