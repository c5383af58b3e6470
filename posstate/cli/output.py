"""How the command line writes, as a Unix tool should (issue 15.8-15.10): a closed pipe, errors as JSON under
``--json``, ``--quiet`` stderr, and colour on a terminal only.

- A reader that goes away (``posstate show | head -1``) ends the command quietly with
  :data:`EXIT_CLOSED_PIPE` (141 = 128 + SIGPIPE, the status a shell reports for ``yes | head -1``); the
  rest of the output is sent to ``/dev/null`` so the interpreter's last flush cannot complain either.
- Under ``--json`` stdout holds exactly one JSON document per run (``watch``: one per line). A command's
  document is held back until the command ends (:func:`hold_json`); when the command fails, its error is
  added to that document as an ``error`` member, or is the document, ``{"error": {"message", "exit_code",
  "type"}}``. The exit code is the documented one either way; the ``Error:`` line still goes to stderr.
- ``--quiet``: stderr carries errors and prompts only (notes, warnings and progress bars are dropped).
- Colour: click strips ANSI codes when the stream is not a terminal; ``NO_COLOR`` or ``--no-color`` turn
  them off on a terminal too, ``--color`` forces them (see :func:`color_choice`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from posstate.cli.options import Env
from posstate.cli.render import to_json
from posstate.core.errors import PersistenceError, PosStateError
from posstate.storage import fileops as fs

#: The exit status of a command whose reader closed the pipe: 128 + SIGPIPE (13).
EXIT_CLOSED_PIPE = 141


# ------------------------------------------------------------------------------------------ a closed pipe
def closed_pipe(*, stderr: bool = False) -> int:
    """After a BrokenPipeError on stdout (and, with *stderr*, possibly on stderr: the error line had no reader
    either): point the stream at /dev/null, so nothing else fails on the way out, and return the exit status.
    Under a test runner the streams have no file descriptor; there is nothing to redirect."""
    for stream in (sys.stdout, sys.__stderr__ if stderr else None):
        try:
            fd = stream.fileno() if stream is not None else -1
        except (AttributeError, ValueError, io.UnsupportedOperation):
            continue
        if fd >= 0:
            fs.redirect_to_devnull(fd)
    return EXIT_CLOSED_PIPE


# ------------------------------------------------------------------------------------------ stdout that fails
class _GuardedStdout(io.TextIOBase):
    """stdout while the command line runs: a write that fails for another reason than a closed pipe (ENOSPC on
    ``> /dev/full``, EIO) becomes a PersistenceError naming ``<stdout>`` (one ``Error:`` line, exit 1); every
    later write raises it again (see :func:`guarded_stdout` for the end of the run)."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.failed: PersistenceError | None = None

    def write(self, s: str) -> int:
        if not isinstance(s, str):  # a text stream, as click's probe with b"" must find
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if not s:  # click probes a stream with an empty write: nothing is lost if it fails
            with contextlib.suppress(OSError):
                self._real.write(s)
            return 0
        return int(self.guard(lambda: self._real.write(s)))

    def flush(self) -> None:
        self.guard(self._real.flush)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return bool(self._real.isatty())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self._real, "encoding", "utf-8"))

    @property
    def buffer(self) -> Any:  # click writes bytes through it
        return _GuardedBytes(self)

    def fileno(self) -> int:
        return int(self._real.fileno())

    def guard(self, op: Any) -> Any:
        if self.failed is not None:
            raise self.failed
        try:
            return op()
        except BrokenPipeError:
            raise
        except OSError as exc:
            if isinstance(exc, PosStateError):
                raise
            self.failed = PersistenceError(
                "<stdout>",
                operation="write",
                cause=exc,
                outcome="the output is incomplete",
                next_step="send it where it can be written (free space, or redirect stdout elsewhere)",
            )
            raise self.failed from None


class _GuardedBytes(io.RawIOBase):
    def __init__(self, text: _GuardedStdout) -> None:
        self._text = text
        self._real = getattr(text._real, "buffer", None)

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        if self._real is None:
            return len(data)
        return int(self._text.guard(lambda: self._real.write(data)))

    def flush(self) -> None:
        if self._real is not None:
            self._text.guard(self._real.flush)


