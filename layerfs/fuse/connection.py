"""Attaching a FUSE connection to its mount point, and detaching it, without trio.

The kernel transport's first step (``layerfs.fuse.session`` serves the connection). It is
a module of its own so that ``layerfs-fuse`` can mount and report the mount live before it
imports trio and the request loop, as libfuse's programs do: once ``mount(2)`` (or
``fusermount3``) succeeded, the mount exists and every request to it waits in the kernel
until the daemon answers INIT, so a caller that returns then sees a working mount.
"""

from __future__ import annotations

import contextlib
import os

from layerfs.errors import LayerfsError
from layerfs.linux import fusedev

# MountConfig and Connection are plain classes, not dataclasses: generating the two costs
# ~3 ms of every mount (this module is on the mount path).


class MountConfig:
    """What to mount and how (``layerfs.fuse.main`` makes it from the command line); immutable."""

    __slots__ = ("mountpoint", "source", "subtype", "flags", "options", "fusermount_options", "timeout",
                 "passthrough", "dir_cache", "debug", "stats", "splice", "writeback")
    mountpoint: str  # a directory, or /dev/fd/N: a device fd its caller mounted (libfuse's convention)
    source: str  # the mount's source in mountinfo (fsname)
    subtype: str  # the type is fuse.SUBTYPE
    flags: int  # mount(2) flags (MS_*), as root
    options: list[str]  # FUSE's own mount options, as root (default_permissions, allow_other)
    fusermount_options: list[str]  # everything for fusermount3 -o, unprivileged
    timeout: float | None  # attribute cache of changeable entries (None: the default)
    passthrough: bool  # use FUSE passthrough where allowed (root with CAP_SYS_ADMIN)
    dir_cache: bool  # directory listings cached in the kernel (off: every readdir reaches us)
    debug: bool  # log every request
    stats: str | None  # the request counters' file
    splice: bool  # READ replies spliced from the file to the device (off: preadv + writev)
    writeback: bool  # the kernel's writeback cache (FUSE_WRITEBACK_CACHE): a measured lever

    def __init__(self, mountpoint: str, source: str, subtype: str, flags: int, options: list[str],
                 fusermount_options: list[str], *, timeout: float | None = None, passthrough: bool = True,
                 dir_cache: bool = True, debug: bool = False, stats: str | None = None, splice: bool = True,
                 writeback: bool = False) -> None:
        for name, value in (("mountpoint", mountpoint), ("source", source), ("subtype", subtype),
                            ("flags", flags), ("options", options), ("fusermount_options", fusermount_options),
                            ("timeout", timeout), ("passthrough", passthrough), ("dir_cache", dir_cache),
                            ("debug", debug), ("stats", stats), ("splice", splice), ("writeback", writeback)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: a MountConfig is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: a MountConfig is immutable")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MountConfig):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(tuple(tuple(v) if isinstance(v, list) else v for v in self._values()))

    def __repr__(self) -> str:
        return f"MountConfig({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"


class Connection:
    """A mounted FUSE connection: its device fd and how to take the mount away again."""

    __slots__ = ("fd", "target", "real_target", "premounted", "privileged")

    def __init__(self, fd: int, target: str, real_target: str, premounted: bool, privileged: bool) -> None:
        self.fd = fd
        self.target = target  # the mount point as given
        self.real_target = real_target  # its path with symlinks resolved, found before the mount (after it, we answer)
        self.premounted = premounted  # /dev/fd/N: our caller mounted it; there is no path of ours to unmount
        self.privileged = privileged  # mounted with mount(2) as root (else through fusermount3)

    def __repr__(self) -> str:
        return (f"Connection(fd={self.fd}, target={self.target!r}, real_target={self.real_target!r}, "
                f"premounted={self.premounted}, privileged={self.privileged})")

    def detach(self) -> None:
        """Take the mount away (lazily); a mount already gone is fine."""
        if self.premounted:
            return  # no path to unmount: closing the device ends the connection
        if self.privileged:
            fusedev.detach(self.target)
        else:
            fusedev.fusermount_unmount(self.target, lazy=True)

    def abandon(self) -> None:
        """Undo ``connect`` when nothing served the connection: detach, close the device."""
        try:
            with contextlib.suppress(OSError):
                self.detach()
        finally:
            os.close(self.fd)


def connect(config: MountConfig) -> Connection:
    """Open a FUSE device and mount it at ``config.mountpoint`` (``mount(2)`` as root,
    ``fusermount3`` otherwise), or take the device fd of ``/dev/fd/N``.

    Raises LayerfsError naming the mount point when that fails; nothing is left mounted.
    """
    euid = os.geteuid()
    target = config.mountpoint
    premounted = target.startswith("/dev/fd/")
    real_target = target if premounted else os.path.realpath(target)
    try:
        if premounted:
            fd = int(target[len("/dev/fd/"):])
            os.fstat(fd)
            os.set_blocking(fd, False)
        elif euid == 0:
            fd = fusedev.open_device()
            try:
                fusedev.mount_fuse(fd, target, source=config.source, subtype=config.subtype, flags=config.flags,
                                   options=config.options)
            except BaseException:
                os.close(fd)
                raise
        else:
            fd = fusedev.fusermount_mount(target, config.fusermount_options)
    except (OSError, ValueError) as e:
        raise LayerfsError(f"cannot mount on {target}: {e}") from e
    return Connection(fd=fd, target=target, real_target=real_target, premounted=premounted, privileged=euid == 0)
