"""The few Linux calls the union model needs that ``os`` does not offer, via libc/ctypes.

- ``renameat2`` with ``RENAME_NOREPLACE`` / ``RENAME_EXCHANGE`` / ``RENAME_WHITEOUT``: the
  kernel's own overlay writes whiteouts and replaces entries in the upper with these, so a
  crash never shows a half-made change;
- ``utimensat`` with ``UTIME_OMIT`` / ``UTIME_NOW`` per timestamp (``os.utime`` sets both);
- ``FICLONE``: reflink a whole file where the filesystem can (btrfs, xfs); copy-up tries it
  before ``copy_file_range``.

Every function takes directory fds and names (bytes), never long path strings, and raises
``OSError`` with the errno the kernel gave.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

FICLONE = 0x40049409  # _IOW(0x94, 9, int)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.utimensat.restype = ctypes.c_int
_libc.futimens.argtypes = [ctypes.c_int, ctypes.POINTER(_Timespec)]
_libc.futimens.restype = ctypes.c_int


def _raise(what: bytes) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), os.fsdecode(what))


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int = 0) -> None:
    """rename ``old`` (in ``old_dir``) to ``new`` (in ``new_dir``) with renameat2 ``flags``."""
    if _libc.renameat2(old_dir, old, new_dir, new, flags) != 0:
        _raise(old)


def _timespec(ns: int | None, now: bool) -> _Timespec:
    if now:
        return _Timespec(0, UTIME_NOW)
    if ns is None:
        return _Timespec(0, UTIME_OMIT)
    sec, nsec = divmod(ns, 1_000_000_000)
    return _Timespec(sec, nsec)


def utimensat(dir_fd: int, name: bytes | None, atime_ns: int | None, mtime_ns: int | None,
              atime_now: bool = False, mtime_now: bool = False) -> None:
    """Set the times of ``name`` in ``dir_fd`` (not following a final symlink), or of the
    open file ``dir_fd`` itself when ``name`` is None. A time that is None is left alone."""
    times = (_Timespec * 2)(_timespec(atime_ns, atime_now), _timespec(mtime_ns, mtime_now))
    if name is None:  # glibc's utimensat refuses a NULL path: futimens is that call
        if _libc.futimens(dir_fd, times) != 0:
            _raise(b"<fd %d>" % dir_fd)
    elif _libc.utimensat(dir_fd, name, times, AT_SYMLINK_NOFOLLOW) != 0:
        _raise(name)


def try_clone(src_fd: int, dst_fd: int) -> bool:
    """Reflink all of ``src_fd`` into ``dst_fd``; False where the filesystem cannot."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return True
    except OSError as e:
        # ext4/tmpfs: EOPNOTSUPP or ENOTTY; across filesystems: EXDEV; other refusals: EINVAL
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.EPERM):
            return False
        raise


def proc_path(dir_fd: int, name: bytes | None = None) -> bytes:
    """A path for calls that take no ``dir_fd`` (the xattr calls): ``/proc/self/fd/N[/name]``.

    The kernel resolves the ``fd`` magic link to the directory itself, so the length of
    the directory's real path never matters and nothing above it is re-resolved. Without
    ``name``, calls that do not follow a final symlink would act on the magic link itself:
    pass the fd to those instead.
    """
    base = b"/proc/self/fd/%d" % dir_fd
    return base if name is None else base + b"/" + name