class _ClosedStdout(io.TextIOBase):
    """What stdout is when the process started with it closed (``posstate show >&-``): Python leaves
    ``sys.stdout`` None and click drops every write to it silently, so the output would vanish with exit 0."""

    def write(self, s: str) -> int:
        raise OSError(errno.EBADF, "stdout is closed")

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise io.UnsupportedOperation("stdout is closed")


@contextmanager
def guarded_stdout() -> Iterator[_GuardedStdout]:
    """While the command line runs, a failing stdout is a PersistenceError (see :class:`_GuardedStdout`), a
    closed one too (``>&-``). Yields the guard: its ``failed`` error, if any, is what the run must end with;
    stdout is then pointed at /dev/null so the interpreter's last flush cannot fail again."""
    real = sys.stdout
    guard = _GuardedStdout(real if real is not None else _ClosedStdout())
    sys.stdout = guard
    try:
        yield guard
    finally:
        sys.stdout = real
        if guard.failed is not None and real is not None:
            with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation, OSError):
                fs.redirect_to_devnull(real.fileno())


# ------------------------------------------------------------------------------------------ JSON documents
def echo_text(text: str) -> None:
    """*text* on stdout in pieces of at most PIPE_BUF bytes: CPython can lose the EPIPE of one large write to a
    pipe whose reader left (a short write, then success), so a big document would end with status 0 and no
    sign that it was cut."""
    step = 1024  # characters: at most 4096 bytes of UTF-8
    for at in range(0, len(text), step):
        click.echo(text[at : at + step], nl=False)


def echo_json(data: Any) -> None:
    """*data* as indented JSON on stdout (see :func:`echo_text`)."""
    echo_text(to_json(data) + "\n")


def hold_json(env: Env | None, data: Any) -> None:
    """A command's JSON document: printed when the command ends (with its error, if it fails)."""
    if env is None:
        echo_json(data)
    else:
        env.held_json.append(data)


def flush_json(env: Env | None) -> None:
    """Print the documents a command held back (it finished without an error)."""
    if env is None:
        return
    held, env.held_json = env.held_json, []
    for doc in held:
        echo_json(doc)


def error_type(exc: BaseException) -> str:
    """The ``type`` of a JSON error: the PosStateError class (public API), ``UsageError`` for any bad usage,
    ``Interrupted``, or ``InternalError`` (``CliError``, a refusal of the command line itself, is named by
    :mod:`posstate.cli.base`, which defines it)."""
    if isinstance(exc, PosStateError):
        return type(exc).__name__
    if isinstance(exc, click.UsageError):
        return "UsageError"
    if isinstance(exc, (click.exceptions.Abort, KeyboardInterrupt)):
        return "Interrupted"
    if isinstance(exc, click.ClickException):
        return "UsageError"
    return "InternalError"


def print_json_error(env: Env | None, *, message: str, code: int, kind: str) -> None:
    """The error as JSON on stdout: merged into the one document the command held back, else on its own."""
    error = {"message": " ".join(message.split()), "exit_code": code, "type": kind}
    held = env.held_json if env is not None else []
    if env is not None:
        env.held_json = []
    if len(held) == 1 and isinstance(held[0], dict) and "error" not in held[0]:
        echo_json({**held[0], "error": error})
        return
    for doc in held:
        echo_json(doc)
    echo_json({"error": error})


def wants_json(args: list[str]) -> bool:
    """``--json`` among the words before ``--`` (for errors raised before the option was parsed)."""
    words = args[: args.index("--")] if "--" in args else args
    return "--json" in words


