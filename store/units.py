"""Sizes (``512M``, ``2G``) and durations (``90s``, ``10m``, ``2h``, ``30d``): one parser each.

Every option, config key and report in jbl goes through here so they read the same everywhere.
Sizes are binary (``1K`` = 1024); a bare number is bytes. Durations without a unit are seconds.
Pure functions, thread-safe.
"""

from __future__ import annotations

import re

from .errors import UsageError

_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*", re.IGNORECASE)  # fullmatch
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)


def parse_size(text: str, *, what: str = "size") -> int:
    """``'512M'`` -> 536870912. Raises UsageError on anything malformed or negative."""
    m = _SIZE_RE.fullmatch(str(text))
    if not m:
        raise UsageError(f"invalid {what} {text!r}: expected a number with an optional unit "
                         "K, M, G or T (e.g. 512M, 2G)")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    return int(value)


def parse_duration(text: str, *, what: str = "duration") -> float:
    """``'10m'`` -> 600.0, ``'1h30m'`` -> 5400.0. Raises UsageError when malformed."""
    s = str(text).strip()
    pos, total, matched = 0, 0.0, False
    while pos < len(s):
        m = _DURATION_RE.match(s, pos)
        if not m or m.end() == pos:
            matched = False
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
        pos, matched = m.end(), True
    if not matched:
        raise UsageError(f"invalid {what} {text!r}: expected a number with a unit "
                         "s, m, h or d (e.g. 90s, 10m, 2h, 30d)")
    return total


def format_size(n: int | float) -> str:
    """1536 -> '1.5K'; the inverse of parse_size for display."""
    n = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            if unit == "B":
                return f"{int(n)}B"
            return f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}P"  # pragma: no cover


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"
