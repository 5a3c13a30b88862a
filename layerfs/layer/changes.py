"""What a layer changes, and the layer tar that carries it.

This module owns three views of "difference" between filesystem trees:

- ``layer_changes``: the A/C/D list of one layer directory (overlayfs on-disk format, see
  ``layerfs.union.whiteout``) against the union of its lowers, like ``docker diff``;
- ``write_layer_tar`` / ``layer_tar_digest``: the OCI layer tar of a layer directory,
  deterministic for the same tree;
- ``tree_diff``: the A/C/D list between two merged trees (``layerfs diff REF1 REF2``).

Output format it owns: the OCI layer tar (image-spec ``layer.md``) as layerfs writes it —
uncompressed PAX; names relative (``etc/``, ``etc/passwd``), directories with a trailing
``/``, the root not emitted; entries in tree order (a directory, then its opaque marker,
then its children, siblings by byte order of their names); numeric uid/gid only, empty
uname/gname, whole-second mtimes, no atime/ctime; xattrs as ``SCHILY.xattr.NAME`` records
sorted by name, never overlay-private ones; whiteouts as empty regular files ``.wh.NAME``
and opaque directories as an empty ``DIR/.wh..wh..opq`` right after the directory (both
mode 0, uid/gid 0, the mtime of the whiteout or the directory); a later path of a
hardlinked inode as a hard link to the first.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import xxhash

from layerfs.digest import ALGORITHM, Digest
from layerfs.errors import FailedPrecondition, UnsafeArchive
from layerfs.union import whiteout, xattrs
from layerfs.union.view import Entry, LayerStack
from layerfs.union.whiteout import redirect_of

ADDED = "A"
CHANGED = "C"
DELETED = "D"

_CHUNK = 1 << 20


@dataclass(frozen=True, order=True)
class Change:
    """One changed path. ``path`` is absolute-style (``/etc/passwd``); ``kind`` is A, C or D."""

    path: str
    kind: str

    def __str__(self) -> str:  # the line `docker diff` prints
        return f"{self.kind} {self.path}"


# --- shared helpers -------------------------------------------------------------------------


def _xattrs(path: str) -> dict[str, bytes]:
    """Non-private xattrs of ``path`` (not following a final symlink), name -> value."""
    return {name: value for name, value in xattrs.read_all(os.fsencode(path)).items()
            if not whiteout.is_overlay_private_xattr(name)}


def _abs(relpath: str) -> str:
    return "/" + relpath


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _entry_path(stack: LayerStack, entry: Entry) -> str:
    """The real path of the layer file that provides ``entry``."""
    return stack.real_path(entry)


def _lower_child(stack: LayerStack, parent: Entry, name: str) -> Entry | None:
    # One lookup step from an already resolved directory: O(layers) instead of
    # O(depth × layers) for a lookup from the root.
    return stack.child(parent, name)


# --- 1. changes of one layer against its lowers ---------------------------------------------


def layer_changes(layer_dir: str, lowers: Sequence[str]) -> list[Change]:
    """A/C/D of ``layer_dir`` against the union of ``lowers`` (top first), sorted by path.

    - a whiteout (device or ``.wh.`` file) of a name visible below: ``D``; of anything
      else: nothing;
    - an entry not visible below: ``A``, and every entry under it;
    - a non-directory over anything, a directory over a non-directory: ``C``;
    - a directory over a directory: ``C`` if opaque or its metadata (mode, owner, mtime,
      non-private xattrs) differs; otherwise not reported, but its children are;
    - an opaque directory also reports ``D`` for each lower child it does not provide
      itself. Directories under an opaque one do not merge with the lowers either (the
      kernel stops merging at the opaque one), so they hide their lower children as well.
    """
    changes: list[Change] = []
    with LayerStack(lowers) as stack, LayerStack([layer_dir, *lowers]) as merged:
        root_lower = stack.root()
        # an opaque marker on a layer root is ignored, as kernel overlayfs ignores it
        _walk_layer_dir(stack, layer_dir, "", root_lower, False, changes, merged)
    return sorted(changes)


def _walk_layer_dir(
    stack: LayerStack,
    dirpath: str,
    relpath: str,
    lower: Entry | None,
    hides_lower: bool,
    changes: list[Change],
    merged: LayerStack,
) -> bool:
    """Report the children of the layer directory ``dirpath`` (union path ``relpath``).

    ``lower`` is the directory visible below at the same path (None when nothing is, or a
    non-directory is: then everything here is new). ``hides_lower``: the lowers' children
    are hidden (this directory is opaque or below an opaque one). Returns whether it hid
    any lower child that way: a directory under an opaque one that hides nothing and keeps
    its metadata has not changed.
    """
    entries: dict[str, os.stat_result] = {}
    deleted: set[str] = set()
    for name in os.listdir(dirpath):
        st = os.lstat(os.path.join(dirpath, name))
        target = whiteout.whiteout_target(name, st)
        if target is not None:
            deleted.add(target)
        elif not whiteout.is_marker_name(name):
            entries[name] = st
    # A `.wh.NAME` file hides NAME in its own layer too (as the union view reads it).
    provided = {n: st for n, st in entries.items() if n not in deleted}

    reported_delete = False
    if lower is not None and lower.is_dir:
        if hides_lower:
            deleted.update(stack.listdir(lower))
        for name in sorted(deleted - provided.keys()):
            if _lower_child(stack, lower, name) is not None:
                changes.append(Change(_abs(_join(relpath, name)), DELETED))
                reported_delete = True
    else:
        lower = None

    for name in sorted(provided):
        st = provided[name]
        child_rel = _join(relpath, name)
        child_path = os.path.join(dirpath, name)
        below = _lower_child(stack, lower, name) if lower is not None else None
        if not stat.S_ISDIR(st.st_mode):
            changes.append(Change(_abs(child_rel), ADDED if below is None else CHANGED))
            continue
        if redirect_of(child_path) is not None:
            # A lower directory renamed here (overlayfs redirect_dir): the new path and
            # everything now under it are new; the old path is a whiteout, reported above.
            changes.append(Change(_abs(child_rel), ADDED if below is None else CHANGED))
            entry = merged.lookup(child_rel)
            if entry is not None:
                changes.extend(Change(_abs(e.path), ADDED) for e in merged.walk(entry))
            continue
        if below is None or not below.is_dir:
            changes.append(Change(_abs(child_rel), ADDED if below is None else CHANGED))
            _walk_layer_dir(stack, child_path, child_rel, None, False, changes, merged)
            continue
        opaque = whiteout.is_opaque(child_path)
        child_hides = hides_lower or opaque
        hid_some = _walk_layer_dir(stack, child_path, child_rel, below, child_hides, changes, merged)
        if opaque or hid_some or _dir_meta_differs(st, child_path, below.st, _entry_path(stack, below)):
            changes.append(Change(_abs(child_rel), CHANGED))
    return hides_lower and reported_delete


def _dir_meta_differs(st_a: os.stat_result, path_a: str, st_b: os.stat_result, path_b: str) -> bool:
    if (st_a.st_mode, st_a.st_uid, st_a.st_gid, st_a.st_mtime_ns) != (
        st_b.st_mode,
        st_b.st_uid,
        st_b.st_gid,
        st_b.st_mtime_ns,
    ):
        return True
    return _xattrs(path_a) != _xattrs(path_b)


# --- 2. the layer tar ---------------------------------------------------------------------


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC


def write_layer_tar(layer_dir: str, out: BinaryIO, lowers: Sequence[str] = ()) -> None:
    """Write the OCI layer tar of ``layer_dir`` to ``out`` (format: see the module docstring).

    ``lowers`` (top first) are needed for an upper written by overlayfs with
    ``redirect_dir=on``: a renamed lower directory is a directory with a ``redirect`` xattr
    whose content lives partly in the lowers. OCI has no rename, so it is written whole —
    the directory, an opaque marker, and its merged content — at its new path.

    ``out`` only needs ``write``: a pipe or stdout will do. Same tree, same bytes: nothing
    depends on listing order, inode numbers, atime, the clock or the user database.
    Regular files are streamed, opened relative to their directory's fd with O_NOFOLLOW;
    no symlink in the layer is ever followed. Sockets are skipped (a tar cannot hold them).
    """
    root_fd = os.open(layer_dir, _DIR_FLAGS)
    try:
        # "w|" streams: no seek/tell on ``out``. Explicit encoding, so names and xattr
        # values that are not UTF-8 go out as their raw bytes whatever the locale says.
        with tarfile.open(
            fileobj=out,
            mode="w|",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tar:
            root_st = os.fstat(root_fd)
            if whiteout.is_opaque(_fd_path(root_fd)):
                tar.addfile(_marker_info(whiteout.OPAQUE_MARKER, root_st))
            if lowers:
                with LayerStack([layer_dir, *lowers]) as stack:
                    _TarWriter(tar, stack).write_dir(root_fd, "")
            else:
                _TarWriter(tar).write_dir(root_fd, "")
    finally:
        os.close(root_fd)


def layer_tar_digest(layer_dir: str, lowers: Sequence[str] = ()) -> tuple[Digest, int]:
    """The sha256 diffID and the size of what ``write_layer_tar`` writes for ``layer_dir``."""
    sink = _HashingSink()
    write_layer_tar(layer_dir, sink, lowers)  # type: ignore[arg-type]  # only write() is used
    return Digest(f"{ALGORITHM}:{sink.hash.hexdigest()}"), sink.size


class _HashingSink:
    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return len(data)


def _marker_info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    """An OCI whiteout/opaque marker: empty regular file, mode 0, root-owned, given mtime."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.REGTYPE
    info.mode = 0
    info.uid = info.gid = 0
    info.size = 0
    info.mtime = st.st_mtime_ns // 1_000_000_000
    return info