# ------------------------------------------------------------------------------------------ quiet stderr
class _QuietStderr(io.TextIOBase):
    """stderr while a command runs: everything passes unless ``--quiet`` was given (decided at each write,
    since a subcommand's own ``--quiet`` is parsed after the command started)."""

    def __init__(self, real: Any, env: Env) -> None:
        self._real = real
        self._env = env

    def write(self, s: str) -> int:
        if self._env.quiet:
            return len(s)
        return int(self._real.write(s))

    def flush(self) -> None:
        self._real.flush()

    def isatty(self) -> bool:  # progress bars ask: none under --quiet
        return not self._env.quiet and bool(self._real.isatty())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self._real, "encoding", "utf-8"))

    @property
    def buffer(self) -> Any:  # click writes bytes through it; quiet drops them too
        return _QuietBytes(self._real, self._env)

    def fileno(self) -> int:
        return int(self._real.fileno())


class _QuietBytes(io.RawIOBase):
    def __init__(self, real: Any, env: Env) -> None:
        self._real = getattr(real, "buffer", None)
        self._env = env

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        if self._env.quiet or self._real is None:
            return len(data)
        return int(self._real.write(data))

    def flush(self) -> None:
        if self._real is not None:
            self._real.flush()


@contextmanager
def quiet_stderr(env: Env) -> Iterator[Any]:
    """While a command runs, sys.stderr honours ``--quiet``; yields the real stream (for prompts)."""
    real = sys.stderr
    env.real_stderr = real
    sys.stderr = _QuietStderr(real, env)
    try:
        yield real
    finally:
        sys.stderr = real
        env.real_stderr = None


@contextmanager
def unquieted(env: Env | None) -> Iterator[None]:
    """The real stderr back for a moment (a confirmation prompt is never dropped by --quiet)."""
    real = env.real_stderr if env is not None else None
    if real is None:
        yield
        return
    quiet, sys.stderr = sys.stderr, real
    try:
        yield
    finally:
        sys.stderr = quiet


# ------------------------------------------------------------------------------------------ terminal safety
#: C0 and C1 controls, DEL, and the bidi overrides: what a terminal may act on or reorder rather than show.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """*text* with every control character escaped (``\\x1b``, ``\\u202e``): a file name the attacker chose
    (a planted ``quarantine/`` file, a path in an error) can then never drive the operator's terminal (retitle it,
    clear it, hide a line). Colour is added after this, by :func:`paint` and :func:`error_prefix`. Undecodable
    bytes of a path (lone surrogates) read ``\\xff``, as in the JSON (:func:`posstate.serve.shapes.to_json`)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that is no escaped byte
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROLS.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


# ------------------------------------------------------------------------------------------ colour
def color_choice(env_vars: Any = None) -> bool | None:
    """False when ``NO_COLOR`` is set to anything non-empty (no-color.org); None: let click decide (colour
    on a terminal only)."""
    env_vars = os.environ if env_vars is None else env_vars
    return False if env_vars.get("NO_COLOR") else None


_STYLES = (
    (re.compile(r"^(\s+)(ok)(\s)"), "green"),
    (re.compile(r"^(\s+)(FAIL)(\s)"), "red"),
    (re.compile(r"^()(VALID)(:)"), "green"),
    (re.compile(r"^()(INVALID|NOT CHECKED|OUT OF SYNC)(\b)"), "red"),
    (re.compile(r"^()(IN SYNC)(\b)"), "green"),
    (re.compile(r"^()(\+ .*)()$"), "green"),
    (re.compile(r"^()(- .*)()$"), "red"),
    (re.compile(r"^()(~ .*)()$"), "yellow"),
)
_FLAG = re.compile(r"\[[A-Z][A-Z-]+\]|\bUNSAFE\b|\bDAMAGED\b")


def paint(line: str) -> str:
    """*line* with its verdict in colour (validate, diff, reconcile, watch flags); click removes the codes
    again where colour is off, so callers always paint."""
    for pattern, colour in _STYLES:
        m = pattern.match(line)
        if m:
            a, word, b = m.group(1), m.group(2), m.group(3)
            return a + click.style(word, fg=colour, bold=colour == "red") + b + line[m.end() :]
    return _FLAG.sub(lambda m: click.style(m.group(0), fg="red", bold=True), line)


def error_prefix(line: str) -> str:
    """``Error:`` in red (removed again where colour is off)."""
    if line.startswith("Error: "):
        return click.style("Error:", fg="red", bold=True) + line[len("Error:") :]
    return line
