"""Linux file calls by directory fd: the few ``os`` lacks (via libc/ctypes), and fd-based helpers.

- ``renameat2`` with ``RENAME_NOREPLACE`` / ``RENAME_EXCHANGE`` / ``RENAME_WHITEOUT``: the
  kernel's own overlay writes whiteouts and replaces entries in the upper with these, so a
  crash never shows a half-made change;
- ``utimensat`` with ``UTIME_OMIT`` / ``UTIME_NOW`` per timestamp (``os.utime`` sets both);
- ``getdents64``: names with their raw d_type;
- ``fallocate`` with any mode (``os.posix_fallocate`` is mode 0 only);
- ``FICLONE``: reflink a whole file where the filesystem can (btrfs, xfs); copy-up tries it
  before ``copy_file_range``;
- ``rmtree_at``: ``rm -rf`` below a directory fd, following no symlink, at any depth
  (``DIR_FLAGS`` is how every directory is opened for that: no symlink, no fd inheritance).

Every function takes directory fds and names (bytes; ``rmtree_at`` takes str too), never
long path strings, and raises ``OSError`` with the errno the kernel gave.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import sys
from collections.abc import Iterator

from layerfs.linux.libc import libc, syscall

# open a directory relative to a dir fd: never through a symlink, never inherited by a child
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

FICLONE = 0x40049409  # _IOW(0x94, 9, int)

libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
libc.renameat2.restype = ctypes.c_int


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
libc.utimensat.restype = ctypes.c_int
libc.futimens.argtypes = [ctypes.c_int, ctypes.POINTER(_Timespec)]
libc.futimens.restype = ctypes.c_int
libc.fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc.fallocate64.restype = ctypes.c_int

# fallocate(2) modes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20


def _raise(what: bytes) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), os.fsdecode(what))


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int = 0) -> None:
    """rename ``old`` (in ``old_dir``) to ``new`` (in ``new_dir``) with renameat2 ``flags``."""
    if libc.renameat2(old_dir, old, new_dir, new, flags) != 0:
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
        if libc.futimens(dir_fd, times) != 0:
            _raise(b"<fd %d>" % dir_fd)
    elif libc.utimensat(dir_fd, name, times, AT_SYMLINK_NOFOLLOW) != 0:
        _raise(name)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) of the open file ``fd`` with ``mode`` (``FALLOC_FL_*``); raises the
    filesystem's errno (EOPNOTSUPP for a mode it lacks, EINVAL for a bad range...)."""
    if libc.fallocate64(fd, mode, offset, length) != 0:
        _raise(b"<fd %d>" % fd)


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


def getdents(dir_fd: int) -> Iterator[tuple[str, int]]:
    """``(name, d_type)`` of every entry of an open directory, straight from getdents64.

    ``os.scandir`` hides DT_UNKNOWN (``is_dir()`` quietly falls back to stat), so it cannot
    tell whether the filesystem fills in d_type; the raw syscall can.
    """
    buf = ctypes.create_string_buffer(32768)
    while True:
        n = syscall("getdents64", dir_fd, buf, len(buf))
        if n == 0:
            return
        raw = buf.raw[:n]
        pos = 0
        while pos < n:
            # struct linux_dirent64 { u64 d_ino; s64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            reclen = int.from_bytes(raw[pos + 16 : pos + 18], sys.byteorder)
            d_type = raw[pos + 18]
            name = raw[pos + 19 : pos + reclen].split(b"\0", 1)[0]
            yield os.fsdecode(name), d_type
            pos += reclen


def rmtree_at(dir_fd: int, name: str | bytes) -> None:
    """``rm -rf`` of ``name`` in ``dir_fd``: nothing if it is missing, an unlink if it is not a
    directory. No symlink is followed and there is no recursion, so any depth works; the
    directories on the way down are held open (one fd per level, closed on the way up)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    # the open directories from ``name`` down to the one being emptied: (fd, name in parent)
    stack: list[tuple[int, str | bytes]] = [(os.open(name, DIR_FLAGS, dir_fd=dir_fd), name)]
    try:
        while stack:
            fd, _ = stack[-1]
            subdir = None
            for child in os.listdir(fd):
                if stat.S_ISDIR(os.stat(child, dir_fd=fd, follow_symlinks=False).st_mode):
                    subdir = child
                    break
                os.unlink(child, dir_fd=fd)
            if subdir is not None:
                stack.append((os.open(subdir, DIR_FLAGS, dir_fd=fd), subdir))
                continue
            fd, dname = stack.pop()
            os.close(fd)
            os.rmdir(dname, dir_fd=stack[-1][0] if stack else dir_fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