def _fd_path(dir_fd: int, name: str = ".") -> str:
    """A path naming ``name`` inside the open directory ``dir_fd``.

    The *xattr calls have no dir_fd. /proc/self/fd/N
    is the directory itself, and the final NAME is not followed when follow_symlinks=False:
    the *at() equivalent.
    """
    return f"/proc/self/fd/{dir_fd}/{name}"


def _valid_tar_marker(name: str) -> bool:
    """A `.wh.` name an OCI reader accepts (others, like aufs' `.wh..wh.plnk`, are dropped)."""
    try:
        whiteout.classify_tar_name(name)
    except UnsafeArchive:
        return False
    return True


class _TarWriter:
    """One tar export: walks directory fds and remembers hardlinked inodes."""

    def __init__(self, tar: tarfile.TarFile, merged: LayerStack | None = None) -> None:
        self.tar = tar
        self.merged = merged  # the upper over its lowers, for redirected directories
        self.links: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) -> first tar name

    def write_dir(self, dir_fd: int, prefix: str) -> None:
        # Collect first: a device whiteout `foo` goes out as `.wh.foo` and sorts by that name.
        # name in tar -> (name on disk, stat, is marker)
        items: dict[str, tuple[str, os.stat_result, bool]] = {}
        for name in os.listdir(dir_fd):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if name == whiteout.OPAQUE_MARKER:
                continue  # emitted with its directory, from whichever convention marks it
            if whiteout.is_whiteout_stat(st):
                tar_name = whiteout.WHITEOUT_PREFIX + name
                if _valid_tar_marker(tar_name):
                    items[tar_name] = (name, st, True)  # wins over a `.wh.` file of that name
            elif whiteout.is_marker_name(name):
                if stat.S_ISREG(st.st_mode) and _valid_tar_marker(name):
                    items.setdefault(name, (name, st, True))
            elif not stat.S_ISSOCK(st.st_mode):
                items[name] = (name, st, False)
        for tar_name in sorted(items, key=os.fsencode):
            name, st, is_marker = items[tar_name]
            path = prefix + tar_name
            if is_marker:
                # both conventions give the same entry: a store that writes `.wh.` files and
                # one that writes devices export the same layer as the same bytes
                self.tar.addfile(_marker_info(path, st))
            elif stat.S_ISDIR(st.st_mode):
                self._write_subdir(dir_fd, name, path, st)
            else:
                self._write_nondir(dir_fd, name, path, st)

    def _write_subdir(self, dir_fd: int, name: str, path: str, st: os.stat_result) -> None:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                raise FailedPrecondition(f"{path}: replaced while the layer was being archived")
            info = self._info(path, fst, dir_fd, name)
            info.type = tarfile.DIRTYPE
            self.tar.addfile(info)
            redirected = self.merged is not None and redirect_of(_fd_path(fd)) is not None
            if redirected or whiteout.is_opaque(_fd_path(fd)):
                self.tar.addfile(_marker_info(f"{path}/{whiteout.OPAQUE_MARKER}", fst))
            if redirected:
                self._write_merged(path)
            else:
                self.write_dir(fd, path + "/")
        finally:
            os.close(fd)

    def _write_merged(self, path: str) -> None:
        """Everything visible below the union directory ``path``, from whichever layer has it."""
        assert self.merged is not None
        top = self.merged.lookup(path)
        if top is None:
            return
        for entry in self.merged.walk(top):
            real = self.merged.real_path(entry)
            pfd = os.open(os.path.dirname(real), _DIR_FLAGS)
            try:
                name = os.path.basename(real)
                if entry.is_dir:
                    info = self._info(entry.path, entry.st, pfd, name)
                    info.type = tarfile.DIRTYPE
                    self.tar.addfile(info)
                else:
                    self._write_nondir(pfd, name, entry.path, entry.st)
            finally:
                os.close(pfd)

    def _write_nondir(self, dir_fd: int, name: str, path: str, st: os.stat_result) -> None:
        info = self._info(path, st, dir_fd, name)
        if st.st_nlink > 1:
            first = self.links.setdefault((st.st_dev, st.st_ino), path)
            if first != path:
                info.type = tarfile.LNKTYPE
                info.linkname = first
                self.tar.addfile(info)
                return
        mode = st.st_mode
        if stat.S_ISREG(mode):
            self._write_file(dir_fd, name, info, st)
            return
        if stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(name, dir_fd=dir_fd)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor = os.major(st.st_rdev)
            info.devminor = os.minor(st.st_rdev)
        self.tar.addfile(info)

    def _write_file(self, dir_fd: int, name: str, info: tarfile.TarInfo, st: os.stat_result) -> None:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                raise FailedPrecondition(f"{info.name}: replaced while the layer was being archived")
            info.type = tarfile.REGTYPE
            info.size = fst.st_size
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
                try:
                    self.tar.addfile(info, f)  # copies in chunks: never the whole file in memory
                except OSError as e:
                    if "unexpected end of data" in str(e):
                        raise FailedPrecondition(
                            f"{info.name}: shrank while the layer was being archived"
                        ) from e
                    raise
        finally:
            os.close(fd)

    def _info(self, path: str, st: os.stat_result, dir_fd: int, name: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        info.mode = stat.S_IMODE(st.st_mode)  # keeps setuid/setgid/sticky
        info.uid = st.st_uid
        info.gid = st.st_gid
        info.uname = info.gname = ""  # numeric only: no dependence on this host's passwd
        # whole seconds: what ustar holds, and sub-second times churn without meaning
        info.mtime = st.st_mtime_ns // 1_000_000_000
        xattrs = _xattrs(_fd_path(dir_fd, name))
        # tarfile wants str; surrogateescape carries any bytes through (hdrcharset=BINARY)
        info.pax_headers = {
            "SCHILY.xattr." + key: xattrs[key].decode("utf-8", "surrogateescape") for key in sorted(xattrs)
        }
        return info


# --- 3. two merged trees --------------------------------------------------------------------


def fingerprint(path_or_fd: str | os.PathLike[str] | int) -> str:
    """xxh3-128 hex digest of a regular file's content, streamed.

    A path is opened without following a final symlink. An fd is read with pread from
    offset 0, so its file position is left alone, and it is not closed.
    """
    h = xxhash.xxh3_128()
    if isinstance(path_or_fd, int):
        _hash_fd(path_or_fd, h)
    else:
        fd = os.open(path_or_fd, _FILE_FLAGS)
        try:
            _hash_fd(fd, h)
        finally:
            os.close(fd)
    return h.hexdigest()


def _hash_fd(fd: int, h: xxhash.xxh3_128) -> None:
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)


