"""The command line's frame: the click group, error mapping (exit codes) and shared helpers.

The context and common options are :mod:`posstate.cli.options`. Commands live in ``posstate/cli/*_cmd.py``,
registered by :mod:`posstate.cli.main`, and stay thin: parse, call the library,
print. Every :class:`~posstate.PosStateError` becomes one ``Error: ...`` line on stderr and a documented exit
code in one place, :func:`exit_code_for`.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from posstate.backup import backups as _backups
from posstate.cli import output as _out
from posstate.cli.options import Env, common_options, env_of, log_scope
from posstate.cli.prompt import signal_aware_prompts
from posstate.core.config import StateConfig
from posstate.core.errors import (
    AmbiguousBackupError,
    ConcurrentModificationError,
    ConfigError,
    LeaseLostError,
    MissingKeyError,
    PersistenceError,
    PosStateError,
    StaleBackupError,
    StateLockedError,
    StateNotFoundError,
    UnsupportedVersionError,
    WrongKeyError,
)
from posstate.core.version import __version__
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs
from posstate.storage.lock import WriterLock, is_locked, read_holder

F = TypeVar("F", bound=Callable[..., Any])

# ------------------------------------------------------------------------------------------ exit codes
EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_KEY = 3
EXIT_VERSION = 4
EXIT_LOCKED = 5
EXIT_NOT_FOUND = 6
#: The reader closed the pipe (``posstate show | head -1``): 128 + SIGPIPE, as a shell reports it.
EXIT_CLOSED_PIPE = 141
#: SIGTERM ended the command (a service manager, ``kill``): 128 + SIGTERM, as borg reports it.
EXIT_TERMINATED = 143

EXIT_CODES_HELP = """\b
Exit codes:
  0  success; the file is valid
  1  state invalid or damaged (checksum, truncation, schema, relationships),
     a file operation failed, or a confirmation was declined
  2  usage error (bad option or argument, bad config file, refused overwrite)
  3  key problem (missing key, wrong key, tampered file, contents not checked)
  4  unsupported container format or schema version (newer posstate)
  5  state locked by another process (the message names its pid and host)
  6  not found (no state file, no such backup, no such file)
  141  the reader closed the pipe (posstate show | head -1); no message
  143  stopped by SIGTERM (watch and serve exit 0 instead); no file is half-written
With --json an error is JSON on stdout too:
  {"error": {"message": ..., "exit_code": ..., "type": ...}}"""

#: Most specific first; the first class an error is an instance of decides. Anything else PosStateError: 1.
_EXIT_MAP: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, EXIT_USAGE),
    (AmbiguousBackupError, EXIT_USAGE),  # a backup id prefix that names several backups: give more digits
    (MissingKeyError, EXIT_KEY),
    (WrongKeyError, EXIT_KEY),
    (UnsupportedVersionError, EXIT_VERSION),
    (StateLockedError, EXIT_LOCKED),
    (LeaseLostError, EXIT_LOCKED),  # another machine holds the replica lease
    (ConcurrentModificationError, EXIT_LOCKED),
    (StateNotFoundError, EXIT_NOT_FOUND),
    (PersistenceError, EXIT_INVALID),
)


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code of an error (the one place errors are mapped)."""
    if isinstance(exc, CliError):
        return exc.code
    for kind, code in _EXIT_MAP:
        if isinstance(exc, kind):
            return code
    if isinstance(exc, click.UsageError):
        return EXIT_USAGE
    return EXIT_INVALID


