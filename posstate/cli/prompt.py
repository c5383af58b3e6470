"""A confirmation prompt that a signal always interrupts.

``input()`` blocks in ``read(2)`` on the terminal. A SIGTERM that arrives after the interpreter last looked
for pending signals but before that read starts sets the C-level flag and nothing more: the Python handler
(which ends the command with exit 143) would only run once the read returns, so the command hung until the
operator typed a line. Here the read waits in ``select`` on the terminal and on a wake-up pipe that the
C-level handler writes to (``signal.set_wakeup_fd``): a signal that came before the wait leaves a byte in the
pipe, the wait returns at once, and the handler runs at the next bytecode.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator

import click.termui

__all__ = ["signal_aware_prompts"]


def _read_line(text: str) -> str:
    """``input(text)`` for a prompt on the main thread, woken by any signal (its handler then runs)."""
    sys.stdout.write(text)  # click redirects stdout to stderr for an err=True prompt
    sys.stdout.flush()
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        try:
            fd = sys.stdin.fileno()
            while True:
                ready, _, _ = select.select([fd, r], [], [])
                if r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(r, 512)  # the handler runs at the next bytecode (SIGTERM raises here)
                    continue
                line = sys.stdin.readline()
                if not line:
                    raise EOFError
                return line.rstrip("\n")
        finally:
            signal.set_wakeup_fd(old)
    finally:
        os.close(r)
        os.close(w)


def _terminal_fd() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor, or closed
        return False


@contextlib.contextmanager
def signal_aware_prompts() -> Iterator[None]:
    """Inside the block, click's prompts read the terminal with :func:`_read_line` (main thread only: the
    wake-up pipe is per process and only the main thread runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread() or not _terminal_fd():
        yield  # another thread, or a stdin that is no terminal descriptor (a test runner's): click's own input
        return
    before = click.termui.visible_prompt_func
    click.termui.visible_prompt_func = _read_line
    try:
        yield
    finally:
        click.termui.visible_prompt_func = before
