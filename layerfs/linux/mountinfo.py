"""``/proc/self/mountinfo``, parsed: what is mounted where (proc(5)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")


def unoctal(field_text: str) -> str:
    """Decode mountinfo's octal escapes (``\\040`` space, ``\\011`` tab, ``\\012``, ``\\134``)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field_text)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo, unescaped (see proc(5))."""

    mount_id: int
    parent_id: int
    dev: tuple[int, int]
    root: str
    mount_point: str
    options: tuple[str, ...]
    fs_type: str
    source: str
    super_options: tuple[str, ...]

    @classmethod
    def parse(cls, line: str) -> MountEntry:
        left, sep, right = line.rstrip("\n").partition(" - ")
        fields = left.split(" ")
        rest = right.split(" ")
        if not sep or len(fields) < 6 or len(rest) < 3:
            raise ValueError(f"unparsable mountinfo line: {line!r}")
        major, _, minor = fields[2].partition(":")
        return cls(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            dev=(int(major), int(minor)),
            root=unoctal(fields[3]),
            mount_point=unoctal(fields[4]),
            options=tuple(fields[5].split(",")),
            fs_type=rest[0],
            source=unoctal(rest[1]),
            # split before decoding: a ',' inside a value is shown as \054
            super_options=tuple(unoctal(o) for o in " ".join(rest[2:]).split(",")),
        )


def mount_table() -> list[MountEntry]:
    """The calling process' mounts, in the kernel's order (a parent before its children)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [MountEntry.parse(line) for line in f if line.strip()]
