"""Checks for the server's numeric options: a NaN, infinite, huge or negative value is a :class:`ServeError`
(a ValueError) before anything listens, never a poll thread dying on it later or an age limit that never
fires (NaN compares false with everything)."""

from __future__ import annotations

import math
from typing import Any

from posstate.core.errors import ServeError

#: The longest period any option may name (a week): larger values overflow the event loop's timers.
MAX_SECONDS = 7 * 24 * 3600.0


def seconds(name: str, value: Any, *, zero_ok: bool = False) -> float:
    """*value* as seconds: a finite number, > 0 (>= 0 with *zero_ok*), at most MAX_SECONDS."""
    low = "at least 0" if zero_ok else "more than 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ServeError(f"{name} must be a number of seconds, got {type(value).__name__}", next_step=f"give {name} in seconds")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok) or v > MAX_SECONDS:
        raise ServeError(
            f"{name} must be {low} and at most {MAX_SECONDS:g} seconds, got {value!r}", next_step=f"give a finite {name}"
        )
    return v


def port(value: Any) -> int:
    """*value* as a TCP port, 0 (any free port) to 65535; a bool, a float or a string is refused (True would
    bind port 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ServeError(f"port must be a whole number from 0 to 65535, got {value!r}", next_step="give port=0 for any free port")
    return value


def host(value: Any) -> str:
    """*value* as an address to bind: a string."""
    if not isinstance(value, str):
        raise ServeError(f"host must be an address as text, got {type(value).__name__}", next_step='give host="127.0.0.1"')
    return value


def count(name: str, value: Any) -> int:
    """*value* as a count of at least 1 (0 would mean "unbounded" to a queue)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ServeError(f"{name} must be a whole number >= 1, got {value!r}", next_step=f"give a positive {name}")
    return value
