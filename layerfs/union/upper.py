"""Writes into the upper layer, in the on-disk form kernel overlayfs writes.

On-disk format owned here (``redirect_dir=on,index=off``; checked against kernel 6.18):

- ``WORK/work/``: the kernel's own scratch directory (mode 000). Entries are prepared there
  under ``#<hex>`` names and renamed into place; at start it is emptied, as the kernel does
  at mount (anything in it is the garbage of an interrupted change).
- deleting a name that a lower layer provides leaves a whiteout in its place, made
  atomically with ``renameat2(RENAME_WHITEOUT)`` when an upper entry is replaced (device
  whiteouts), a 0/0 ``mknod`` otherwise; with ``LayerFormat.device_whiteouts`` False a
  ``.wh.NAME`` file instead (written before the entry goes, so no instant shows the lower);
- a new entry over a whiteout is built in the workdir and renamed over it (a directory is
  exchanged with it, ``RENAME_EXCHANGE``, then the whiteout removed): such a directory is
  opaque; so is, like the kernel's, every directory created in a merged parent (an
  optimisation there, harmless here, and it keeps the two uppers identical);
- opaque = ``<prefix>opaque=y`` (+ ``.wh..wh..opq`` with file whiteouts); redirect =
  ``<prefix>redirect``: the old name when renamed within its directory, else the absolute
  path ``/a/b`` the lowers know it by. ``<prefix>`` is ``trusted.overlay.`` or, with user
  xattrs, ``user.overlay.`` (``LayerFormat.opaque_xattr`` decides).
- removing a directory moves it into the workdir first and empties it there (it may still
  hold whiteouts), so the name never shows a half-deleted directory.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat

from layerfs.linux.files import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, proc_path, renameat2
from layerfs.union import whiteout
from layerfs.union.dirindex import DIR_FLAGS, WH
from layerfs.union.whiteout import LayerFormat

WORK_SUBDIR = "work"

# what is at a name in an upper directory, when no visible entry is
NO_WHITEOUT = 0
DEVICE_WHITEOUT = 1
FILE_WHITEOUT = 2


class Upper:
    """The writable layer and its workdir, both held open as directory fds."""

    def __init__(self, upper: str, work: str, fmt: LayerFormat) -> None:
        self.fmt = fmt
        self.prefix = fmt.opaque_xattr[: -len("opaque")]  # trusted.overlay. / user.overlay.
        self.redirect_xattr = self.prefix + "redirect"
        self._names = itertools.count(1)
        self.root_fd = os.open(upper, DIR_FLAGS)
        base = -1
        try:
            base = os.open(work, DIR_FLAGS)
            if os.fstat(base).st_dev != os.fstat(self.root_fd).st_dev:
                raise OSError(errno.EXDEV, "workdir and upperdir must be on one filesystem", work)
            try:
                os.mkdir(WORK_SUBDIR, 0o000, dir_fd=base)
            except FileExistsError:
                pass
            self.work_fd = os.open(WORK_SUBDIR, DIR_FLAGS, dir_fd=base)
        except BaseException:
            os.close(self.root_fd)
            raise
        finally:
            if base >= 0:
                os.close(base)
        self._empty_work()

    def close(self) -> None:
        for fd in (self.root_fd, self.work_fd):
            if fd >= 0:
                os.close(fd)
        self.root_fd = self.work_fd = -1

    def _empty_work(self) -> None:
        for name in os.listdir(self.work_fd):
            rmtree_at(self.work_fd, os.fsencode(name))

    def tmp_name(self) -> bytes:
        return b"#%x.%x" % (os.getpid(), next(self._names))

    # --- what is there ------------------------------------------------------------------

    def whiteout_at(self, dir_fd: int, name: bytes, look_for_files: bool) -> int:
        """Which whiteout (if any) an upper directory holds for ``name``."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if whiteout.is_whiteout_stat(st):
                return DEVICE_WHITEOUT
        except FileNotFoundError:
            pass
        if look_for_files and len(name) + len(WH) <= 255:
            try:
                os.stat(WH + name, dir_fd=dir_fd, follow_symlinks=False)
                return FILE_WHITEOUT
            except FileNotFoundError:
                pass
        return NO_WHITEOUT

    # --- deletions ----------------------------------------------------------------------

    def make_whiteout(self, dir_fd: int, name: bytes) -> None:
        """Whiteout ``name``, where the upper holds nothing (or only a whiteout) now."""
        if self.fmt.device_whiteouts:
            try:
                os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)
            except FileExistsError:
                pass  # already one
        else:
            self._file_whiteout(dir_fd, name)

    def _file_whiteout(self, dir_fd: int, name: bytes) -> None:
        if len(name) + len(WH) > 255:
            raise OSError(errno.ENAMETOOLONG, "no room for a .wh. whiteout of this name", os.fsdecode(name))
        fd = os.open(WH + name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o000, dir_fd=dir_fd)
        os.close(fd)

    def replace_with_whiteout(self, dir_fd: int, name: bytes) -> None:
        """Atomically turn the upper entry ``name`` (file or directory) into a whiteout."""
        tmp = self.tmp_name()
        if self.fmt.device_whiteouts:
            try:
                renameat2(dir_fd, name, self.work_fd, tmp, RENAME_WHITEOUT)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                    raise
                # no RENAME_WHITEOUT here: move away, then whiteout (brief window)
                renameat2(dir_fd, name, self.work_fd, tmp, 0)
                self.make_whiteout(dir_fd, name)
        else:
            self._file_whiteout(dir_fd, name)
            renameat2(dir_fd, name, self.work_fd, tmp, 0)
        rmtree_at(self.work_fd, tmp)

    def remove(self, dir_fd: int, name: bytes, is_dir: bool) -> None:
        """Remove the upper entry ``name`` without leaving a whiteout."""
        if not is_dir:
            os.unlink(name, dir_fd=dir_fd)
            return
        try:
            os.rmdir(name, dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            tmp = self.tmp_name()  # it holds whiteouts or an opaque marker: empty it aside
            renameat2(dir_fd, name, self.work_fd, tmp, 0)
            rmtree_at(self.work_fd, tmp)

    def remove_file_whiteout(self, dir_fd: int, name: bytes) -> None:
        try:
            os.unlink(WH + name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass

    def empty_dir(self, dir_fd: int, name: bytes) -> None:
        """Make the upper directory ``name`` (union-empty, maybe holding whiteouts) really
        empty, atomically: exchange it with an empty opaque twin made in the workdir."""
        try:
            if not os.listdir(proc_path(dir_fd, name)):
                return
        except FileNotFoundError:
            return
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        tmp = self.tmp_name()
        os.mkdir(tmp, 0o700, dir_fd=self.work_fd)
        fd = os.open(tmp, DIR_FLAGS, dir_fd=self.work_fd)
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            self.set_opaque(fd)
        finally:
            os.close(fd)
        renameat2(self.work_fd, tmp, dir_fd, name, RENAME_EXCHANGE)
        rmtree_at(self.work_fd, tmp)

    # --- creation -----------------------------------------------------------------------

    def install(self, tmp: bytes, dir_fd: int, name: bytes, is_dir: bool, over: int) -> None:
        """Move the prepared workdir entry ``tmp`` to ``name``, replacing a whiteout there."""
        if over == DEVICE_WHITEOUT:
            if is_dir:  # a directory cannot be renamed over a non-directory: swap, then drop
                renameat2(self.work_fd, tmp, dir_fd, name, RENAME_EXCHANGE)
                os.unlink(tmp, dir_fd=self.work_fd)
            else:
                renameat2(self.work_fd, tmp, dir_fd, name, 0)
            return
        renameat2(self.work_fd, tmp, dir_fd, name, RENAME_NOREPLACE)
        if over == FILE_WHITEOUT:
            self.remove_file_whiteout(dir_fd, name)

    def set_opaque(self, dir_fd: int) -> None:
        whiteout.set_opaque(dir_fd, self.fmt)

    def set_redirect(self, dir_fd: int, value: bytes) -> None:
        os.setxattr(dir_fd, self.redirect_xattr, value)


def rmtree_at(dir_fd: int, name: bytes) -> None:
    """``rm -rf`` of ``name`` in ``dir_fd``: no symlink followed, no recursion (any depth)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    # the open directories from ``name`` down to the one being emptied: (fd, name in parent)
    stack: list[tuple[int, bytes]] = [(os.open(name, DIR_FLAGS, dir_fd=dir_fd), name)]
    try:
        while stack:
            fd, _ = stack[-1]
            subdir = None
            for entry in os.listdir(fd):
                child = os.fsencode(entry)
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


def is_marker(name: bytes) -> bool:
    """``.wh.*`` names are whiteout/opaque markers, never entries of the union."""
    return name.startswith(WH)
