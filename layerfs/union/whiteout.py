"""Every overlay on-disk convention layerfs reads or writes, defined once.

A layer directory is in kernel overlayfs' on-disk format (Documentation/filesystems/
overlayfs.rst, fs/overlayfs/); an image layer is an OCI layer tar (image-spec ``layer.md``).
Every name either format gives a meaning to is defined here, and every module that reads or
writes one imports it from here.

Entries of a layer directory. Every form is read, whatever a store writes:

- ``NAME`` as a 0/0 character device: a **whiteout**, NAME is deleted from the layers below;
- ``.wh.NAME`` (``WHITEOUT_PREFIX``) as a regular file: a whiteout too (fuse-overlayfs' form,
  for stores that cannot make device nodes); it hides NAME in its own layer as well;
- ``.wh..wh..opq`` (``OPAQUE_MARKER``), of any type: the directory holding it is **opaque**;
- any ``.wh.*`` name is a marker (``is_marker``), never an entry of the union.

Overlay-private xattrs live under ``trusted.overlay.`` or, with overlayfs' ``userxattr``
option (an unprivileged user namespace mount), ``user.overlay.`` (``PRIVATE_PREFIXES``). The
names read under either prefix, whatever a store writes:

- ``opaque`` (``OPAQUE_NAMES``) on a directory: ``y`` = opaque, the lower layers' children are
  hidden; ``x`` = not opaque, but it may hold xwhiteouts (kernel >= 6.7);
- ``whiteout`` (``XWHITEOUT_NAMES``) on an empty regular file in an ``x`` directory: an
  **xwhiteout**, a whiteout needing no device node;
- ``redirect`` (``REDIRECT_NAMES``, ``redirect_of``) on a directory: where the lower layers
  know it (``redirect_dir=on`` writes it when a merged directory is renamed): a sibling name
  (relative) or ``/a/b`` from the layer roots (absolute);
- ``origin`` (``KERNEL_ORIGIN``): the kernel's copy-up record, a file handle of the lower file;
- ``layerfs.origin`` (``ORIGIN_NAMES``): the FUSE backend's copy-up record, the lower file's
  inode number in decimal ASCII;
- the rest of ``STATE_NAMES``: more kernel state, like the above never shown through a union;
- ``overlay.NAME`` (``ESCAPE``): a user's own xattr ``<prefix>NAME``, stored escaped (kernel
  >= 6.7 xattr escaping; ``layerfs.union.xattrs`` translates).

Overlay-private xattrs are state of the overlay: they never enter the store from an image
and never leave it in an export (``is_overlay_private_xattr``).

Layer roots are never opaque, whatever they carry: the kernel never looks them up.

What a store writes (``LayerFormat``, one per store, recorded in it and named by
``LayerFormat.name``):

- ``trusted`` (``PRIVILEGED``): device whiteouts and ``trusted.overlay.`` xattrs, what kernel
  overlayfs mounted by root in the initial user namespace reads; needs CAP_SYS_ADMIN there
  (trusted.* xattrs) to write and to read;
- ``userxattr`` (``USERXATTR``): device whiteouts and ``user.overlay.`` xattrs, what kernel
  overlayfs reads with its ``userxattr`` option (an overlay mounted in a user namespace, or
  by root with that option) and what an unprivileged user can write: a 0/0 character device
  needs no CAP_MKNOD (Linux >= 5.8), ``user.*`` xattrs on one's own directories none at all.
  No redirects (``LayerFormat.redirects``): overlayfs follows none with ``userxattr``, so a
  renamed lower directory is copied up whole, in both backends;
- ``files`` (``UNPRIVILEGED_FILES``, the unprivileged format of older layerfs, read for
  compatibility): ``.wh.NAME`` files, ``user.overlay.`` xattrs and an ``.wh..wh..opq`` file in
  every opaque directory as well; kernel overlayfs shows such markers as plain files, so only
  the FUSE backend mounts it.

``default_format(directory)`` picks a new store's format by acting in its directory: trusted
where trusted.* xattrs can be set, userxattr where 0/0 whiteouts and user.* xattrs can be
made, files otherwise. Which whiteout an upper directory holds for a name:
``NO_WHITEOUT``, ``DEVICE_WHITEOUT``, ``FILE_WHITEOUT``.

Names of an OCI layer tar (``classify_tar_name``):

- ``.wh.NAME``: NAME is deleted in this layer;
- ``.wh..wh..opq``: the directory holding it is opaque;
- any other name starting with ``.wh.`` is invalid (``.wh..`` and a bare ``.wh.`` too).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from layerfs.errors import UnsafeArchive
from layerfs.linux.files import rmtree_at
from layerfs.linux.proc import in_initial_userns

# --- entries of a layer directory (str for paths, bytes for the fd-based readers) --------

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
WH = WHITEOUT_PREFIX.encode()
OPQ = OPAQUE_MARKER.encode()

# which whiteout an upper directory holds at a name (``layerfs.union.upper.Upper.whiteout_at``)
NO_WHITEOUT = 0
DEVICE_WHITEOUT = 1
FILE_WHITEOUT = 2

# --- overlay-private xattrs -------------------------------------------------------------------

TRUSTED_PREFIX = "trusted.overlay."
USER_PREFIX = "user.overlay."
PRIVATE_PREFIXES = (TRUSTED_PREFIX, USER_PREFIX)
OPAQUE_NAMES = (TRUSTED_PREFIX + "opaque", USER_PREFIX + "opaque")
REDIRECT_NAMES = (TRUSTED_PREFIX + "redirect", USER_PREFIX + "redirect")
XWHITEOUT_NAMES = (TRUSTED_PREFIX + "whiteout", USER_PREFIX + "whiteout")
KERNEL_ORIGIN = (TRUSTED_PREFIX + "origin", USER_PREFIX + "origin")
ORIGIN_SUFFIX = "layerfs.origin"
ORIGIN_NAMES = (TRUSTED_PREFIX + ORIGIN_SUFFIX, USER_PREFIX + ORIGIN_SUFFIX)
# what the kernel (6.18) and the FUSE backend keep under a private prefix
STATE_NAMES = frozenset({"opaque", "redirect", "origin", "impure", "nlink", "upper", "metacopy", "whiteout",
                         "whiteouts", "uuid", "verity", "protattr", ORIGIN_SUFFIX})
ESCAPE = "overlay."  # <prefix>overlay.NAME stores a user's own <prefix>NAME

# errnos of an xattr read that mean "not there / not readable here", not a failure (the
# same as ``layerfs.union.xattrs.MISSING``; that module imports this one, not the reverse)
_NO_XATTR = (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES)


@dataclass(frozen=True)
class LayerFormat:
    """How one store writes whiteouts and opaque markers into its layer directories."""

    opaque_xattr: str = OPAQUE_NAMES[0]
    device_whiteouts: bool = True

    @property
    def userxattr(self) -> bool:
        return self.opaque_xattr.startswith(USER_PREFIX)

    @property
    def prefix(self) -> str:
        """``trusted.overlay.`` or ``user.overlay.``: where this format keeps overlay xattrs."""
        return USER_PREFIX if self.userxattr else TRUSTED_PREFIX

    @property
    def redirect_xattr(self) -> str:
        return self.prefix + "redirect"

    @property
    def redirects(self) -> bool:
        """Whether a renamed lower directory is recorded as a redirect. Not in a userxattr
        store: kernel overlayfs with ``userxattr`` runs with ``redirect_dir=nofollow`` and
        refuses any other (fs/overlayfs/params.c: a redirect could name any lower path), so
        it says EXDEV and ``mv`` copies; the FUSE model copies the directory up instead. The
        files format, which only FUSE mounts, keeps them."""
        return not (self.userxattr and self.device_whiteouts)

    @property
    def name(self) -> str:
        """``trusted``, ``userxattr`` or ``files`` (see the module's docstring)."""
        if not self.device_whiteouts:
            return "files"
        return "userxattr" if self.userxattr else "trusted"

    def describe(self) -> str:
        """One phrase: what this format's layers hold."""
        whiteouts = "0/0 character-device whiteouts" if self.device_whiteouts else ".wh.NAME whiteout files"
        return f"{whiteouts}, {self.prefix}* xattrs (opaque, redirect)"


PRIVILEGED = LayerFormat()
USERXATTR = LayerFormat(opaque_xattr=OPAQUE_NAMES[1])
UNPRIVILEGED_FILES = LayerFormat(opaque_xattr=OPAQUE_NAMES[1], device_whiteouts=False)
FORMATS = {f.name: f for f in (PRIVILEGED, USERXATTR, UNPRIVILEGED_FILES)}


def default_format(directory: str | None = None) -> LayerFormat:
    """The format a new store (or a union given none) uses.

    With ``directory`` (an existing directory of the store), by acting there: ``PRIVILEGED``
    where a ``trusted.overlay.opaque`` xattr can be set (CAP_SYS_ADMIN in the initial user
    namespace), ``USERXATTR`` where a 0/0 whiteout and a ``user.overlay.opaque`` xattr can be
    made, ``UNPRIVILEGED_FILES`` otherwise. Without one: ``PRIVILEGED`` for root in the
    initial user namespace, ``USERXATTR`` for everyone else.
    """
    if directory is None:
        return PRIVILEGED if os.geteuid() == 0 and in_initial_userns() else USERXATTR
    import tempfile  # (here: a mount, which never probes, need not import it)

    probe = tempfile.mkdtemp(prefix=".layerfs-format-", dir=directory)
    try:
        if _can_set(probe, PRIVILEGED.opaque_xattr):
            return PRIVILEGED
        try:
            os.mknod(os.path.join(probe, "w"), stat.S_IFCHR | 0o000, os.makedev(0, 0))
        except OSError:
            return UNPRIVILEGED_FILES
        return USERXATTR if _can_set(probe, USERXATTR.opaque_xattr) else UNPRIVILEGED_FILES
    finally:
        _remove_probe(probe)


def _remove_probe(probe: str) -> None:
    for name in os.listdir(probe):
        os.unlink(os.path.join(probe, name))
    os.rmdir(probe)


def _can_set(path: str, name: str) -> bool:
    try:
        os.setxattr(path, name, b"y")
        return os.getxattr(path, name) == b"y"
    except OSError:
        return False


def is_overlay_private_xattr(name: str) -> bool:
    return name.startswith(PRIVATE_PREFIXES)


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
    rmtree_at(dir_fd, name)
    if fmt.device_whiteouts:
        os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)
    else:
        rmtree_at(dir_fd, WHITEOUT_PREFIX + name)
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
    for name in OPAQUE_NAMES:
        try:
            # an fd names the inode itself; a path must not follow a final symlink
            value = (os.getxattr(path_or_fd, name) if isinstance(path_or_fd, int)
                     else os.getxattr(path_or_fd, name, follow_symlinks=False))
            if value == b"y":
                return True
        except OSError as e:
            if e.errno not in _NO_XATTR:
                raise
    if isinstance(path_or_fd, int):
        try:
            os.stat(OPAQUE_MARKER, dir_fd=path_or_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
    return os.path.lexists(os.path.join(path_or_fd, OPAQUE_MARKER))


def redirect_of(path: str) -> str | None:
    """The overlayfs redirect xattr of a directory (not following a final symlink), or None."""
    for name in REDIRECT_NAMES:
        try:
            return os.getxattr(path, name, follow_symlinks=False).decode("utf-8", "surrogateescape")
        except OSError as e:
            if e.errno not in _NO_XATTR:
                raise
    return None


def whiteout_target(name: str, st: os.stat_result) -> str | None:
    """If the directory entry ``name`` with stat ``st`` is a whiteout, the name it deletes."""
    if is_whiteout_stat(st):
        return name
    if name == OPAQUE_MARKER:
        return None
    if name.startswith(WHITEOUT_PREFIX) and stat.S_ISREG(st.st_mode):
        return name[len(WHITEOUT_PREFIX) :]
    return None


def is_marker(name: bytes) -> bool:
    """``.wh.*`` names are whiteout/opaque markers, metadata, never entries of the tree."""
    return name.startswith(WH)


def is_marker_name(name: str) -> bool:
    """``is_marker`` of a str name."""
    return name.startswith(WHITEOUT_PREFIX)
