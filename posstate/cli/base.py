"""The command line's frame: the click group, common options, error mapping and shared helpers.

Commands live in :mod:`posstate.cli.main` (and later ``_cli_*`` modules) and stay thin: parse, call the library,
print. Every :class:`~posstate.PosStateError` becomes one ``Error: ...`` line on stderr and a documented exit
code in one place, :func:`exit_code_for`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from posstate.backup import backups as _backups
from posstate.cli.render import to_json
from posstate.core.config import StateConfig
from posstate.core.errors import (
    AmbiguousBackupError,
    ConcurrentModificationError,
    ConfigError,
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
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring, read_key_file
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

EXIT_CODES_HELP = """\b
Exit codes:
  0  success; the file is valid
  1  state invalid or damaged (checksum, truncation, schema, relationships),
     a file operation failed, or a confirmation was declined
  2  usage error (bad option or argument, bad config file, refused overwrite)
  3  key problem (missing key, wrong key, tampered file, contents not checked)
  4  unsupported container format or schema version (newer posstate)
  5  state locked by another process (the message names its pid and host)
  6  not found (no state file, no such backup, no such file)"""

#: Most specific first; the first class an error is an instance of decides. Anything else PosStateError: 1.
_EXIT_MAP: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, EXIT_USAGE),
    (AmbiguousBackupError, EXIT_USAGE),  # a backup id prefix that names several backups: give more digits
    (MissingKeyError, EXIT_KEY),
    (WrongKeyError, EXIT_KEY),
    (UnsupportedVersionError, EXIT_VERSION),
    (StateLockedError, EXIT_LOCKED),
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
    """``Error: ...`` on exactly one line."""
    return "Error: " + " ".join(str(message).split())


# ------------------------------------------------------------------------------------------ context
@dataclass
class Env:
    """What the common options say; the config and keyring are built on first use."""

    state_dir: str | None = None
    config_file: str | None = None
    key_file: str | None = None
    json: bool = False
    debug: bool = False
    _config: StateConfig | None = field(default=None, repr=False)
    _keyring: Keyring | None = field(default=None, repr=False)
    _keyring_done: bool = field(default=False, repr=False)

    def config(self) -> StateConfig:
        if self._config is None:
            cfg = StateConfig.from_file(self.config_file) if self.config_file else None
            if cfg is None:
                cfg = StateConfig.in_dir(self.state_dir or "state")
            elif self.state_dir:
                d = Path(self.state_dir)
                cfg = cfg.replace(state_file=str(d / cfg.state_path.name), backup_dir=str(d / "backups"))
            self._config = cfg
        return self._config

    def keyring(self) -> Keyring | None:
        """The key from --key-file, else POSSTATE_KEY / POSSTATE_KEY_FILE / POSSTATE_PASSPHRASE, else None."""
        if not self._keyring_done:
            if self.key_file:
                self._keyring = Keyring(key=read_key_file(self.key_file))
            else:
                self._keyring = Keyring.resolve()
            self._keyring_done = True
        return self._keyring

    def manager_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for PositionStateManager: the --key-file key, else the manager reads the env."""
        return {"key": read_key_file(self.key_file)} if self.key_file else {}

    def require_encryption(self) -> bool:
        """A key was given and encryption is on: a plaintext state file or journal is refused (exit 3), as the
        library refuses it, never shown or reported valid (anyone can write a plaintext file)."""
        return self.config().encryption and self.keyring() is not None

    def read_options(self) -> _statefile.ReadOptions:
        cfg = self.config()
        return _statefile.ReadOptions(
            keyring=self.keyring(),
            max_document_bytes=cfg.max_document_bytes,
            clock_skew=cfg.clock_skew,
            require_encryption=self.require_encryption(),
        )

    def require_keyring(self, path: Path | None = None) -> Keyring:
        found = self.keyring()
        if found is None:
            raise MissingKeyError(path, reason="this command needs the key and none was supplied")
        return found


def env_of(ctx: click.Context) -> Env:
    return ctx.ensure_object(Env)


