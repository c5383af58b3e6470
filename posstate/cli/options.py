"""The command line's context and common options: :class:`Env` (what the options chose: state dir, config
file, key file, --json, --debug, --quiet, --verbose, colour), the options every command accepts, log display,
and the options several commands share (a state path argument, ``--snapshot-only``).

Configuration precedence (issue 15.10): flags > environment > file. The state directory is ``--state-dir``,
else ``POSSTATE_DIR``, else ``./state``; the config file is ``--config``, else ``POSSTATE_CONFIG``, else
``posstate.toml`` in the state directory when it exists. A state directory from a flag or the environment
places the config file's state file (and its backups) there. The state directory's own file may not loosen a
check (:mod:`posstate.cli.dirconfig`): anyone who can write the directory could have written it.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from posstate.cli.dirconfig import check_named_in_state_dir, in_state_dir, read_state_dir_config
from posstate.core.config import StateConfig
from posstate.core.errors import (
    ConfigError,
    MissingKeyError,
)
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring, read_key_file

F = TypeVar("F", bound=Callable[..., Any])

#: A state file or directory argument (commands default it from --state-dir).
PATH_ARG = click.Path(dir_okay=True, path_type=str)
#: ``--snapshot-only``: read the state file alone, without replaying its journal (show, diff, export).
SNAPSHOT_ONLY = click.option("--snapshot-only", is_flag=True, help="Read the state file alone, without replaying its journal.")
#: The config file a state directory may hold (read when neither --config nor POSSTATE_CONFIG names one).
CONFIG_IN_STATE_DIR = "posstate.toml"


# ------------------------------------------------------------------------------------------ context
@dataclass
class Env:
    """What the common options say; the config and keyring are built on first use."""

    state_dir: str | None = None
    config_file: str | None = None
    key_file: str | None = None
    json: bool = False
    debug: bool = False
    quiet: bool = False
    verbose: bool = False
    #: Where the config came from, for --verbose: "--config", "POSSTATE_CONFIG", "state directory" or None.
    config_source: str | None = None
    #: Where the state directory came from, for --verbose: "--state-dir" or "POSSTATE_DIR" (None: the default).
    state_dir_source: str | None = None
    #: JSON documents a command printed, held back until it ends (:mod:`posstate.cli.output`).
    held_json: list[Any] = field(default_factory=list, repr=False)
    #: The real stderr while a command runs behind the --quiet filter (prompts are written to it).
    real_stderr: Any = field(default=None, repr=False)
    _config: StateConfig | None = field(default=None, repr=False)
    _keyring: Keyring | None = field(default=None, repr=False)
    _keyring_done: bool = field(default=False, repr=False)

    def config(self) -> StateConfig:
        if self._config is None:
            _state_dir_kind(self.state_dir or "state")
            path = self.config_path()
            if path and self.config_source == "state directory":
                cfg: StateConfig | None = read_state_dir_config(path)  # planted by anyone who can write the directory
            else:
                cfg = StateConfig.from_file(_config_file(path)) if path else None
            if cfg is None:
                cfg = StateConfig.in_dir(self.state_dir or "state")
            elif self.state_dir or self.config_source == "state directory":
                d = Path(self.state_dir or "state")
                cfg = cfg.replace(state_file=str(d / cfg.state_path.name), backup_dir=str(d / "backups"))
            if path and self.config_source != "state directory" and in_state_dir(path, cfg.state_dir):
                check_named_in_state_dir(cfg, path)  # named, but as writable as the directory: the same limits
            self._config = cfg
            if self.verbose:
                where = f"{self.state_dir} (from {self.state_dir_source})" if self.state_dir else "./state (the default)"
                conf = f"{path} (from {self.config_source})" if path else "none (defaults)"
                click.echo(f"info: state directory {where}; config file {conf}; state file {cfg.state_path}", err=True)
        return self._config

    def config_path(self) -> str | None:
        """The config file to read (see the module docstring for the order), or None."""
        if self.config_file:
            self.config_source = self.config_source or "--config"
            return self.config_file
        found = Path(self.state_dir or "state") / CONFIG_IN_STATE_DIR
        if fs.exists(found):
            self.config_source = "state directory"
            return str(found)
        return None

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


def _state_dir_kind(path: str) -> None:
    """A state directory that exists but is not a directory (``--state-dir /dev/null``) is named for what it is
    (ConfigError, exit 2) instead of failing later with ENOTDIR on a file inside it, or waiting on it (watch)."""
    import stat

    try:
        st = fs.stat_(path)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            too_long = "a name in this path is longer than the file system allows; give a state directory"
            raise ConfigError(too_long, path=path) from None
        return  # absent (commands say "no such state directory") or unreadable (their own error)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"is {fs.file_kind(st.st_mode)}, not a directory (give a state directory)", path=path)


def _config_file(path: str) -> str:
    """*path*, refused with a ConfigError (exit 2) when it is not a regular file (``--config /dev/null`` would
    otherwise read as an empty, valid config)."""
    import stat

    try:
        st = fs.stat_(path)
    except FileNotFoundError:
        return path  # from_file says "config file not found"
    except OSError as exc:
        raise ConfigError(f"cannot read config ({exc.strerror})", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"is {fs.file_kind(st.st_mode)}, not a config file (give a TOML file)", path=path)
    return path


def _setter(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def store(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value not in (None, False):
            setattr(ctx.ensure_object(Env), name, value)
            if name in ("debug", "verbose"):
                show_logs(debug=name == "debug", verbose=True)  # --debug/--verbose after the command name
            from_env = ctx.get_parameter_source(_param.name or "") == click.core.ParameterSource.ENVIRONMENT
            if name == "config_file":
                ctx.ensure_object(Env).config_source = "POSSTATE_CONFIG" if from_env else "--config"
            if name == "state_dir":
                ctx.ensure_object(Env).state_dir_source = "POSSTATE_DIR" if from_env else "--state-dir"

    return store


def _color(ctx: click.Context, _param: click.Parameter, value: bool | None) -> None:
    """--color/--no-color: force colour on or off (default: on a terminal only, off when NO_COLOR is set)."""
    if value is not None:
        ctx.color = value
        ctx.find_root().color = value


class _EchoHandler(logging.Handler):
    """The library's log records on stderr, through click (so a test runner's stderr is the one used)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)
        except Exception:  # pragma: no cover - logging must never break a command
            self.handleError(record)


