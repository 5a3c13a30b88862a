"""Writes into the upper layer, in the on-disk form kernel overlayfs writes.

How the upper is written (``redirect_dir=on,index=off``; checked against kernel 6.18), in
the conventions named by ``layerfs.union.whiteout``:

- ``WORK/work/``: the kernel's own scratch directory (mode 000). Entries are prepared there
  under ``#<hex>`` names and renamed into place; at start it is emptied, as the kernel does
  at mount (anything in it is the garbage of an interrupted change).
- ``WORK/layerfs-index/<n>`` (ours; the kernel's index=on keeps ``WORK/index``): a
  hardlink of every copied-up lower hardlink, named by the copy's inode number (from the
  lower file's st_dev/st_ino), so a name of it met later (below a directory renamed before
  the copy-up, after a remount) is linked to the copy instead of showing the lower file;
  ``<n>.<k>`` hold one more link per name not linked yet, so every name reports the lower
  file's link count, as kernel overlayfs with index=on does;
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

from layerfs.linux.files import (
    DIR_FLAGS,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    proc_path,
    renameat2,
    rmtree_at,
)
from layerfs.union import whiteout
from layerfs.union.whiteout import DEVICE_WHITEOUT, FILE_WHITEOUT, NO_WHITEOUT, WH, LayerFormat

WORK_SUBDIR = "work"
# hardlinks of copied-up lower hardlinks, named "<lower st_dev hex>-<lower st_ino hex>":
# UnionCore links the names of a lower hardlink it meets later to this copy
INDEX_SUBDIR = "layerfs-index"


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
            if os.geteuid() != 0:
                # mode 000 (the kernel's and ours) is for root; its owner without
                # CAP_DAC_OVERRIDE (an unprivileged daemon) needs to list and change it
                os.chmod(WORK_SUBDIR, 0o700, dir_fd=base, follow_symlinks=False)
            self.work_fd = os.open(WORK_SUBDIR, DIR_FLAGS, dir_fd=base)
            try:
                os.mkdir(INDEX_SUBDIR, 0o700, dir_fd=base)
            except FileExistsError:
                pass
            try:
                self.index_fd = os.open(INDEX_SUBDIR, DIR_FLAGS, dir_fd=base)
            except BaseException:
                os.close(self.work_fd)
                raise
        except BaseException:
            os.close(self.root_fd)
            raise
        finally:
            if base >= 0:
                os.close(base)
        self._empty_work()

    def close(self) -> None:
        for fd in (self.root_fd, self.work_fd, self.index_fd):
            if fd >= 0:
                os.close(fd)
        self.root_fd = self.work_fd = self.index_fd = -1

    def _empty_work(self) -> None:
        for name in os.listdir(self.work_fd):
            rmtree_at(self.work_fd, os.fsencode(name))

    def tmp_name(self) -> bytes:
        return b"#%x.%x" % (os.getpid(), next(self._names))

    # --- what is there ------------------------------------------------------------------

    def whiteout_at(self, dir_fd: int, name: bytes, look_for_files: bool) -> int:
        """Which whiteout (if any) an upper directory holds for ``name``: ``NO_WHITEOUT``,
        ``DEVICE_WHITEOUT`` or ``FILE_WHITEOUT`` (``layerfs.union.whiteout``)."""
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

