"""Text for people and for image configs: sizes, durations, RFC 3339 times, aligned tables.

Level 0: no other layerfs module is imported, so the CLI, progress bars, operations and the
benchmark all format the same way from here.

- ``human_size``: decimal units as go-units ``HumanSizeWithPrecision`` (``429.9MB``), or
  binary ones (``100MiB``) for the benchmark's labels.
- ``human_duration``: go-units ``HumanDuration`` (``About an hour``, ``3 weeks``).
- ``rfc3339`` and ``rfc3339_nano`` write times as Go's ``time.RFC3339Nano`` in UTC with ``Z``;
  ``parse_rfc3339`` (microseconds) and ``parse_rfc3339_ns`` (nanoseconds) read what Go and
  Python write (up to nanoseconds, any offset).
- ``parse_size`` reads ``20MB``, ``512KiB``, ``1000``.
- ``table``: columns aligned like Go's ``text/tabwriter``, without trailing blanks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime

__all__ = [
    "human_duration",
    "human_size",
    "parse_rfc3339",
    "parse_rfc3339_ns",
    "parse_size",
    "rfc3339",
    "rfc3339_nano",
    "table",
    "utc",
]

# --- sizes ------------------------------------------------------------------------------

_DECIMAL_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")


def human_size(size: float, precision: int = 4, *, binary: bool = False) -> str:
    """A size with its unit and no space between them.

    By default go-units ``HumanSizeWithPrecision``: steps of 1000, ``%.<precision>g``, so
    0 -> "0B", 1234 -> "1.234kB", 429_900_000 -> "429.9MB". Python's ``g`` format and Go's
    ``%g`` follow the same rules (trailing zeros dropped, an exponent only from ``precision``
    digits on), so edge cases match go-units too: 999_960 -> "1000kB", not "1MB".

    ``binary``: steps of 1024 and IEC units, a whole number as it is and anything else with
    one decimal (``precision`` is not used): 4096 -> "4KiB", 1.5 * 2**30 -> "1.5GiB".
    """
    base, units = (1024.0, _BINARY_UNITS) if binary else (1000.0, _DECIMAL_UNITS)
    value = float(size)
    unit = 0
    while value >= base and unit < len(units) - 1:
        value /= base
        unit += 1
    if binary:
        return f"{value:g}{units[unit]}" if value == int(value) else f"{value:.1f}{units[unit]}"
    return f"{value:.{precision}g}{units[unit]}"


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")
_SIZE_UNITS = {"": 1, "b": 1}
for _i, _u in enumerate(("k", "m", "g", "t", "p", "e"), start=1):
    _SIZE_UNITS[_u] = _SIZE_UNITS[_u + "b"] = 1000**_i
    _SIZE_UNITS[_u + "ib"] = 1024**_i


def parse_size(text: str) -> int:
    """A size as people write it: ``1000``, ``20MB``, ``20 mb``, ``1.5GB`` (steps of 1000, as
    ``human_size`` writes them and dive's ``.dive-ci`` reads them), ``512KiB`` (steps of 1024).
    Raises ``ValueError`` for anything else."""
    m = _SIZE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


# --- durations --------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """go-units ``HumanDuration``: "About a minute", "3 hours", "2 weeks", "2 years".

    Like Go, seconds and minutes truncate but hours round (half away from zero), so 1h29m
    is "About an hour" and 1h31m is "2 hours"; days, weeks and months are whole divisions
    of the rounded hours, years of the truncated ones. Negative durations (a clock that
    went backwards) read "Less than a second", as in docker.
    """
    secs = int(seconds)
    if secs < 1:
        return "Less than a second"
    if secs == 1:
        return "1 second"
    if secs < 60:
        return f"{secs} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = math.floor(seconds / 3600 + 0.5)  # Go's math.Round, not Python's banker's round
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


# --- times ------------------------------------------------------------------------------


def utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive datetime is taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def rfc3339(moment: datetime) -> str:
    """``moment`` as ``rfc3339_nano`` writes it (UTC, ``Z``, the fraction without trailing
    zeros, none on a whole second): ``2024-06-01T10:00:00Z``, ``2024-06-01T10:00:00.25Z``.
    The one time format of every JSON view (a ``datetime`` holds microseconds; times read
    with ``parse_rfc3339_ns`` keep all nine digits)."""
    u = utc(moment)
    return rfc3339_nano(int(u.replace(microsecond=0).timestamp()) * 1_000_000_000 + u.microsecond * 1000)


def rfc3339_nano(ns: int) -> str:
    """Nanoseconds since the epoch as Go's ``time.RFC3339Nano`` in UTC.

    What docker and buildah write into image configs (``created``): up to nine fraction
    digits with trailing zeros dropped, no fraction at all on a whole second:
    ``2026-12-07T13:22:43.123456789Z``, ``2026-12-07T13:22:43.5Z``, ``2026-12-07T13:22:43Z``.
    """
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    digits = f"{frac:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def parse_rfc3339(value: object) -> datetime | None:
    """An RFC 3339 time as written by Go (up to nanoseconds) or Python; None if it is not one.

    The fraction is cut to microseconds, the most a ``datetime`` holds.
    """
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    if "." in text:
        head, _, rest = text.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        frac, tz = rest[:digits], rest[digits:]  # the offset after the fraction stays
        text = f"{head}.{frac[:6].ljust(6, '0')}{tz}" if frac else text
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def parse_rfc3339_ns(value: object) -> int | None:
    """An RFC 3339 time as nanoseconds since the epoch, keeping all nine fraction digits
    (``parse_rfc3339`` keeps six); None if it is not one. ``rfc3339_nano`` writes it back."""
    moment = parse_rfc3339(value)
    if moment is None:
        return None
    assert isinstance(value, str)
    head, dot, rest = value.strip().partition(".")
    digits = rest[: len(rest) - len(rest.lstrip("0123456789"))] if dot else ""
    whole = utc(moment.replace(microsecond=0))
    seconds = int(whole.timestamp())
    return seconds * 1_000_000_000 + int(digits[:9].ljust(9, "0") or 0)


# --- tables -----------------------------------------------------------------------------


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    minwidth: int = 0,
    padding: int = 3,
    right: Collection[int] = (),
) -> str:
    """Aligned columns like Go's ``tabwriter.NewWriter(out, minwidth, 1, padding, ' ', 0)``.

    Every column but the last is as wide as its widest cell plus ``padding`` spaces, and at
    least ``minwidth``; docker's tables are ``minwidth=10, padding=3``. The columns whose
    indexes are in ``right`` are right-aligned. Trailing blanks are stripped, so a line
    never ends in spaces. One line per row after the header, each ending in a newline.
    """
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(minwidth - padding, *(len(line[col]) for line in lines)) for col in range(len(header))]
    gap = " " * padding
    out = []
    for line in lines:
        cells = [
            cell.rjust(width) if col in right else cell.ljust(width)
            for col, (cell, width) in enumerate(zip(line, widths, strict=False))
        ]
        out.append(gap.join(cells).rstrip())
    return "\n".join(out) + "\n"
