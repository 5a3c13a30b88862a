"""The pyfuse3 ``Operations`` of layerfs: a protocol adapter only.

``UnionOperations`` wraps a ``layerfs.union.api.UnionOps`` model and translates, nothing
else: ``RequestContext`` -> ``Ctx``, ``SetattrFields`` -> ``SetAttr``, ``Attr`` ->
``EntryAttributes`` (the FUSE inode number is the model's, ``Attr.inode or Attr.st_ino``,
and pyfuse3 shows that same number as ``st_ino``), and every failure ->
``FUSEError(errno)`` (``OSError.errno``, ``LayerfsError.errno``; anything unexpected is
logged with its traceback and answered ``EIO``, so one bug never takes the daemon down).
Union semantics (lookup through layers, whiteouts, copy-up ...) live in the model.

Not reachable through pyfuse3 3.5: ``UnionOps.fallocate``. pyfuse3 registers no fallocate
handler with libfuse, which answers FALLOCATE with ENOSYS; the kernel then fails every
fallocate(2) on the mount with EOPNOTSUPP. The kernel transport (``dispatch``) serves it.

Kernel caching levers, per reply (the biggest levers a FUSE union has, measured in bench/):

- ``Attr.immutable`` entries (lower layer only: they cannot change while mounted) get long
  entry/attr timeouts (``CachePolicy.immutable``); everything else a short, non-zero one
  (``CachePolicy.mutable``): the kernel never hears about attributes the model changes
  behind a request (link counts after a copy-up, say), so cached attributes of mutable
  entries must expire soon.
- a failed lookup (ENOENT) under an immutable directory is cached as a negative entry
  (``st_ino = 0``); anywhere else it is a plain ENOENT. Every change that adds a name goes
  through the kernel, which replaces its negative dentry itself.
- ``open`` answers ``keep_cache`` for files served from a lower layer (their page cache
  stays valid across opens); ``direct_io`` is never set.

Threads: calls that may copy data (open and create with copy-up, read, write, fsync,
setattr, link, rename, set/removexattr) run in ``trio.to_thread.run_sync`` so one slow
copy-up does not stall other requests; cheap metadata calls run inline on the trio thread.
So the model is called concurrently from the trio thread and worker threads and must be
thread-safe.

Lookup counts: pyfuse3 always answers READDIRPLUS, so every entry the kernel accepts from
``readdir`` counts one lookup, exactly like a ``lookup`` reply. ``UnionOps.readdir`` does
not say it counts, so by default the adapter counts with one ``model.lookup`` per delivered
entry (and hands back the one it could not deliver with ``forget``). A model whose
``readdir`` already counts one lookup per returned entry says so with a true
``readdir_counts_lookups`` attribute; the adapter then skips those lookups and forgets
the returned entries the kernel's buffer had no room for (so such a model should return
modest batches: a 4 KiB reply holds about 20 entries). The adapter answers "." and ".."
itself, as readdir offsets 1 and 2, so model offset N travels as FUSE offset N + 2; a
readdir from offset 0 on a handle already read (rewinddir) lists through a fresh model
handle, so the listing shows the directory as it is now, as POSIX wants.
"""

from __future__ import annotations

import errno
import functools
import logging
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from layerfs.errors import LayerfsError
from layerfs.union.api import Attr, Ctx, DirEntry, SetAttr, UnionOps

log = logging.getLogger(__name__)

T = TypeVar("T")
H = TypeVar("H", bound=Callable[..., Awaitable[Any]])

_DOTS = (b".", b"..")
DOT_ENTRIES = 2  # readdir offsets the adapter's own "." and ".." entries take


@dataclass(frozen=True)
class CachePolicy:
    """Entry/attribute timeouts (seconds) the adapter puts in its replies."""

    immutable: float = 3600.0  # lower-only entries: they never change while mounted
    mutable: float = 1.0  # everything else: short, so changes behind the kernel show soon
    negative: float = 3600.0  # ENOENT under an immutable directory; 0 = never cache