def tree_diff(a: LayerStack, b: LayerStack) -> list[Change]:
    """A/C/D from the merged tree ``a`` to the merged tree ``b``, sorted by path.

    Only in b: ``A``; only in a: ``D`` (a directory and every entry under it); in both:
    ``C`` when the type, permission bits, owner, symlink target, device number, content
    (size, then xxh3 fingerprint) or non-private xattrs differ. Mtimes are not compared:
    they churn on every rebuild while the content stays. A directory replaced by a file
    (or the reverse) is ``C``, and what was or is under the directory is D or A.
    """
    changes: list[Change] = []
    ita, itb = _keyed(a.walk()), _keyed(b.walk())
    ea, eb = next(ita, None), next(itb, None)
    # walk() yields tree order (siblings by name, a directory before its children), which
    # is the order of the component tuples: merge the two like two sorted lists.
    while ea is not None or eb is not None:
        if eb is None or (ea is not None and ea[0] < eb[0]):
            assert ea is not None
            changes.append(Change(_abs(ea[1].path), DELETED))
            ea = next(ita, None)
        elif ea is None or eb[0] < ea[0]:
            changes.append(Change(_abs(eb[1].path), ADDED))
            eb = next(itb, None)
        else:
            if _entries_differ(a, ea[1], b, eb[1]):
                changes.append(Change(_abs(ea[1].path), CHANGED))
            ea, eb = next(ita, None), next(itb, None)
    return sorted(changes)


