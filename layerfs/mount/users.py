"""Who writes into an upper directory now: the one home of the one-read-write-mount rule.

An overlay's upper directory takes one writer at a time: kernel overlayfs only warns
("upperdir is in-use ... undefined behavior") and mounts anyway, FUSE overlays do not notice
at all. ``upper_users`` finds every live writer, whoever started it: kernel overlays whose
``upperdir`` it is (``/proc/self/mountinfo``) and FUSE overlay daemons (layerfs-fuse,
fuse-overlayfs; started by layerfs, containerd's mount helper, podman's ``mount_program``
or by hand) given it as ``upperdir=`` (their command lines in ``/proc``).
``check_upper_free`` refuses a second one: ``layerfs mount`` (``layerfs.mounting``) and
``layerfs-fuse`` itself (``layerfs.fuse.main``) both call it.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass

from layerfs.errors import InUse, LayerfsError
from layerfs.linux.mountinfo import mount_table
from layerfs.linux.proc import command_lines
from layerfs.mount.spec import MountSpec, split_options


@dataclass(frozen=True)
class UpperUser:
    """A live mount writing into an upper directory."""

    target: str
    backend: str  # "kernel" or the FUSE program's name
    pid: int | None

    def __str__(self) -> str:
        return f"{self.target} ({self.backend}, pid {self.pid if self.pid is not None else '-'})"


_FUSE_OVERLAY_PROGRAMS = {b"layerfs-fuse": "fuse", b"layerfs.fuse.main": "fuse", b"fuse-overlayfs": "fuse-overlayfs"}


def _fuse_program(argv: list[bytes]) -> str | None:
    """The backend name of a FUSE overlay program's command line (its first words), or None."""
    for a in argv[:4]:
        for name, backend in _FUSE_OVERLAY_PROGRAMS.items():
            if a.endswith(name):
                return backend
    return None


def upper_users(upper: str, exclude_pids: Collection[int] = ()) -> list[UpperUser]:
    """Every live mount writing into ``upper`` (see the module docstring); FUSE daemons
    whose pid is in ``exclude_pids`` (the caller itself) are not counted."""
    upper = os.path.realpath(upper)
    found: list[UpperUser] = []
    for m in mount_table():
        if m.fs_type != "overlay":
            continue
        for o in m.super_options:
            k, sep, v = o.partition("=")
            if sep and k == "upperdir" and (v == upper or (not v.startswith("/") and upper.endswith("/" + v))):
                found.append(UpperUser(m.mount_point, "kernel", None))
    for pid, argv in command_lines():
        program = _fuse_program(argv)
        if program is None or pid in exclude_pids:
            continue
        for i, a in enumerate(argv):
            opts = argv[i + 1] if a == b"-o" and i + 1 < len(argv) else a[2:] if a.startswith(b"-o") else None
            if opts is None or b"upperdir=" not in opts:
                continue
            try:
                value = MountSpec("overlay", "overlay", tuple(split_options(os.fsdecode(opts)))).upper
            except LayerfsError:
                continue
            if value is not None and os.path.realpath(value) == upper:
                args = [os.fsdecode(x) for x in argv if x and not x.startswith(b"-") and x != opts]
                found.append(UpperUser(args[-1] if args else "?", program, pid))
                break
    return found


def check_upper_free(upper: str, what: str, unmount_hint: str = "umount",
                     exclude_pids: Collection[int] = ()) -> None:
    """``InUse`` (one line naming the first mount) when a live mount already writes into
    ``upper``; ``what`` names what is being mounted, ``unmount_hint`` the command to suggest."""
    users = upper_users(upper, exclude_pids)
    if users:
        raise InUse(f"{what} is already mounted read-write at {users[0]}: one read-write mount at a time; "
                    f"unmount it first ({unmount_hint} {users[0].target})")
