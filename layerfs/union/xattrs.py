"""Extended attribute names: which are overlay state, and how user names are stored.

The rules owned here (kernel overlayfs >= 6.7 "xattr escaping", which lets an overlay hold
files of a nested overlay; the names, ``PRIVATE_PREFIXES``, ``ESCAPE`` and ``STATE_NAMES``,
are ``layerfs.union.whiteout``'s), for a mount whose own prefix is ``trusted.overlay.`` (or
``user.overlay.`` with user xattrs, ``LayerFormat.userxattr``):

- ``<own>NAME`` on a layer file is overlay state (opaque, redirect, origin, whiteout, our
  ``layerfs.origin``...): never shown, never copied up;
- a user's ``<own>NAME`` is stored *escaped* as ``<own>overlay.NAME`` and shown unescaped;
  get/set/remove/list all translate, exactly as the kernel does;
- the other prefix is plain user data, stored verbatim, as the kernel treats it; except
  the state names this model reads in every layer whatever the mount writes (``opaque``,
  ``redirect``, ``whiteout``...): those stay hidden and cannot be set (EPERM), so nobody can
  make a directory opaque for the next mount by setting ``user.overlay.opaque``. That is
  the one deviation from the kernel here.
"""

from __future__ import annotations

import errno
import os

from layerfs.union.whiteout import ESCAPE, PRIVATE_PREFIXES, STATE_NAMES

# errnos that mean "no such attribute / attributes not available here", not a failure
MISSING = (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES)


class Names:
    """The naming rules of one mount, whose own private prefix is ``own``."""

    def __init__(self, own: str) -> None:
        assert own in PRIVATE_PREFIXES
        self.own = own
        self.other = PRIVATE_PREFIXES[1] if own == PRIVATE_PREFIXES[0] else PRIVATE_PREFIXES[0]

    def to_disk(self, name: str) -> str | None:
        """The stored name of the user-visible xattr ``name``; None: not the user's to use."""
        if name.startswith(self.own):
            return self.own + ESCAPE + name[len(self.own):]
        if name.startswith(self.other) and name[len(self.other):] in STATE_NAMES:
            return None
        return name

    def to_user(self, disk_name: str) -> str | None:
        """The user-visible name of the stored xattr ``disk_name``; None for overlay state."""
        if disk_name.startswith(self.own):
            rest = disk_name[len(self.own):]
            return self.own + rest[len(ESCAPE):] if rest.startswith(ESCAPE) else None
        if disk_name.startswith(self.other) and disk_name[len(self.other):] in STATE_NAMES:
            return None
        return disk_name

    def copied_up(self, disk_name: str) -> bool:
        """Whether copy-up carries the stored xattr ``disk_name`` (user data, as stored)."""
        return self.to_user(disk_name) is not None


# Where xattrs are read or written: a path (its final symlink not followed) or an open fd.
# Never ``/proc/self/fd/N`` alone as a path: without following, that is the magic link.
Target = bytes | int


def _follow(target: Target) -> bool:
    """The ``follow_symlinks`` argument for ``target``: False for paths; fds only take True."""
    return isinstance(target, int)


def list_names(target: Target) -> list[str]:
    """Stored xattr names of ``target``; empty where xattrs are unsupported."""
    try:
        return os.listxattr(target, follow_symlinks=_follow(target))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise


def read_all(path: Target) -> dict[str, bytes]:
    """Every stored xattr of ``path``, disk name -> value."""
    try:
        names = os.listxattr(path, follow_symlinks=_follow(path))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in names:
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=_follow(path))
        except OSError as e:
            if e.errno not in MISSING:  # removed meanwhile, or a namespace we may not read
                raise
    return out


def get(path: Target, disk_name: str) -> bytes | None:
    """One stored xattr, or None when it is not there (or xattrs are unsupported)."""
    try:
        return os.getxattr(path, disk_name, follow_symlinks=_follow(path))
    except OSError as e:
        if e.errno in MISSING:
            return None
        raise


def copy_user_xattrs(src: dict[str, bytes], dst: Target, names: Names) -> None:
    """Set on ``dst`` every xattr of ``src`` that copy-up carries (as stored)."""
    for name, value in src.items():
        if not names.copied_up(name):
            continue
        try:
            os.setxattr(dst, name, value, follow_symlinks=_follow(dst))
        except OSError as e:
            # the kernel skips what the upper filesystem refuses to store in the same way
            # (e.g. security.* labels it manages itself); anything else is a real failure
            if e.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
