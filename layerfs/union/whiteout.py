"""On-disk conventions for deletions and opaque directories. This module owns them all.

Conventions layerfs writes into a layer directory (overlayfs on-disk format):

- **whiteout**: a character device with device number 0/0 named like the deleted entry.
- **opaque directory**: the xattr ``trusted.overlay.opaque`` = ``y`` on the directory
  (``user.overlay.opaque`` when the store runs with overlayfs' ``userxattr`` option, as an
  unprivileged user namespace mount must).

Where device nodes cannot be created (an unprivileged store), whiteouts are written as
empty regular files ``.wh.<name>`` and opaque directories additionally get an empty
``.wh..wh..opq`` file; the FUSE backend reads these as fuse-overlayfs does.

Conventions layerfs reads from an OCI layer tar (image-spec ``layer.md``):

- ``.wh.<name>``: ``<name>`` is deleted in this layer;
- ``.wh..wh..opq``: the directory holding it is opaque (lower layers' children hidden);
- any other name starting with ``.wh.`` is invalid (``.wh..`` and a bare ``.wh.`` too).

Overlay-private xattrs (``trusted.overlay.*``, ``user.overlay.*``) are state of the
kernel's overlay: they never enter the store from an image and never leave it in an export.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from layerfs.errors import UnsafeArchive

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
TRUSTED_PREFIX = "trusted.overlay."
USER_PREFIX = "user.overlay."


@dataclass(frozen=True)
class LayerFormat:
    """How one store writes whiteouts and opaque markers into its layer directories."""

    opaque_xattr: str = TRUSTED_PREFIX + "opaque"
    device_whiteouts: bool = True

    @property
    def userxattr(self) -> bool:
        return self.opaque_xattr.startswith(USER_PREFIX)


PRIVILEGED = LayerFormat()
USERXATTR = LayerFormat(opaque_xattr=USER_PREFIX + "opaque")
UNPRIVILEGED_FILES = LayerFormat(opaque_xattr=USER_PREFIX + "opaque", device_whiteouts=False)


def default_format() -> LayerFormat:
    """The format a new store uses: device whiteouts and trusted xattrs as root."""
    return PRIVILEGED if os.geteuid() == 0 else UNPRIVILEGED_FILES


def is_overlay_private_xattr(name: str) -> bool:
    return name.startswith(TRUSTED_PREFIX) or name.startswith(USER_PREFIX)


def is_whiteout_stat(st: os.stat_result) -> bool:
    """A 0/0 character device: overlayfs' whiteout."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def classify_tar_name(basename: str) -> tuple[str, str | None]:
    """Classify the last component of a tar entry name.

    Returns ``("opaque", None)``, ``("whiteout", target_name)`` or ``("plain", None)``.
    Raises ``UnsafeArchive`` for names that start with ``.wh.`` but are neither.
    """
    if basename == OPAQUE_MARKER:
        return "opaque", None
    if basename.startswith(WHITEOUT_PREFIX):
        target = basename[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", "..") or target.startswith(WHITEOUT_PREFIX[:-1] + "."):
            # '.wh.' , '.wh..', '.wh...' and '.wh..wh.<x>' other than the opaque marker
            raise UnsafeArchive(f"invalid whiteout name {basename!r}", basename)
        if "/" in target or "\0" in target:
            raise UnsafeArchive(f"invalid whiteout name {basename!r}", basename)
        return "whiteout", target
    return "plain", None


def make_whiteout(dir_fd: int, name: str, fmt: LayerFormat) -> None:
    """Mark ``name`` (inside the directory ``dir_fd``) deleted. Replaces whatever is there."""
    _remove_entry(dir_fd, name)
    if fmt.device_whiteouts:
        os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)
    else:
        _remove_entry(dir_fd, WHITEOUT_PREFIX + name)
        fd = os.open(WHITEOUT_PREFIX + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o000, dir_fd=dir_fd)
        os.close(fd)


def set_opaque(dir_fd: int, fmt: LayerFormat) -> None:
    """Mark the directory open as ``dir_fd`` opaque."""
    os.setxattr(dir_fd, fmt.opaque_xattr, b"y")
    if not fmt.device_whiteouts:
        fd = os.open(OPAQUE_MARKER, os.O_WRONLY | os.O_CREAT, 0o000, dir_fd=dir_fd)
        os.close(fd)


def is_opaque(path_or_fd: str | int) -> bool:
    """Whether a directory carries any of the opaque markers layerfs writes or reads."""
    for name in (TRUSTED_PREFIX + "opaque", USER_PREFIX + "opaque"):
        try:
            # an fd names the inode itself; a path must not follow a final symlink
            value = (os.getxattr(path_or_fd, name) if isinstance(path_or_fd, int)
                     else os.getxattr(path_or_fd, name, follow_symlinks=False))
            if value == b"y":
                return True
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                raise
    if isinstance(path_or_fd, int):
        try:
            os.stat(OPAQUE_MARKER, dir_fd=path_or_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
    return os.path.lexists(os.path.join(path_or_fd, OPAQUE_MARKER))


def whiteout_target(name: str, st: os.stat_result) -> str | None:
    """If the directory entry ``name`` with stat ``st`` is a whiteout, the name it deletes."""
    if is_whiteout_stat(st):
        return name
    if name == OPAQUE_MARKER:
        return None
    if name.startswith(WHITEOUT_PREFIX) and stat.S_ISREG(st.st_mode):
        return name[len(WHITEOUT_PREFIX) :]
    return None


def is_marker_name(name: str) -> bool:
    """File-style markers that are metadata, not entries of the tree."""
    return name.startswith(WHITEOUT_PREFIX)


def _remove_entry(dir_fd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree_at(dir_fd, name)
    else:
        os.unlink(name, dir_fd=dir_fd)


def remove_tree_at(dir_fd: int, name: str) -> None:
    """rm -rf ``name`` inside ``dir_fd`` without following symlinks."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                remove_tree_at(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
