"""Durations as written in configuration: "500ms", "5s", "15min", "2h", "7d"."""

from __future__ import annotations

import re

_UNITS_S = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h|d)?\s*$")


def parse_duration_s(value: object) -> float:
    """Seconds in a duration; a bare number counts as seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number with a unit, such as '5s' or '15min'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            return float(match.group(1)) * _UNITS_S[match.group(2) or "s"]
    raise ValueError(f"{value!r} is not a duration; write it as '500ms', '5s', '15min', '2h' or '7d'")


def postgres_interval(seconds: float) -> str:
    """A duration as PostgreSQL's timeout settings take it (whole milliseconds)."""
    return f"{round(seconds * 1000)}ms"
