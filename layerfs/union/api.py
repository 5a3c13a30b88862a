"""The contract between the union filesystem model and the FUSE adapter.

``layerfs.union.fs.UnionFS`` implements ``UnionOps``; ``layerfs.fuse.ops`` translates pyfuse3
requests into these calls and nothing else (inode numbers and ``Attr`` in, ``FUSEError``
out). Everything here is plain Python: no pyfuse3, so the model is testable without a
mount and the same conformance cases run against it, a FUSE mount and kernel overlayfs.

Conventions:
- Inode numbers are ints; ``ROOT_INODE`` (1) is the root. An inode number handed out by
  ``lookup``/``create``/``mkdir``/... stays valid until ``forget`` drops its lookup count to 0.
- Names are ``bytes`` (no ``/``, not ``.``/``..``); paths are never passed across this API.
- Errors are raised as ``OSError(errno, message)``; the adapter turns them into
  ``FUSEError(errno)``. Permission checks are the kernel's (``default_permissions``); the
  model only enforces what the kernel cannot know (e.g. EXDEV never happens: renames work).
- ``Ctx`` carries the caller's uid/gid/umask for new entries (owner of created files).
- Lookup counts: ``lookup``, ``create``, ``mkdir``, ``mknod``, ``symlink`` and ``link`` each
  count one lookup of the inode they return. ``readdir`` counts none: the adapter counts
  every entry the kernel accepts with one ``lookup`` (pyfuse3 always answers READDIRPLUS).
  A model whose ``readdir`` counts one lookup per returned entry itself sets a class
  attribute ``readdir_counts_lookups = True``; the adapter then skips those lookups and
  ``forget``s (1 each) the returned entries it could not deliver, so return small batches.
- Threads: the adapter calls the model from the trio thread (metadata) and from worker
  threads (open, create, read, write, fsync, setattr, link, rename, set/removexattr) at the
  same time; every method must be thread-safe.
- ``st_ino`` in ``Attr`` is the stable inode number the user sees, unchanged by copy-up and
  across remounts of the same layers. It is also the inode number the methods take, unless
  ``Attr.inode`` says otherwise (a model that shows one ``st_ino`` for several inodes, as
  the kernel does for lower hardlinks, sets ``inode`` to tell them apart; the FUSE node id
  is ``inode or st_ino``, the ``st_ino`` the kernel reports is ``st_ino``).
- Optional extras an adapter uses when a model has them (not part of ``UnionOps``):
  ``readdir_counts_lookups`` (above); ``drain_invalidations() -> list[int]``, inodes whose
  attributes changed as a side effect; ``backing_fd(fh) -> int | None`` (``BackingFiles``),
  the real file the kernel may read and write directly (FUSE passthrough).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

ROOT_INODE = 1


@dataclass(frozen=True)
class Ctx:
    uid: int = 0
    gid: int = 0
    umask: int = 0o022
    pid: int = 0


@dataclass
class Attr:
    st_ino: int
    st_mode: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_rdev: int
    st_size: int
    st_blocks: int
    st_blksize: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int
    # True when the entry lives in a lower layer only: it cannot change while mounted,
    # so the adapter may let the kernel cache it (long timeouts, keep_cache).
    immutable: bool = False
    # the inode number the methods take, when it is not st_ino (0: st_ino is it)
    inode: int = 0


@dataclass(frozen=True)
class DirEntry:
    name: bytes
    attr: Attr
    next_offset: int  # the offset to resume after this entry


@dataclass(frozen=True)
class SetAttr:
    """Fields to change; None = leave alone."""

    mode: int | None = None  # permission bits (and setuid/setgid/sticky) only
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    # set to the current time (utimensat UTIME_NOW)
    atime_now: bool = False
    mtime_now: bool = False


@dataclass(frozen=True)
class StatFS:
    f_bsize: int
    f_frsize: int
    f_blocks: int
    f_bfree: int
    f_bavail: int
    f_files: int
    f_ffree: int
    f_favail: int
    f_namemax: int


class UnionOps(Protocol):
    # lookups and attributes
    def lookup(self, parent: int, name: bytes) -> Attr: ...
    def forget(self, inode: int, nlookup: int) -> None: ...
    def getattr(self, inode: int) -> Attr: ...
    def setattr(self, inode: int, changes: SetAttr, fh: int | None, ctx: Ctx) -> Attr: ...
    def readlink(self, inode: int) -> bytes: ...
    # directories
    def opendir(self, inode: int) -> int: ...
    def readdir(self, fh: int, offset: int) -> list[DirEntry]: ...  # entries after ``offset``; [] at the end
    def releasedir(self, fh: int) -> None: ...
    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Attr: ...
    def rmdir(self, parent: int, name: bytes) -> None: ...
    # files
    def open(self, inode: int, flags: int) -> int: ...  # flags: os.O_* (O_TRUNC, O_APPEND, access mode)
    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Ctx) -> tuple[int, Attr]: ...
    def read(self, fh: int, offset: int, size: int) -> bytes: ...
    def write(self, fh: int, offset: int, data: bytes) -> int: ...
    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None: ...  # fallocate(2) mode
    def flush(self, fh: int) -> None: ...
    def fsync(self, fh: int, datasync: bool) -> None: ...
    def release(self, fh: int) -> None: ...
    # namespace changes
    def unlink(self, parent: int, name: bytes) -> None: ...
    def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int) -> None: ...
    def link(self, inode: int, new_parent: int, new_name: bytes) -> Attr: ...
    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx) -> Attr: ...
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Attr: ...
    # extended attributes (overlay-private names are hidden and refused)
    def getxattr(self, inode: int, name: bytes) -> bytes: ...
    def setxattr(self, inode: int, name: bytes, value: bytes, flags: int) -> None: ...
    def listxattr(self, inode: int) -> list[bytes]: ...
    def removexattr(self, inode: int, name: bytes) -> None: ...
    # filesystem
    def statfs(self) -> StatFS: ...
    def destroy(self) -> None: ...


class BackingFiles(Protocol):
    """Optional: the real file behind an open handle, for FUSE passthrough."""

    def backing_fd(self, fh: int) -> int | None:
        """An fd of the real file behind the open file ``fh`` if reads and writes of ``fh``
        may go to that file directly for the whole life of the handle, else None. The fd
        stays the model's (valid until ``release(fh)``); the adapter only registers it."""
        ...