class CliError(Exception):
    """A refusal that belongs to the command line itself (an output file exists, --yes needed, ...)."""

    def __init__(self, message: str, *, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def error_line(message: str) -> str:
    """``Error: ...`` on exactly one line, with no control character (:func:`~posstate.cli.output.printable`)."""
    return "Error: " + _out.printable(" ".join(str(message).split()))


# ------------------------------------------------------------------------------------------ the group
_NoArgsIsHelp: type[click.UsageError] = getattr(click.exceptions, "NoArgsIsHelpError", type("_Never", (click.UsageError,), {}))


class PosstateGroup(click.Group):
    """Turns every error into one ``Error:`` line and its exit code (and, under --json, a JSON document on
    stdout); a traceback only with --debug; a closed pipe ends quietly (:mod:`posstate.cli.output`)."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        if "color" not in extra and _out.color_choice() is False:
            extra["color"] = False  # NO_COLOR; --color given later wins
        return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        env = env_of(ctx)
        try:
            with _out.quiet_stderr(env), log_scope(debug=env.debug, verbose=env.verbose):
                if env.quiet and env.verbose:
                    raise click.UsageError("--quiet and --verbose contradict each other; give one", ctx=ctx)
                result = super().invoke(ctx)
            _out.flush_json(env)
            return result
        except click.exceptions.Exit as done:
            if done.exit_code == _out.EXIT_CLOSED_PIPE:
                raise
            _out.flush_json(env)
            raise
        except BrokenPipeError:
            raise click.exceptions.Exit(_out.closed_pipe()) from None
        except (click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: click's own handler adds a blank line even in a pipe
            if sys.stderr.isatty():
                click.echo(file=sys.stderr)  # after the terminal's ^C echo, the Error: line starts a line of its own
            raise click.exceptions.Abort() from stop
        except (PosStateError, CliError) as exc:
            raise click.exceptions.Exit(_report(ctx, exc)) from None
        except Exception as exc:
            raise click.exceptions.Exit(_report(ctx, exc, unexpected=True)) from None

    def _usage_path(self, exc: click.UsageError, args: Sequence[str] | None) -> str:
        """The command the user was typing, for the help hint (click leaves ``ctx`` unset for some errors)."""
        if exc.ctx is not None and exc.ctx.command is not self:
            return exc.ctx.command_path
        words = list(sys.argv[1:] if args is None else args)
        name = next((w for w in words if w in self.commands), None)
        return f"posstate {name}" if name else "posstate"

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        words = list(sys.argv[1:] if args is None else args)
        with _out.guarded_stdout() as stdout:
            code = self._main(words, args, prog_name, complete_var, **extra)
            if stdout.failed is not None and code == EXIT_OK:  # a failure something swallowed
                code = _fail(stdout.failed, str(stdout.failed), EXIT_INVALID, [])
        if standalone_mode:
            sys.exit(code)
        return code

    def _main(
        self, words: list[str], args: Sequence[str] | None, prog_name: str | None, complete_var: str | None, **extra: Any
    ) -> int:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as exc:  # bare `posstate`: the help, as asked
            try:
                click.echo(exc.ctx.get_help() if exc.ctx is not None else "")
                code = EXIT_OK
            except BrokenPipeError:
                code = _out.closed_pipe()
            except PosStateError as failed:  # stdout cannot be written
                code = _fail(failed, cli_message(failed), exit_code_for(failed), words)
        except click.UsageError as exc:
            hint = f"see `{self._usage_path(exc, args)} --help`"
            text = re.sub(r"\. Did you mean (.*)\?$", r" (did you mean \1?)", exc.format_message().strip())
            code = _fail(exc, f"{text.rstrip('.')}; {hint}", EXIT_USAGE, words)
        except click.ClickException as exc:
            code = _fail(exc, exc.format_message(), exc.exit_code, words)
        except click.exceptions.Abort as exc:
            # Ctrl-C, SIGTERM or end of input outside a prompt: whatever was written is complete (writes are atomic).
            terminated = _terminated(exc)
            what = "terminated (SIGTERM)" if terminated else "interrupted"
            message = f"{what}; no file is left half-written (every write is atomic); rerun the command"
            code = _fail(exc, message, EXIT_TERMINATED if terminated else EXIT_INVALID, words)
        except BrokenPipeError:
            code = _out.closed_pipe()
        except PosStateError as exc:  # outside a command: stdout failing under --help, --version or bare `posstate`
            code = _fail(exc, cli_message(exc), exit_code_for(exc), words)
        return code if isinstance(code, int) else EXIT_OK


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a command ran: it unwinds as Ctrl-C does (``finally`` blocks, locks released)."""


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated


def _terminated(exc: BaseException) -> bool:
    """Whether an Abort came from SIGTERM (click turns KeyboardInterrupt into Abort, ``from None`` at a prompt)."""
    return isinstance(exc.__cause__, Terminated) or isinstance(exc.__context__, Terminated)


def terminate_like_interrupt() -> None:
    """Make SIGTERM end a command as Ctrl-C does, with its own exit code (143) and ``Error:`` line. Only the
    main thread may set handlers; a command that follows (``watch``) or serves (``serve``) installs its own."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def _fail(exc: BaseException, message: str, code: int, words: list[str]) -> int:
    """An error raised outside a command (bad usage, interrupt): the ``Error:`` line, and JSON under --json."""
    ctx = getattr(exc, "ctx", None)
    env = ctx.find_object(Env) if isinstance(ctx, click.Context) else None
    try:
        click.echo(_out.error_prefix(error_line(message)), err=True)
        if (env is not None and env.json) or _out.wants_json(words):
            _out.print_json_error(env, message=message, code=code, kind=_out.error_type(exc))
    except BrokenPipeError:
        return _out.closed_pipe(stderr=True)
    except OSError:  # stdout cannot be written (full disk): the Error: line on stderr says what happened
        pass
    return code


def cli_message(exc: BaseException) -> str:
    """The error's message, with library wording (``key=``) put in command-line terms (``--key-file``)."""
    text = str(exc)
    if isinstance(exc, MissingKeyError):
        text = text.replace("pass key= or passphrase=, or set", "pass --key-file FILE, or set")
    if isinstance(exc, StaleBackupError):
        text = re.sub(r"with accept_older=True \((`[^`]*`)\)", r"with \1", text)
    return text


def _report(ctx: click.Context, exc: BaseException, *, unexpected: bool = False) -> int:
    """Print the error (stderr; and stdout under --json); its exit code, or 141 when the reader is gone."""
    env = ctx.find_object(Env)
    code = EXIT_INVALID if unexpected else exit_code_for(exc)
    message = cli_message(exc)
    if unexpected:
        message = f"unexpected {type(exc).__name__}: {message}; rerun with --debug for the traceback and report it"
    try:
        if env is not None and env.debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        click.echo(_out.error_prefix(error_line(message)), err=True)
        if env is not None and env.json:
            kind = "CliError" if isinstance(exc, CliError) else _out.error_type(exc)
            _out.print_json_error(env, message=message, code=code, kind=kind)
    except BrokenPipeError:  # `posstate ... 2>&1 >/dev/null | true`: nobody reads the error either
        return _out.closed_pipe(stderr=True)
    except OSError:  # stdout cannot be written (full disk): the Error: line on stderr says what happened
        pass
    return code


@click.group(name="posstate", cls=PosstateGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="posstate")
@common_options(top=True)
def cli() -> None:
    """Crash-safe, encrypted, backed-up position state for trading bots.

    Read-only commands (validate, show, diff, watch) take no lock and never write. Commands that replace
    files ask for confirmation on a terminal (or need --yes) and refuse while a bot holds the writer lock.

    Configuration: flags > environment (POSSTATE_DIR, POSSTATE_CONFIG, POSSTATE_KEY_FILE, ...) > the config
    file (--config, else POSSTATE_CONFIG, else posstate.toml in the state directory).
    """


# ------------------------------------------------------------------------------------------ helpers
def is_terminal() -> bool:
    """True when a person can answer a prompt (tests patch this)."""
    return sys.stdin.isatty()


def confirm(*, yes: bool, prompt: str, what: str) -> None:
    """Ask on a terminal; without one, insist on --yes."""
    if yes:
        return
    if not is_terminal():
        raise CliError(f"{what} needs confirmation and there is no terminal to ask on; rerun with --yes")
    ctx = click.get_current_context(silent=True)
    env = ctx.find_object(Env) if ctx is not None else None
    try:
        with _out.unquieted(env), signal_aware_prompts():  # --quiet drops notes, never a question
            agreed = click.confirm(prompt, err=True)
    except click.exceptions.Abort as exc:
        if _terminated(exc):
            click.echo(err=True)  # end the question's line: the Error: line starts a line of its own
            raise
        agreed = False
    if not agreed:
        raise CliError(f"{what} not confirmed; nothing was changed", code=EXIT_INVALID)


def refuse_if_locked(cfg: StateConfig) -> None:
    """For dry runs: fail like a write would while a bot holds the lock, without creating anything."""
    if is_locked(cfg.lock_path):
        pid, host = read_holder(cfg.lock_path)
        raise StateLockedError(cfg.state_path, pid=pid, host=host)


@contextmanager
def writer_lock(cfg: StateConfig) -> Iterator[WriterLock]:
    """Hold the state directory's writer lock, as a bot would, for the duration of a command."""
    if not fs.exists(cfg.state_dir):
        raise StateNotFoundError(cfg.state_dir, what="state directory", next_step="check --state-dir or --config")
    lock = WriterLock(cfg.lock_path, state_path=cfg.state_path)
    try:
        yield lock
    finally:
        lock.release()


def state_path_arg(env: Env, path: str | None) -> Path:
    """A PATH argument, or the configured state file.

    An argument that names no existing file and has no ``/`` is taken as a backup id (full id, unique
    prefix, ``positions_<id>.json`` or ``latest``) in the state directory's ``backups/``. Read-only: no lock.
    """
    if not path:
        return env.config().state_path
    given = Path(path)
    if fs.exists(given) or "/" in path or os.sep in path:
        return given
    backup_dir = env.config().backup_path
    try:
        return _backups.resolve(_backups.scan(backup_dir), path, backup_dir=backup_dir).path
    except StateNotFoundError:
        raise StateNotFoundError(
            given,
            what="file or backup",
            next_step=f"no file of that name and no backup with that id in {backup_dir}; "
            "list backups with `posstate backups list`",
        ) from None


def write_new_output(out: Path, data: bytes) -> None:
    """Create *out* 0600, durably, refusing to replace anything already there."""
    try:
        _atomic.write_new_file(out, data)
    except _atomic.WriteFailed as wf:
        if isinstance(wf.cause, FileExistsError) and not _regular_or_absent(out):
            kind = fs.file_kind(fs.stat_(out).st_mode)
            raise CliError(f"{out}: is {kind}, not a path for a new file; choose a regular file path") from None
        # /proc/version: the temp file's create fails with ENOENT, yet the target exists
        if isinstance(wf.cause, FileExistsError) or (isinstance(wf.cause, FileNotFoundError) and _there(out)):
            raise CliError(
                f"{out}: already exists; refusing to overwrite it; choose another path or move it away first"
            ) from None
        if isinstance(wf.cause, FileNotFoundError) and _there(out.parent) is False:
            raise StateNotFoundError(out.parent, what="directory", next_step="create it first or choose another path") from None
        if isinstance(wf.cause, FileNotFoundError):  # the directory is there but refuses a create (/proc, /sys)
            raise PersistenceError(
                out,
                operation="create",
                cause=wf.cause,
                outcome="nothing was written",
                next_step=f"{out.parent} exists but takes no new file (a virtual file system such as /proc?); "
                "choose a path on a disk",
            ) from wf.cause
        raise PersistenceError(out, operation=wf.step, cause=wf.cause) from wf.cause


def _there(path: Path) -> bool | None:
    """Whether a directory entry exists at *path* (None: it cannot be told, e.g. a parent not searchable)."""
    try:
        return fs.exists(path)
    except OSError:
        return None


def _regular_or_absent(path: Path) -> bool:
    import stat

    try:
        return stat.S_ISREG(fs.stat_(path).st_mode)
    except OSError:
        return True


def json_out(data: Any) -> None:
    """A command's JSON document (held until the command ends, so a failure can add its ``error``)."""
    ctx = click.get_current_context(silent=True)
    _out.hold_json(ctx.find_object(Env) if ctx is not None else None, data)