def show_logs(*, debug: bool, verbose: bool = False) -> None:
    """With --debug, show the library's debug and info records too; with --verbose its info records (inside
    :func:`log_scope`). --quiet drops the warnings with the rest of stderr."""
    level = logging.DEBUG if debug else logging.INFO if verbose else None
    if level is None:
        return
    log = logging.getLogger("posstate")
    for h in log.handlers:
        if isinstance(h, _EchoHandler) and h.level > level:
            h.setLevel(level)
            if log.level == logging.NOTSET or log.level > level:
                log.setLevel(level)


@contextmanager
def log_scope(*, debug: bool, verbose: bool = False) -> Iterator[None]:
    """Show the library's warnings on stderr for one command; leave the logger as it was afterwards
    (the CLI runs in-process under tests, next to code that inspects posstate's logging)."""
    log = logging.getLogger("posstate")
    level = log.level
    handler = _EchoHandler(logging.WARNING)
    log.addHandler(handler)
    try:
        show_logs(debug=debug, verbose=verbose)
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


#: The first three common options, in order: the ones a command may *omit* (it defines its own).
_PATH_OPTIONS = ("state-dir", "config", "key-file")


def common_options(*, top: bool = False, hide: tuple[str, ...] = (), omit: tuple[str, ...] = ()) -> Callable[[F], F]:
    """--state-dir, --config, --key-file, --json, --quiet, --verbose, --color/--no-color, --debug: accepted
    before or after the command name. *hide*: options that mean nothing to this command (``keygen
    --state-dir``), still accepted but left out of its --help. *omit*: options the command defines itself with
    another meaning (``demo --state-dir``)."""

    def deco(f: F) -> F:
        opts = [
            click.option(
                "--state-dir",
                type=click.Path(file_okay=False),
                envvar="POSSTATE_DIR" if top else None,
                show_envvar=top,
                expose_value=False,
                hidden="state-dir" in hide,
                callback=_setter("state_dir"),
                help="State directory (default ./state; overrides the paths of --config).",
            ),
            click.option(
                "--config",
                type=click.Path(dir_okay=False),
                envvar="POSSTATE_CONFIG" if top else None,
                show_envvar=top,
                expose_value=False,
                hidden="config" in hide,
                callback=_setter("config_file"),
                help=f"TOML file with StateConfig fields (default: {CONFIG_IN_STATE_DIR} in the state directory, if any).",
            ),
            click.option(
                "--key-file",
                type=click.Path(),  # not dir_okay=False: a directory is a key problem (exit 3), as for POSSTATE_KEY_FILE
                expose_value=False,
                hidden="key-file" in hide,
                callback=_setter("key_file"),
                help="File holding the base64 key (else POSSTATE_KEY, POSSTATE_KEY_FILE, POSSTATE_PASSPHRASE).",
            ),
            click.option(
                "--json",
                "json_",
                is_flag=True,
                expose_value=False,
                callback=_setter("json"),
                help="Print data (and errors) as JSON.",
            ),
            click.option(
                "-q", "--quiet", is_flag=True, expose_value=False, callback=_setter("quiet"), help="Only errors on stderr."
            ),
            click.option(
                "-v",
                "--verbose",
                is_flag=True,
                expose_value=False,
                callback=_setter("verbose"),
                help="Also the library's info messages.",
            ),
            click.option(
                "--color/--no-color",
                default=None,
                expose_value=False,
                callback=_color,
                help="Colour (default: on a terminal, unless NO_COLOR is set).",
            ),
            click.option(
                "--debug", is_flag=True, expose_value=False, callback=_setter("debug"), help="Show a traceback on errors."
            ),
        ]
        kept = [o for n, o in zip(_PATH_OPTIONS, opts, strict=False) if n not in omit] + opts[len(_PATH_OPTIONS) :]
        for opt in reversed(kept):
            f = opt(f)
        return f

    return deco