def _setter(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def store(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value not in (None, False):
            setattr(ctx.ensure_object(Env), name, value)
            if name == "debug":
                show_logs(debug=True)  # --debug after the command name

    return store


class _EchoHandler(logging.Handler):
    """The library's log records on stderr, through click (so a test runner's stderr is the one used)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)
        except Exception:  # pragma: no cover - logging must never break a command
            self.handleError(record)


def show_logs(*, debug: bool) -> None:
    """With --debug, show the library's debug and info records too (inside :func:`log_scope`)."""
    log = logging.getLogger("posstate")
    for h in log.handlers:
        if isinstance(h, _EchoHandler) and debug:
            h.setLevel(logging.DEBUG)
            log.setLevel(logging.DEBUG)


@contextmanager
def log_scope(*, debug: bool) -> Iterator[None]:
    """Show the library's warnings on stderr for one command; leave the logger as it was afterwards
    (the CLI runs in-process under tests, next to code that inspects posstate's logging)."""
    log = logging.getLogger("posstate")
    level = log.level
    handler = _EchoHandler(logging.WARNING)
    log.addHandler(handler)
    try:
        show_logs(debug=debug)
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def common_options(*, top: bool = False) -> Callable[[F], F]:
    """--state-dir, --config, --key-file, --json, --debug: accepted before or after the command name."""

    def deco(f: F) -> F:
        opts = [
            click.option(
                "--state-dir",
                type=click.Path(file_okay=False),
                envvar="POSSTATE_DIR" if top else None,
                show_envvar=top,
                expose_value=False,
                callback=_setter("state_dir"),
                help="State directory (default ./state; overrides the paths of --config).",
            ),
            click.option(
                "--config",
                type=click.Path(dir_okay=False),
                expose_value=False,
                callback=_setter("config_file"),
                help="TOML file with StateConfig fields.",
            ),
            click.option(
                "--key-file",
                type=click.Path(dir_okay=False),
                expose_value=False,
                callback=_setter("key_file"),
                help="File holding the base64 key (else POSSTATE_KEY, POSSTATE_KEY_FILE, POSSTATE_PASSPHRASE).",
            ),
            click.option(
                "--json", "json_", is_flag=True, expose_value=False, callback=_setter("json"), help="Print data as JSON."
            ),
            click.option(
                "--debug", is_flag=True, expose_value=False, callback=_setter("debug"), help="Show a traceback on errors."
            ),
        ]
        for opt in reversed(opts):
            f = opt(f)
        return f

    return deco


# ------------------------------------------------------------------------------------------ the group
_NoArgsIsHelp: type[click.UsageError] = getattr(click.exceptions, "NoArgsIsHelpError", type("_Never", (click.UsageError,), {}))


class PosstateGroup(click.Group):
    """Turns every error into one ``Error:`` line and its exit code; a traceback only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with log_scope(debug=env_of(ctx).debug):
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except (PosStateError, CliError) as exc:
            _report(ctx, exc)
            raise click.exceptions.Exit(exit_code_for(exc)) from None
        except Exception as exc:
            _report(ctx, exc, unexpected=True)
            raise click.exceptions.Exit(EXIT_INVALID) from None

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
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as exc:  # bare `posstate`: the help, as asked
            click.echo(exc.ctx.get_help() if exc.ctx is not None else "")
            code = EXIT_OK
        except click.UsageError as exc:
            hint = f"see `{self._usage_path(exc, args)} --help`"
            click.echo(error_line(f"{exc.format_message().rstrip('.')}; {hint}"), err=True)
            code = EXIT_USAGE
        except click.ClickException as exc:
            click.echo(error_line(exc.format_message()), err=True)
            code = exc.exit_code
        except click.exceptions.Abort:
            # Ctrl-C or end of input outside a prompt: whatever was written is complete (writes are atomic).
            click.echo(
                error_line("interrupted; no file is left half-written (every write is atomic); rerun the command"), err=True
            )
            code = EXIT_INVALID
        code = code if isinstance(code, int) else EXIT_OK
        if standalone_mode:
            sys.exit(code)
        return code


def cli_message(exc: BaseException) -> str:
    """The error's message, with library wording (``key=``) put in command-line terms (``--key-file``)."""
    text = str(exc)
    if isinstance(exc, MissingKeyError):
        text = text.replace("pass key= or passphrase=, or set", "pass --key-file FILE, or set")
    if isinstance(exc, StaleBackupError):
        text = re.sub(r"with accept_older=True \((`[^`]*`)\)", r"with \1", text)
    return text


def _report(ctx: click.Context, exc: BaseException, *, unexpected: bool = False) -> None:
    env = ctx.find_object(Env)
    if env is not None and env.debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    message = cli_message(exc)
    if unexpected:
        message = f"unexpected {type(exc).__name__}: {message}; rerun with --debug for the traceback and report it"
    click.echo(error_line(message), err=True)


@click.group(name="posstate", cls=PosstateGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="posstate")
@common_options(top=True)
def cli() -> None:
    """Crash-safe, encrypted, backed-up position state for trading bots.

    Read-only commands (validate, show, diff, watch) take no lock and never write. Commands that replace
    files ask for confirmation on a terminal (or need --yes) and refuse while a bot holds the writer lock.
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
    try:
        agreed = click.confirm(prompt, err=True)
    except click.exceptions.Abort:
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
        if isinstance(wf.cause, FileExistsError):
            raise CliError(
                f"{out}: already exists; refusing to overwrite it; choose another path or move it away first"
            ) from None
        if isinstance(wf.cause, FileNotFoundError):
            raise StateNotFoundError(out.parent, what="directory", next_step="create it first or choose another path") from None
        raise PersistenceError(out, operation=wf.step, cause=wf.cause) from wf.cause


def json_out(data: Any) -> None:
    click.echo(to_json(data))
