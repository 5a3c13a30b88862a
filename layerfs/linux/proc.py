"""Processes and the boot, as ``/proc`` tells them: the one "is this pid alive" rule.

A process is alive while ``/proc/<pid>/stat`` exists and its state is neither ``Z``
(a zombie waiting to be reaped) nor ``X`` (dead): a zombie has released its mounts and
files, so for every purpose of layerfs (stale mount records, FUSE daemons, benchmark
peers) it is gone. A pid of another user's process counts as alive (its stat is readable).
"""

from __future__ import annotations

import os
from collections.abc import Iterator


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` from field 3 (state) on, or None without such a process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) is in parentheses and may hold spaces or ')': split after the last ')'
    return data[data.rfind(b")") + 2 :].decode("ascii", "replace").split()


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone; None and 0 are never alive)."""
    if not pid or pid < 0:
        return False
    fields = stat_fields(pid)
    return fields is not None and bool(fields) and fields[0] not in ("Z", "X")


def command_line(pid: int) -> list[bytes] | None:
    """The arguments of ``pid`` (``/proc/<pid>/cmdline``), or None without such a process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data.split(b"\0")


def command_lines() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, arguments) of every live process but this one."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        argv = command_line(int(entry))
        if argv is not None and pid_alive(int(entry)):
            yield int(entry), argv


def in_initial_userns() -> bool:
    """Whether this process runs in the initial user namespace (uid_map: the identity map
    of all 2^32 ids). Unreadable counts as the initial one (no user namespaces at all)."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def boot_id() -> str:
    """This boot's random id (``/proc/sys/kernel/random/boot_id``), "unknown" if unreadable."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"