def _keyed(entries: Iterator[Entry]) -> Iterator[tuple[tuple[str, ...], Entry]]:
    for e in entries:
        yield tuple(e.path.split("/")), e


def _entries_differ(sa: LayerStack, ea: Entry, sb: LayerStack, eb: Entry) -> bool:
    st_a, st_b = ea.st, eb.st
    if stat.S_IFMT(st_a.st_mode) != stat.S_IFMT(st_b.st_mode):
        return True
    if (stat.S_IMODE(st_a.st_mode), st_a.st_uid, st_a.st_gid) != (
        stat.S_IMODE(st_b.st_mode),
        st_b.st_uid,
        st_b.st_gid,
    ):
        return True
    path_a, path_b = _entry_path(sa, ea), _entry_path(sb, eb)
    same_inode = (st_a.st_dev, st_a.st_ino) == (st_b.st_dev, st_b.st_ino)
    mode = st_a.st_mode
    if stat.S_ISLNK(mode):
        if os.readlink(path_a) != os.readlink(path_b):
            return True
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        if st_a.st_rdev != st_b.st_rdev:
            return True
    elif stat.S_ISREG(mode):
        if st_a.st_size != st_b.st_size:
            return True
        # Two refs usually share their base layers: the same inode needs no reading.
        if not same_inode and fingerprint(path_a) != fingerprint(path_b):
            return True
    return not same_inode and _xattrs(path_a) != _xattrs(path_b)
