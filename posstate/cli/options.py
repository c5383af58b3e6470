"""The command line's context and common options: :class:`Env` (what the options chose: state dir, config
file, key file, --json, --debug), the options every command accepts, log display, and the options several
commands share (a state path argument, ``--snapshot-only``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from posstate.core.config import StateConfig
from posstate.core.errors import (
    MissingKeyError,
)
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring, read_key_file

F = TypeVar("F", bound=Callable[..., Any])

#: A state file or directory argument (commands default it from --state-dir).
PATH_ARG = click.Path(dir_okay=True, path_type=str)
#: ``--snapshot-only``: read the state file alone, without replaying its journal (show, diff, export).
SNAPSHOT_ONLY = click.option("--snapshot-only", is_flag=True, help="Read the state file alone, without replaying its journal.")


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
