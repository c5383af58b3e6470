"""The message of a refused serve option names the range it accepts (found following docs/SERVE.md)."""

from __future__ import annotations

import pytest

import posstate
from posstate.core.errors import ServeError


@pytest.mark.parametrize("value", [float("nan"), -1.0])
def test_age_limit_message_names_its_range(value: float) -> None:
    """docs: a refused age limit says it must be at least 0 (not "must be 0")."""
    with pytest.raises(ServeError) as info:
        posstate.HealthLimits(max_save_age=value)
    assert "must be at least 0 and at most 604800 seconds" in str(info.value)


def test_interval_message_names_its_range() -> None:
    """docs: a refused interval says it must be more than 0."""
    with pytest.raises(ServeError) as info:
        posstate.StreamOptions(heartbeat_interval=0)
    assert "must be more than 0 and at most 604800 seconds" in str(info.value)
