"""Safe application of an OCI layer tar (image-spec ``layer.md``) to a layer directory.

This module owns the translation of a layer tar into the overlayfs on-disk format of
``layerfs.union.whiteout``:

- ``.wh.NAME`` whites NAME out, ``.wh..wh..opq`` makes its directory opaque, wherever they
  appear in the tar. A whiteout only hides lower layers: over an entry of this layer it does
  nothing, except that a directory becomes opaque. An entry after a whiteout of its name
  replaces it; a directory replacing a whiteout is opaque (the lower one was deleted). A 0/0
  character device entry is a whiteout already, written in the store's format.
- PAX ``SCHILY.xattr.NAME`` records become xattrs byte for byte, except overlay-private
  names (``trusted.overlay.*``, ``user.overlay.*``), which never enter the store.
- Numeric owners, modes with setuid/setgid/sticky, ns times, symlinks (targets verbatim),
  hardlinks, fifos, devices and sparse files (holes kept) are reproduced; directories get
  their mode and times after the last entry, deepest first. Duplicates: the last one wins.

Safety (the caller deletes ``dest`` on error; nothing outside it is ever touched):

- Names are normalised (``./``, ``/``, empty components dropped: absolute means relative to
  the layer root); ``..``, NUL, components over 255 bytes, paths over ``MAX_PATH_BYTES`` or
  ``MAX_DEPTH`` and ``.wh.*`` directory components are refused.
- Paths are walked from the layer root a component at a time with ``O_DIRECTORY|O_NOFOLLOW``:
  a symlink or non-directory in a parent position is an error. Missing parents are created
  (0755 root:root) unless the lower layers show a non-directory there (a symlink planted in
  one layer and written through in the next).
- Hardlink targets must be non-directory, non-whiteout entries already in this layer.
- Limits count what lands on disk (``apply_layer``'s ``limits``): regular files by their
  logical size, so a sparse member is counted with its holes (and written with them, as
  holes); a hardlink adds a name, not data, and an export writes it as a link again.
- Headers are checked strictly: a bad checksum, a cut header or data, data after a zero
  block are errors (``tarfile`` alone ends the archive there silently). A stream ending on a
  header boundary without end-of-archive blocks is accepted, as Go's ``archive/tar`` (and so
  containerd) accepts it; the diffID check is what catches a cut blob.

Errors are ``UnsafeArchive`` (``LimitExceeded`` from the decompressor) naming the tar member in
the message and in ``entry``; errors of the machine (ENOSPC, EIO, ...) propagate as
``OSError``. Without root, device nodes are skipped and owners left, as containerd does in a
user namespace.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import stat
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Self, cast

from layerfs.digest import Readable
from layerfs.errors import LimitExceeded, UnsafeArchive
from layerfs.layer.compression import Limits
from layerfs.linux.files import rmtree_at
from layerfs.union import whiteout
from layerfs.union.view import Entry, LayerStack
from layerfs.union.whiteout import LayerFormat

log = logging.getLogger(__name__)

BUFSIZE = 1 << 20  # regular files are copied in chunks of this size
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_XATTR_PREFIX = "SCHILY.xattr."
# errors of the machine, not of the archive: reported as they are
_ENVIRONMENT = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
_KNOWN_TYPES = set(tarfile.REGULAR_TYPES) | {
    tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE,
}  # fmt: skip
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "leave unchanged" to chown
# Longer names cannot be used through a path by anything in a container (PATH_MAX), and
# deeper trees break every recursive tool, shutil.rmtree included.
MAX_PATH_BYTES = 4095
MAX_DEPTH = 512
# Logical bytes a layer may hold whatever its tar's size (sparse files with large holes);
# beyond, they must be backed by tar bytes at the decompression ratio limit.
RATIO_FREE_BYTES = 1 << 30


@dataclass
class ApplyStats:
    """``entries``: tar members processed. ``size``: bytes of regular-file content in the
    resulting layer (apparent size; a hardlinked inode counts once)."""

    entries: int
    size: int


def apply_layer(
    tar_stream: Readable,
    dest: str,
    *,
    lowers: Sequence[str] = (),
    fmt: LayerFormat = whiteout.PRIVILEGED,
    what: str = "layer",
    limits: Limits | None = None,
    lowers_ready: Callable[[], None] | None = None,
) -> ApplyStats:
    """Apply the (decompressed, forward-only) layer tar ``tar_stream`` to the empty
    directory ``dest``. ``lowers`` are the layers below, top first. ``tar_stream`` is not
    closed; the caller may drain what follows the end-of-archive blocks.

    ``limits`` (default: ``Limits.from_env()``) bound what lands on disk, not only what
    streams: the logical size of the regular files (a sparse member counts its full size,
    holes included, a hardlink nothing: it adds a name, not data) may not pass
    ``max_bytes``, nor, past ``RATIO_FREE_BYTES``, ``max_ratio`` times the tar bytes read
    so far (a 2 KB sparse member claiming 10 GB). ``LimitExceeded`` names the entry, and
    is raised before that entry's file is made.

    ``lowers_ready``, if given, is called (once) before the lower layers are first looked
    at, and returns when they are complete: layers of one image can be applied at once, each
    into its own directory, while the ones below are still being written. The lowers are
    only consulted when this layer creates a parent directory its tar does not list; then
    they are looked at as they are once complete, so the result is that of applying the
    layers one after the other. An exception from it stops the application."""
    root_fd = os.open(dest, _DIR)
    applier = _Applier(root_fd, dest, lowers, fmt, what, limits or Limits.from_env(), lowers_ready)
    try:
        applier.run(tar_stream)
        return ApplyStats(applier.entries, applier.size)
    finally:
        applier.close()
        os.close(root_fd)


class _CorruptTar(tarfile.TarError):
    """A header problem ``tarfile`` would silently treat as the end of the archive."""


# Header errors tarfile has but does not document (nor do its type stubs).
_EOF_HEADER: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_BAD_HEADER: tuple[type[Exception], ...] = (
    tarfile.InvalidHeaderError,  # type: ignore[attr-defined]
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
)


class _StrictTarInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except _EOF_HEADER:
            # A zero block ends the archive only if the next block is zero too (or absent).
            nxt = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
            if nxt.count(0) != len(nxt):
                raise _CorruptTar("data after an end-of-archive zero block") from None
            raise
        except _BAD_HEADER as e:
            raise _CorruptTar(str(e)) from None


def _split(name: str, what: str, entry: str) -> list[str]:
    """Normalised components of a member or link name; raises for unsafe names."""
    if "\0" in name:
        raise UnsafeArchive(f"{what}: {entry!r}: NUL byte in name {name!r}", entry)
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            raise UnsafeArchive(f"{what}: {entry!r}: '..' in {name!r} would leave the layer", entry)
        if len(os.fsencode(p)) > 255:
            raise UnsafeArchive(f"{what}: {entry!r}: a component of {name!r} is longer than 255 bytes", entry)
        parts.append(p)
    if len(parts) > MAX_DEPTH or len(os.fsencode("/".join(parts))) > MAX_PATH_BYTES:
        raise UnsafeArchive(
            f"{what}: {entry!r}: {name!r} is deeper than {MAX_DEPTH} or longer than {MAX_PATH_BYTES} bytes",
            entry,
        )
    for p in parts[:-1]:
        if p.startswith(whiteout.WHITEOUT_PREFIX):
            raise UnsafeArchive(f"{what}: {entry!r}: whiteout name {p!r} used as a directory", entry)
    return parts


def _ns(value: str, what: str, entry: str) -> int:
    try:
        d = Decimal(value)
        return int(d.scaleb(9).to_integral_value(ROUND_FLOOR))
    except (InvalidOperation, ValueError, OverflowError):
        raise UnsafeArchive(f"{what}: {entry!r}: invalid PAX time {value!r}", entry) from None


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class _Applier:
    """One application of one tar; holds the open layer root and what is deferred."""

    def __init__(self, root_fd: int, dest: str, lowers: Sequence[str], fmt: LayerFormat, what: str,
                 limits: Limits, lowers_ready: Callable[[], None] | None = None) -> None:
        self.root_fd = root_fd
        self.dest = dest
        self.lowers = list(lowers)
        self.lowers_ready = lowers_ready
        self.fmt = fmt
        self.what = what
        self.limits = limits
        self.entries = 0
        self.size = 0
        self.logical = 0  # logical bytes of the regular files written (see ``apply_layer``)
        # this layer over the lowers: what a missing parent would be created over. This layer
        # is written while the view is consulted: each lookup reads it afresh (the lowers once).
        # Made when first needed (``union_view``), once the lowers are complete.
        self.union: LayerStack | None = None
        self.privileged = os.geteuid() == 0
        # the owner a new file gets (no directory here is setgid while the tar is written:
        # directory modes come last), so a chown to it would change nothing
        self.own_ids = (os.geteuid(), os.getegid())
        # path -> (mode, (atime_ns, mtime_ns)) of explicit directories, applied at the end
        self.dirs: dict[str, tuple[int, tuple[int, int], int]] = {}  # ... and the entry number
        self.removed: dict[str, int] = {}  # directory path -> entry number that last removed it
        # the parent directory of the previous entry (tars list siblings together)
        self._cached: tuple[tuple[str, ...], int] | None = None

    def release(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def close(self) -> None:
        self.release()
        if self.union is not None:
            self.union.close()

    def _err(self, entry: str, msg: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self.what}: {entry!r}: {msg}", entry)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stream: Readable) -> None:
        current: str | None = None
        in_header = True  # reading a header (after ``current``), not ``current``'s data
        try:
            tf = tarfile.open(fileobj=stream, mode="r|", tarinfo=_StrictTarInfo)  # type: ignore[call-overload]
            while (member := tf.next()) is not None:
                # tarfile keeps every member it has read; a layer can have millions.
                tf.members.clear()
                current, in_header = member.name, False
                self.entries += 1
                self._member(tf, member)
                in_header = True
            self.size = self.tree_size()  # before the directory times: listing moves atimes
            self._finish_dirs()
        except UnsafeArchive as e:
            if e.entry is None and current is not None:  # from the decompressor, mid-member
                raise type(e)(f"{e} (in entry {current!r})", current) from e
            raise
        except (tarfile.TarError, EOFError) as e:
            where = "" if current is None else f" {'after' if in_header else 'in'} entry {current!r}"
            raise UnsafeArchive(f"{self.what}: corrupt or truncated tar{where}: {e}", current) from e
        except (OSError, ValueError, OverflowError) as e:  # ValueError: a NUL in a link target
            if current is None or getattr(e, "errno", None) in _ENVIRONMENT:
                raise
            msg = str(e)
            if isinstance(e, OSError) and e.errno:
                # a filename that is an int is an fd of ours: the entry names the file already
                named = e.filename is not None and not isinstance(e.filename, int)
                msg = os.strerror(e.errno) + (f" ({e.filename})" if named else "")
            raise self._err(current, msg) from e

    def _member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        name = m.name
        if m.type not in _KNOWN_TYPES:
            raise self._err(name, f"unsupported entry type {m.type!r}")
        if not (0 <= m.uid <= _MAX_ID and 0 <= m.gid <= _MAX_ID) or m.size < 0:
            raise self._err(name, f"invalid header (uid {m.uid}, gid {m.gid}, size {m.size})")
        parts = _split(name, self.what, name)
        if not parts:
            if not m.isdir():
                raise self._err(name, "root entry is not a directory")
            self._owner_xattrs(self.root_fd, m)
            self.dirs[""] = (m.mode & 0o7777, self._times(m), self.entries)
            return
        try:
            kind, target = whiteout.classify_tar_name(parts[-1])
        except UnsafeArchive as e:
            raise self._err(name, str(e)) from None
        if kind == "opaque":
            whiteout.set_opaque(self._parent(parts[:-1], name), self.fmt)
            return
        parent = self._parent(parts[:-1], name)
        if kind == "whiteout":
            assert target is not None
            self._whiteout(parent, target)
        elif m.ischr() and m.devmajor == 0 and m.devminor == 0:
            self._whiteout(parent, parts[-1])  # already an overlay whiteout: keep the store's format
        else:
            self._write(tf, m, parts, parent)

    # -- walking -----------------------------------------------------------------------------

    def _parent(self, parts: list[str], entry: str) -> int:
        """An fd of the directory ``parts`` of this layer, created as needed. Owned by the
        cache: valid until the next call."""
        key = tuple(parts)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        fd = self._walk(parts, entry, create=True)
        self.release()
        self._cached = (key, fd)
        return fd

    def _walk(self, parts: list[str], entry: str, *, create: bool) -> int:
        """Open the directory ``parts`` of this layer (no symlink followed), creating missing
        components if ``create``; the caller closes the fd."""
        fd = os.dup(self.root_fd)
        below: Iterator[Entry | None] | None = None  # the union's entries for the next prefixes
        try:
            for i, name in enumerate(parts):
                try:
                    nfd = os.open(name, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    path = "/".join(parts[: i + 1])
                    if not create:
                        raise self._err(entry, f"{path!r} does not exist in this layer") from None
                    if self._file_whiteout(fd, name, remove=True):
                        nfd = self._mkdir_implicit(fd, name, opaque=True)
                    else:
                        if below is None:
                            below = self._union_from(parts, i)
                        self._check_lower(next(below, None), path, entry)
                        nfd = self._mkdir_implicit(fd, name, opaque=False)
                except OSError as e:
                    nfd = self._not_a_directory(fd, parts[: i + 1], entry, create, e)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _union_from(self, parts: list[str], i: int) -> Iterator[Entry | None]:
        """The union's entries for ``parts[:i+1]``, ``parts[:i+2]``, ..., each computed from the
        one before (a deep name costs one pass) and before its directory is created here."""
        union = self.union_view()
        if union is None:
            return iter(())
        view = union.lookup_parents("/".join([*parts, "-"]))  # proper prefixes = parts
        for _ in range(i):
            next(view, None)  # present here as directories: nothing to check
        return view

    def union_view(self) -> LayerStack | None:
        """This layer over the complete lowers (None without lowers)."""
        if self.union is None and self.lowers:
            if self.lowers_ready is not None:
                self.lowers_ready()
                self.lowers_ready = None
            self.union = LayerStack([self.dest, *self.lowers], top_changes=True)
        return self.union

    def _not_a_directory(self, fd: int, prefix: list[str], entry: str, create: bool, e: OSError) -> int:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise e
        name, path = prefix[-1], "/".join(prefix)
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if create and whiteout.is_whiteout_stat(st):
            os.unlink(name, dir_fd=fd)  # a directory replacing a whiteout: opaque
            return self._mkdir_implicit(fd, name, opaque=True)
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise self._err(entry, f"parent {path!r} is {what} in this layer") from None

    def _check_lower(self, found: Entry | None, path: str, entry: str) -> None:
        """Refuse to create a directory where the lower layers show a non-directory: the
        image means to write through a symlink planted in an earlier layer."""
        if found is not None and stat.S_ISLNK(found.st.st_mode):
            why = "a symlink in a lower layer; writing through it would escape the layer it points into"
            raise self._err(entry, f"parent {path!r} is {why}")
        if found is not None and not found.is_dir:
            raise self._err(entry, f"parent {path!r} is not a directory in a lower layer")

    def _mkdir_implicit(self, fd: int, name: str, *, opaque: bool) -> int:
        os.mkdir(name, 0o755, dir_fd=fd)
        nfd = os.open(name, _DIR, dir_fd=fd)
        if self.privileged:
            os.fchown(nfd, 0, 0)  # not the gid of a setgid parent
        os.chmod(nfd, 0o755)  # not the umask, not an inherited setgid bit
        if opaque:
            whiteout.set_opaque(nfd, self.fmt)
        return nfd

    def _file_whiteout(self, fd: int, name: str, *, remove: bool) -> bool:
        """Whether a file-style whiteout (``.wh.NAME``) of ``name`` is here; optionally remove it."""
        if self.fmt.device_whiteouts:
            return False
        marker = whiteout.WHITEOUT_PREFIX + name
        if _lstat(fd, marker) is None:
            return False
        if remove:
            os.unlink(marker, dir_fd=fd)
        return True

    # -- entries -----------------------------------------------------------------------------

    def _whiteout(self, parent: int, name: str) -> None:
        st = _lstat(parent, name)
        if st is None:
            if not self._file_whiteout(parent, name, remove=False):
                whiteout.make_whiteout(parent, name, self.fmt)
        elif stat.S_ISDIR(st.st_mode):
            # Only lower layers are hidden: this layer's directory stays, opaque.
            fd = os.open(name, _DIR, dir_fd=parent)
            try:
                whiteout.set_opaque(fd, self.fmt)
            finally:
                os.close(fd)
        # else: a whiteout already, or a non-directory of this layer, which stays

    def _replace(self, parent: int, name: str, path: str, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            # The cached fd is ``parent`` itself (the cache always holds the current
            # entry's parent), never something inside the tree that goes.
            rmtree_at(parent, name)
            self.removed[path] = self.entries  # its recorded metadata (and its children's) is void
        else:
            os.unlink(name, dir_fd=parent)

    def _write(self, tf: tarfile.TarFile, m: tarfile.TarInfo, parts: list[str], parent: int) -> None:
        name, path = parts[-1], "/".join(parts)
        link_src = self._link_source(m, path) if m.islnk() else None
        try:
            st = _lstat(parent, name)
            over_whiteout = False
            if st is not None:
                if stat.S_ISDIR(st.st_mode) and m.isdir():
                    # A directory over a directory keeps its children, takes the new metadata.
                    fd = os.open(name, _DIR, dir_fd=parent)
                    try:
                        self._owner_xattrs(fd, m)
                    finally:
                        os.close(fd)
                    self.dirs[path] = (m.mode & 0o7777, self._times(m), self.entries)
                    return
                over_whiteout = whiteout.is_whiteout_stat(st)
                self._replace(parent, name, path, st)
            else:
                over_whiteout = self._file_whiteout(parent, name, remove=True)
            if m.isdir():
                self._mkdir(parent, name, path, m, opaque=over_whiteout)
            elif m.isreg():
                self._account(tf, m)
                self._regular(tf, parent, name, m)
            elif link_src is not None:
                os.link(link_src[1], name, src_dir_fd=link_src[0], dst_dir_fd=parent, follow_symlinks=False)
            else:
                self._special(parent, name, m)
        finally:
            if link_src is not None:
                os.close(link_src[0])

    def _link_source(self, m: tarfile.TarInfo, path: str) -> tuple[int, str]:
        """(parent fd, name) of a hardlink's target, which must already be in this layer."""
        parts = _split(m.linkname, self.what, m.name)
        if not parts:
            raise self._err(m.name, "hardlink to the layer root")
        if parts[-1].startswith(whiteout.WHITEOUT_PREFIX):
            raise self._err(m.name, f"hardlink to a whiteout {m.linkname!r}")
        if "/".join(parts) == path:
            raise self._err(m.name, "hardlink to itself")
        try:
            fd = self._walk(parts[:-1], m.name, create=False)
        except UnsafeArchive as e:
            reason = str(e).removeprefix(f"{self.what}: {m.name!r}: ")
            raise self._err(m.name, f"hardlink target {m.linkname!r}: {reason}") from None
        try:
            st = _lstat(fd, parts[-1])
            if st is None:
                raise self._err(m.name, f"hardlink target {m.linkname!r} is not in this layer")
            if stat.S_ISDIR(st.st_mode):
                raise self._err(m.name, f"hardlink target {m.linkname!r} is a directory")
            if whiteout.is_whiteout_stat(st):
                raise self._err(m.name, f"hardlink target {m.linkname!r} is a whiteout")
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    def _mkdir(self, parent: int, name: str, path: str, m: tarfile.TarInfo, *, opaque: bool) -> None:
        os.mkdir(name, 0o700, dir_fd=parent)  # mode and times once every child is written
        fd = os.open(name, _DIR, dir_fd=parent)
        try:
            self._owner_xattrs(fd, m)
            if opaque:
                whiteout.set_opaque(fd, self.fmt)
        finally:
            os.close(fd)
        self.dirs[path] = (m.mode & 0o7777, self._times(m), self.entries)

    def _account(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        """Count ``m``'s logical size against the limits before its file exists."""
        self.logical += m.size
        lim = self.limits
        sparse = " (a sparse file: its holes count)" if m.sparse is not None else ""
        if self.logical > lim.max_bytes:
            raise LimitExceeded(
                f"{self.what}: {m.name!r}: the layer's files would take {self.logical} bytes{sparse}, past the "
                f"limit of {lim.max_bytes} bytes (LAYERFS_MAX_LAYER_BYTES)", m.name)
        streamed = max(tf.offset, 1)  # tar bytes read so far, this member's header included
        if self.logical > max(lim.min_ratio_bytes, RATIO_FREE_BYTES) and self.logical > lim.max_ratio * streamed:
            raise LimitExceeded(
                f"{self.what}: {m.name!r}: the layer's files would take {self.logical} bytes from "
                f"{streamed} bytes of tar{sparse}: more than {lim.max_ratio:g} times (LAYERFS_MAX_RATIO)", m.name)

    def _regular(self, tf: tarfile.TarFile, parent: int, name: str, m: tarfile.TarInfo) -> None:
        fd = os.open(name, _NEW_FILE, 0o600, dir_fd=parent)
        try:
            if m.sparse is not None:
                self._copy_sparse(tf, m, fd)
            else:
                self._copy(tf, m, fd, [(None, m.size)])
            # content, owner (chown clears setuid and security.capability), mode, xattrs, times;
            # a new file is its creator's already (and has neither setuid nor xattrs yet)
            if (m.uid, m.gid) != self.own_ids:
                self._chown(fd, m)
            os.chmod(fd, m.mode & 0o7777)
            self._xattrs(fd, m)
            os.utime(fd, ns=self._times(m))
        finally:
            os.close(fd)

    def _copy(
        self, tf: tarfile.TarFile, m: tarfile.TarInfo, fd: int, regions: Sequence[tuple[int | None, int]]
    ) -> None:
        """Stream ``m``'s data into ``fd``: (offset, length) runs, offset None = append."""
        src = tf.extractfile(m)
        assert src is not None
        for offset, length in regions:
            while length:
                view = memoryview(src.read(min(length, BUFSIZE)))
                if not view:
                    raise tarfile.ReadError("unexpected end of data")
                while view:
                    n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
                    view, length = view[n:], length - n
                    offset = None if offset is None else offset + n

    def _copy_sparse(self, tf: tarfile.TarFile, m: tarfile.TarInfo, fd: int) -> None:
        """Write only the data regions and leave holes: a sparse member's logical size can
        be far beyond what the stream carries."""
        regions: list[tuple[int | None, int]] = []
        end = 0
        for offset, length in cast(list[tuple[int, int]], m.sparse or []):
            if length == 0:
                continue  # GNU headers pad the map with (0, 0)
            if offset < end or length < 0 or offset + length > m.size:
                raise self._err(m.name, f"invalid sparse map {m.sparse!r} for size {m.size}")
            regions.append((offset, length))
            end = offset + length
        # tarfile would expand the holes into zeros; read the stored data as one plain run.
        stored = copy.copy(m)
        stored.sparse = None
        stored.size = sum(length for _, length in regions)
        self._copy(tf, stored, fd, regions)
        os.ftruncate(fd, m.size)

    def _special(self, parent: int, name: str, m: tarfile.TarInfo) -> None:
        if m.issym():
            os.symlink(m.linkname, name, dir_fd=parent)
        elif m.isfifo():
            os.mkfifo(name, 0o600, dir_fd=parent)
        else:
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            try:
                os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=parent)
            except PermissionError:
                if self.privileged:
                    raise
                log.warning("%s: %r: device node skipped (needs root)", self.what, m.name)
                return
        self._chown(name, m, parent)
        if not m.issym():
            os.chmod(name, m.mode & 0o7777, dir_fd=parent)
        # No fd can carry xattrs for these (opening a device runs its driver): go through
        # the parent's fd, not following the last component.
        self._xattrs(f"/proc/self/fd/{parent}/{name}", m)
        os.utime(name, ns=self._times(m), dir_fd=parent, follow_symlinks=False)

    # -- metadata ----------------------------------------------------------------------------

    def _times(self, m: tarfile.TarInfo) -> tuple[int, int]:
        """(atime, mtime) in ns; PAX times are parsed exactly, not through a float."""
        pax = m.pax_headers
        mtime = _ns(pax["mtime"], self.what, m.name) if "mtime" in pax else int(m.mtime) * 10**9
        atime = _ns(pax["atime"], self.what, m.name) if "atime" in pax else mtime
        return atime, mtime

    def _chown(self, target: int | str, m: tarfile.TarInfo, parent: int | None = None) -> None:
        try:
            if isinstance(target, int):
                os.chown(target, m.uid, m.gid)
            else:
                os.chown(target, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
        except PermissionError:
            if self.privileged:
                raise
            log.debug("%s: %r: owner %d:%d not kept (not root)", self.what, m.name, m.uid, m.gid)

    def _owner_xattrs(self, fd: int, m: tarfile.TarInfo) -> None:
        self._chown(fd, m)
        self._xattrs(fd, m)

    def _xattrs(self, target: int | str, m: tarfile.TarInfo) -> None:
        for key, value in m.pax_headers.items():
            if not key.startswith(_XATTR_PREFIX):
                continue
            attr = key[len(_XATTR_PREFIX) :]
            if whiteout.is_overlay_private_xattr(attr):
                continue  # overlay state never comes from an image
            # tarfile decoded the value with surrogateescape; this restores the exact bytes.
            raw = value.encode("utf-8", "surrogateescape")
            try:
                if isinstance(target, int):
                    os.setxattr(target, attr, raw)
                else:
                    os.setxattr(target, attr, raw, follow_symlinks=False)
            except OSError as e:
                # As containerd: a filesystem or an entry type that cannot hold the
                # attribute (user.* on a symlink) loses it, with a warning.
                if e.errno in _ENVIRONMENT:
                    raise
                if e.errno not in (errno.ENOTSUP, errno.EPERM):
                    # (an fd is no name to show: say which entry and which attribute)
                    raise self._err(m.name, f"cannot set xattr {attr} ({len(raw)} bytes): {e.strerror}") from e
                log.warning("%s: %r: xattr %s not kept: %s", self.what, m.name, attr, e.strerror)

    def _finish_dirs(self) -> None:
        """Directory modes and times, deepest first, once nothing is created in them."""
        self.release()
        for path in sorted(self.dirs, key=lambda p: p.count("/") + bool(p), reverse=True):
            mode, times, seq = self.dirs[path]
            parts = path.split("/") if path else []
            if any(self.removed.get("/".join(parts[: i + 1]), -1) > seq for i in range(len(parts))):
                continue  # removed (with an ancestor, maybe) after it was recorded
            fd = self._walk(parts, path, create=False)
            try:
                os.chmod(fd, mode)
                os.utime(fd, ns=times)
            finally:
                os.close(fd)

    def tree_size(self) -> int:
        """Apparent size of the regular files now in the layer, each inode once."""
        seen: set[int] = set()
        total = 0
        # Depth first with one fd: down by name, back up by '..' (only reads).
        pending: list[list[str]] = []  # per level, the subdirectories still to visit
        fd = os.dup(self.root_fd)
        try:
            while True:
                subdirs = []
                with os.scandir(fd) as it:
                    for e in it:
                        st = e.stat(follow_symlinks=False)
                        if stat.S_ISDIR(st.st_mode):
                            subdirs.append(e.name)
                        elif stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                            seen.add(st.st_ino)
                            total += st.st_size
                pending.append(subdirs)
                while pending and not pending[-1]:
                    pending.pop()
                    if pending:
                        fd = self._reopen(fd, "..")
                if not pending:
                    return total
                fd = self._reopen(fd, pending[-1].pop())
        finally:
            os.close(fd)

    @staticmethod
    def _reopen(fd: int, name: str) -> int:
        nfd = os.open(name, _DIR, dir_fd=fd)
        os.close(fd)
        return nfd