@dataclass(frozen=True)
class AdapterStatistics:
    """Counters since the adapter was made (``UnionOperations.statistics()``)."""

    requests: int
    offloaded: int  # requests run in a worker thread
    errors: int  # requests answered with an errno
    unexpected: int  # of those, exceptions that were neither OSError nor LayerfsError


def errno_of(exc: BaseException) -> int:
    """The errno a FUSE reply carries for ``exc`` (``EIO`` when it has none)."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, LayerfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def to_ctx(ctx: pyfuse3.RequestContext) -> Ctx:
    """The caller of a request, as the model sees it."""
    return Ctx(uid=ctx.uid, gid=ctx.gid, umask=ctx.umask, pid=ctx.pid)


def to_setattr(attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> SetAttr:
    """The changes a SETATTR request asks for.

    pyfuse3 already turned UTIME_NOW into the current time in ``attr``, so ``atime_now``/
    ``mtime_now`` stay False; a ctime-only update has no field (the model sets ctime).
    """
    return SetAttr(
        mode=stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
        uid=attr.st_uid if fields.update_uid else None,
        gid=attr.st_gid if fields.update_gid else None,
        size=attr.st_size if fields.update_size else None,
        atime_ns=attr.st_atime_ns if fields.update_atime else None,
        mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
    )


@dataclass
class _OpenDir:
    """One open directory as the kernel sees it; its model handle is replaced on rewind."""

    inode: int
    model_fh: int
    started: bool = False  # a readdir has been answered (so offset 0 again means rewinddir)


def _guard(handler: H) -> H:
    """Count the request and turn every failure into ``FUSEError(errno)``.

    pyfuse3 replies with an errno only for ``FUSEError``; any other exception escapes its
    loop and takes the whole daemon (and every process using the mount) down with it.
    """

    @functools.wraps(handler)
    async def guarded(self: UnionOperations, *args: Any) -> object:
        self._requests += 1
        try:
            return await handler(self, *args)
        except Exception as e:
            raise self._fail(e, handler) from None
        finally:
            # Attributes the model changed as a side effect of this request (a directory
            # whose link count moved when a deeper change copied it up) must not be served
            # from the kernel's attribute cache.
            drain = getattr(self.model, "drain_invalidations", None)
            for ino in drain() if drain is not None else ():
                try:
                    pyfuse3.invalidate_inode(ino, attr_only=True)  # touches no page locks
                except OSError:
                    pass  # the kernel no longer knows that inode

    return cast(H, guarded)


class UnionOperations(pyfuse3.Operations):
    """pyfuse3 requests -> ``UnionOps`` calls. See the module docstring for the rules.

    Lifecycle: make it, ``pyfuse3.init(ops, mountpoint, options)``, run ``pyfuse3.main``;
    after main returned, ``destroy()`` lets the model release what it holds.
    """

    def __init__(self, model: UnionOps, cache: CachePolicy | None = None,
                 readdir_counts_lookups: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.cache = cache or CachePolicy()
        if readdir_counts_lookups is None:
            readdir_counts_lookups = bool(getattr(model, "readdir_counts_lookups", False))
        self.readdir_counts_lookups = readdir_counts_lookups
        self._dirs: dict[int, _OpenDir] = {}  # the adapter's directory handles
        self._next_dir = 0
        # directory inode -> the parent it was last looked up in: only for ".." in
        # readdir, whose inode number nothing relies on (stale after a rename)
        self._parents: dict[int, int] = {}
        self._requests = 0
        self._offloaded = 0
        self._errors = 0
        self._unexpected = 0

    # --- plumbing ---------------------------------------------------------------------

    def statistics(self) -> AdapterStatistics:
        return AdapterStatistics(self._requests, self._offloaded, self._errors, self._unexpected)

    def _fail(self, exc: Exception, where: object) -> pyfuse3.FUSEError:
        self._errors += 1
        if isinstance(exc, pyfuse3.FUSEError):
            return exc
        if not isinstance(exc, (OSError, LayerfsError)):
            self._unexpected += 1
            log.error("%s failed unexpectedly; answering EIO", getattr(where, "__name__", where), exc_info=exc)
        return pyfuse3.FUSEError(errno_of(exc))

    async def _offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a model call that may block on disk work in a worker thread.

        Not abandoned on cancellation: a copy-up always finishes or fails by itself.
        """
        self._offloaded += 1
        return await trio.to_thread.run_sync(fn, *args)

    def entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        """``Attr`` -> ``EntryAttributes`` with the timeouts its mutability allows."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.inode or attr.st_ino  # pyfuse3: the node id is the st_ino shown
        e.st_mode = attr.st_mode
        e.st_nlink = attr.st_nlink
        e.st_uid = attr.st_uid
        e.st_gid = attr.st_gid
        e.st_rdev = attr.st_rdev
        e.st_size = attr.st_size
        e.st_blocks = attr.st_blocks
        e.st_blksize = attr.st_blksize
        e.st_atime_ns = attr.st_atime_ns
        e.st_mtime_ns = attr.st_mtime_ns
        e.st_ctime_ns = attr.st_ctime_ns
        timeout = self.cache.immutable if attr.immutable else self.cache.mutable
        e.entry_timeout = timeout
        e.attr_timeout = timeout
        return e

    def _is_immutable(self, inode: int) -> bool:
        try:
            return self.model.getattr(inode).immutable
        except Exception:  # only a caching hint: when in doubt, do not cache
            return False

    def destroy(self) -> None:
        """Let the model release its resources (after ``pyfuse3.main`` returned)."""
        self.model.destroy()

    # --- lookups and attributes -------------------------------------------------------

    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            attr = self.model.lookup(parent_inode, name)
        except Exception as e:
            if errno_of(e) == errno.ENOENT and self.cache.negative > 0 and self._is_immutable(parent_inode):
                negative = pyfuse3.EntryAttributes()
                negative.st_ino = 0  # "no such entry", cached for entry_timeout
                negative.entry_timeout = self.cache.negative
                return negative
            raise
        if stat.S_ISDIR(attr.st_mode):
            self._parents[attr.inode or attr.st_ino] = parent_inode
        return self.entry(attr)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            try:
                self.model.forget(inode, nlookup)
            except Exception:  # FORGET has no reply: log and go on
                log.exception("forget(%d, %d) failed", inode, nlookup)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.entry(self.model.getattr(inode))

    @_guard
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # offloaded: chmod or truncate of a lower file copies it up
        new = await self._offload(self.model.setattr, inode, to_setattr(attr, fields), fh, to_ctx(ctx))
        return self.entry(new)

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.model.readlink(inode)

    # --- directories ------------------------------------------------------------------

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        model_fh = self.model.opendir(inode)
        self._next_dir += 1
        self._dirs[self._next_dir] = _OpenDir(inode, model_fh)
        return self._next_dir

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._dirs.get(fh)
        if d is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if start_id == 0 and d.started:
            # rewinddir(): "refers to the current state of the directory, as a call to
            # opendir() would have done" -- so a fresh model handle, not the old listing
            fresh = self.model.opendir(d.inode)
            self.model.releasedir(d.model_fh)
            d.model_fh = fresh
        d.started = True
        # offsets 1 and 2 are the adapter's "." and ".."; model offset N is FUSE offset N + 2
        if start_id < DOT_ENTRIES:
            if start_id == 0 and not pyfuse3.readdir_reply(token, b".", self._dot(d.inode), 1):
                return
            if not pyfuse3.readdir_reply(token, b"..", self._dot(self._parents.get(d.inode, d.inode)), 2):
                return
        entries = self.model.readdir(d.model_fh, max(start_id - DOT_ENTRIES, 0))
        if self.readdir_counts_lookups:
            self._reply_counted(entries, token)
        else:
            self._reply_looked_up(d.inode, entries, token)

    @staticmethod
    def _dot(inode: int) -> pyfuse3.EntryAttributes:
        """A "." or ".." entry: the kernel takes only its inode number and type from it."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.st_mode = stat.S_IFDIR
        return e

    def _reply_counted(self, entries: list[DirEntry], token: pyfuse3.ReaddirToken) -> None:
        """The model counted a lookup per entry: forget those the kernel had no room for."""
        for i, ent in enumerate(entries):
            if ent.name in _DOTS:
                continue
            if not pyfuse3.readdir_reply(token, ent.name, self.entry(ent.attr), ent.next_offset + DOT_ENTRIES):
                for rest in entries[i:]:
                    if rest.name not in _DOTS:
                        self.model.forget(rest.attr.inode or rest.attr.st_ino, 1)
                return

    def _reply_looked_up(self, parent: int, entries: list[DirEntry], token: pyfuse3.ReaddirToken) -> None:
        """Count each delivered entry with a model lookup (fresh attributes, too)."""
        for ent in entries:
            if ent.name in _DOTS:
                continue
            try:
                attr = self.model.lookup(parent, ent.name)
            except Exception as e:  # gone since the listing was made: skip it, like a removed entry
                if not isinstance(e, (OSError, LayerfsError)):
                    self._fail(e, self.model.lookup)
                continue
            if not pyfuse3.readdir_reply(token, ent.name, self.entry(attr), ent.next_offset + DOT_ENTRIES):
                self.model.forget(attr.inode or attr.st_ino, 1)
                return

    @_guard
    async def releasedir(self, fh: int) -> None:
        d = self._dirs.pop(fh, None)
        if d is not None:
            self.model.releasedir(d.model_fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        # UnionOps has no directory fsync; directory changes reach the upper through
        # the host filesystem's own journal. Answered so the kernel does not see ENOSYS.
        return None

    @_guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        attr = self.model.mkdir(parent_inode, name, mode, to_ctx(ctx))
        self._parents[attr.inode or attr.st_ino] = parent_inode
        return self.entry(attr)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.model.rmdir(parent_inode, name)

    # --- files ------------------------------------------------------------------------

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh = await self._offload(self.model.open, inode, flags)  # may copy up
        # a file still served from a lower layer cannot change: keep its page cache
        return pyfuse3.FileInfo(fh=fh, keep_cache=self._is_immutable(inode))

    @_guard
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attr = await self._offload(self.model.create, parent_inode, name, mode, flags, to_ctx(ctx))
        return pyfuse3.FileInfo(fh=fh), self.entry(attr)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._offload(self.model.read, fh, off, size)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._offload(self.model.write, fh, off, buf)

    @_guard
    async def flush(self, fh: int) -> None:
        self.model.flush(fh)

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._offload(self.model.fsync, fh, datasync)

    @_guard
    async def release(self, fh: int) -> None:
        self.model.release(fh)

    # --- namespace changes ------------------------------------------------------------

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.model.unlink(parent_inode, name)

    @_guard
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        # offloaded: renaming a lower file copies it up
        await self._offload(self.model.rename, parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_guard
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.entry(await self._offload(self.model.link, inode, new_parent_inode, new_name))

    @_guard
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.entry(self.model.symlink(parent_inode, name, target, to_ctx(ctx)))

    @_guard
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.entry(self.model.mknod(parent_inode, name, mode, rdev, to_ctx(ctx)))

    # --- extended attributes ----------------------------------------------------------

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.model.getxattr(inode, name)

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return self.model.listxattr(inode)

    @_guard
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        # pyfuse3 3.5 does not pass XATTR_CREATE/XATTR_REPLACE on: flags are always 0
        await self._offload(self.model.setxattr, inode, name, value, 0)

    @_guard
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._offload(self.model.removexattr, inode, name)

    # --- filesystem -------------------------------------------------------------------

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = self.model.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.f_bsize
        out.f_frsize = s.f_frsize
        out.f_blocks = s.f_blocks
        out.f_bfree = s.f_bfree
        out.f_bavail = s.f_bavail
        out.f_files = s.f_files
        out.f_ffree = s.f_ffree
        out.f_favail = s.f_favail
        out.f_namemax = s.f_namemax
        return out
