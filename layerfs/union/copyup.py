"""Copy-up mechanics: make the upper twin of a lower entry inside the workdir.

What the kernel's copy-up writes (fs/overlayfs/copy_up.c, checked against kernel 6.18 on
the same layers), and so what this module writes:

- the entry is built under a temporary name in ``WORK/work/`` and renamed into place in
  one step, so a crash leaves either the lower entry visible or the complete upper one;
  leftovers in ``WORK/work`` are garbage (the kernel empties it at mount, so do we);
- regular files: the data is reflinked (``FICLONE``) where the filesystem can, otherwise
  copied extent by extent (``SEEK_DATA``/``SEEK_HOLE`` + ``copy_file_range``, falling back
  to ``sendfile``): it never passes through Python buffers and holes stay holes;
- then owner (``chown``: before the mode, since chown clears setuid/setgid and file
  capabilities), xattrs (user data, escaped overlay names; never overlay state), mode
  (setuid/setgid/sticky included), and last atime/mtime to the nanosecond;
- symlinks keep their target, owner, xattrs and times; devices, fifos and sockets their
  type and rdev; directories their mode, owner, xattrs and times, never their content;
- unlike the kernel, copy-up does not fsync: the data reaches the disk with the next
  sync, as with fuse-overlayfs (the fsync dominates small copy-ups).
"""

from __future__ import annotations

import errno
import os
import stat

from layerfs.linux.files import proc_path, try_clone, utimensat
from layerfs.union import xattrs

_CHUNK = 1 << 30  # copy_file_range moves at most ~2 GiB per call anyway


def copy_data(src: int, dst: int, length: int) -> None:
    """Make the open file ``dst`` hold the first ``length`` bytes of ``src`` (holes kept)."""
    if length > 0 and not try_clone(src, dst):
        pos = 0
        while pos < length:
            try:
                data = os.lseek(src, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            if data >= length:
                break
            try:
                hole = os.lseek(src, data, os.SEEK_HOLE)
            except OSError:
                hole = length
            end = min(hole, length)
            _copy_range(src, dst, data, end)
            pos = end
    # sets the size: extends over a trailing hole, cuts a clone down to ``length``
    os.ftruncate(dst, length)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    off = start
    while off < end:
        want = min(end - off, _CHUNK)
        try:
            n = os.copy_file_range(src, dst, want, off, off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            os.lseek(dst, off, os.SEEK_SET)
            n = os.sendfile(dst, src, off, want)
        if n == 0:
            return  # the source is shorter than its stat said: the ftruncate pads
        off += n


def apply_meta_fd(fd: int, st: os.stat_result, attrs: dict[str, bytes], names: xattrs.Names,
                  private: dict[str, bytes] | None = None) -> None:
    """Give the open file or directory ``fd`` the owner, xattrs, mode and times of ``st``/``attrs``.

    ``private`` are overlay-state xattrs to set as well (the origin record)."""
    os.fchown(fd, st.st_uid, st.st_gid)
    xattrs.copy_user_xattrs(attrs, fd, names)
    for name, value in (private or {}).items():
        os.setxattr(fd, name, value)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    utimensat(fd, None, st.st_atime_ns, st.st_mtime_ns)


def apply_meta_at(dir_fd: int, name: bytes, st: os.stat_result, attrs: dict[str, bytes],
                  names: xattrs.Names, private: dict[str, bytes] | None = None) -> None:
    """The same for an entry that cannot be opened (symlink, device, fifo, socket)."""
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
    path = proc_path(dir_fd, name)
    xattrs.copy_user_xattrs(attrs, path, names)
    for xname, value in (private or {}).items():
        try:
            os.setxattr(path, xname, value, follow_symlinks=False)
        except OSError as e:
            # Linux refuses user.* xattrs on symlinks and devices: no origin record there
            # (their inode number then follows the upper file after a remount)
            if e.errno not in (errno.EPERM, errno.ENOTSUP):
                raise
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)  # not a symlink: nothing to follow
    utimensat(dir_fd, name, st.st_atime_ns, st.st_mtime_ns)


def make_special(dir_fd: int, name: bytes, st: os.stat_result, link_target: bytes | None) -> None:
    """Create the non-regular, non-directory twin of ``st`` as ``name`` in ``dir_fd``."""
    if stat.S_ISLNK(st.st_mode):
        assert link_target is not None
        os.symlink(link_target, name, dir_fd=dir_fd)
    else:
        os.mknod(name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=dir_fd)
