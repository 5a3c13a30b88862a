"""FUSE requests -> ``UnionOps`` calls, for the kernel transport (``layerfs.fuse.session``).

``Dispatcher`` gets one decoded ``Request`` at a time and answers with the reply body
(``bytes``), a ``Reply`` (a body plus what to undo when the kernel never receives it), or
``None`` (FORGET: no reply); failures are raised and answered with their errno by the
session. Union semantics are the model's; this module owns what the protocol adds:

- node ids: the model's inode number (``Attr.inode or Attr.st_ino``) is the FUSE node id;
  ``fuse_attr.ino``, what ``stat`` shows, is ``Attr.st_ino`` (they may differ).
- lookup counts, as ``layerfs.fuse.ops``: LOOKUP/CREATE/MKDIR/MKNOD/SYMLINK/LINK replies and
  every READDIRPLUS entry the kernel gets count one lookup (``.`` and ``..`` go out with
  node id 0 and count none). A model whose ``readdir`` counts none gets one
  ``model.lookup`` per READDIRPLUS entry sent (fresh attributes, too); one that says
  ``readdir_counts_lookups`` (``UnionFS``: a model with ``readdir_can_count_lookups`` is
  switched to counting) gets a ``forget`` for every entry it listed that the kernel
  did not take (plain READDIR entries, entries dropped at release). A reply the kernel did
  not take (the request was interrupted) gives its lookups back.
- directories are opened without a request (``CachePolicy.zero_message_opendir``, the
  default): OPENDIR is answered ENOSYS once, and the kernel then opens every directory
  itself, with ``FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE``, and sends no RELEASEDIR; a listing
  it has cached costs no request at all. READDIRs then come without a handle, so each
  listing (a model handle) is a *stream* named in the offsets it hands out: offset =
  (stream << 32) | position. READDIR at offset 0 (opendir, rewinddir, the kernel refilling
  its cache) starts a new stream of the directory as it is now. Streams are kept until the
  kernel forgets the directory (FORGET), ``STREAMS_PER_DIR`` at most per directory: the
  kernel hands out the offsets of the stream that filled its cache to every later reader,
  and one that is half-way through when the directory changes (the cache is dropped)
  continues from us at such an offset -- in the listing it belongs to, so no entry is seen
  twice or skipped (a ``rm`` that lists and deletes as it goes). An offset of a stream
  that is gone continues a new listing at the same position. The price: the model keeps a
  listing (a handle, which pins its nodes) per directory the kernel has cached. With
  ``zero_message_opendir`` off, OPENDIR takes the model's listing and gets a handle of the
  adapter's own; READDIR from offset 0 on a handle already read lists afresh. Either way,
  positions 1 and 2 are "." and "..", model offset N is position N + 2, and entries a reply
  had no room for are kept for the next READDIR of that listing.
- kernel caching levers (``CachePolicy``): attribute timeouts long for ``Attr.immutable``
  entries, short otherwise (as ``ops``: the model changes some attributes behind the
  kernel). Names are another matter: a name appears, disappears or moves only through a
  request of this mount (the layers do not change under a mount, and the upper is this
  daemon's alone), and the kernel updates its dentries for those itself. So every positive
  entry is cached for ``entry`` seconds and every ENOENT becomes a negative entry (node id
  0) for ``negative`` seconds; directories are opened ``FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE``:
  the kernel keeps listings and reuses them while the directory is unchanged (it drops the
  cache itself on every change it makes). OPEN answers ``FOPEN_KEEP_CACHE`` for immutable
  (lower-only) files, and ``FOPEN_NOFLUSH`` for read-only opens and, when the model
  says its ``flush`` has nothing to do (``flush_needed`` False: ``UnionFS``), for every open
  (no FLUSH on close: the kernel keeps POSIX locks itself, and nothing is buffered).
- invalidations the kernel cannot know of are sent as notifications: the model's
  ``drain_invalidations()`` (attributes changed by a copy-up) at once, before the reply
  (attribute-only invalidations take no locks); the readdir cache of a directory that
  moved (its "..") through ``notify`` (the session writes those from another thread: a
  page invalidation may wait for locks the request being served holds).
- passthrough (``FOPEN_PASSTHROUGH``): when negotiated, a file whose model handle names a
  backing file (``backing_fd``, see ``layerfs.union.api.BackingFiles``) is registered with
  ``FUSE_DEV_IOC_BACKING_OPEN`` and opened in passthrough mode: the kernel then reads,
  writes and mmaps the real file without asking us. The kernel wants every open of an inode
  in one mode (and one backing file): an inode with cached opens gets no passthrough until
  they are released, and one in passthrough mode reuses its backing id; the id is closed
  after the inode's last passthrough release. A failing ioctl falls back to a cached open
  (EPERM, not allowed at all: no more tries). Which files the model names is its call;
  ``UnionFS`` names upper files and every file of a union without an upper, not lower
  files of a writable union (a reader of one must see its copy-up, which a kernel reading
  the lower file directly would not).

Threads: calls that may copy data (open, read, write, fsync, setattr, link, rename,
set/removexattr) run in worker threads, as in ``ops``; everything else, and all
state of this class, stays on the trio thread. With ``data_threads`` (the session's
default), READ and WRITE skip trio altogether: ``queue_data`` hands them to data threads
that serve and answer them themselves (one writev, or for READ a splice of the file's
pages through a pipe of the thread's own, ``_Reader``), and the loop sends nothing.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import stat
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from layerfs.errors import LayerfsError
from layerfs.fuse import protocol as p
from layerfs.linux import fusedev
from layerfs.union.api import Attr, Ctx, DirEntry, SetAttr, UnionOps

log = logging.getLogger(__name__)

T = TypeVar("T")
_DOTS = (b".", b"..")
DOT_ENTRIES = 2


@dataclass(frozen=True)
class CachePolicy:
    """Timeouts (seconds) and cache flags the kernel transport puts in its replies."""

    immutable: float = 3600.0  # attributes of lower-only entries: they never change while mounted
    mutable: float = 1.0  # attributes of everything else
    entry: float = 3600.0  # names (name -> node): they change only through requests the kernel sees
    negative: float = 3600.0  # names that do not exist (the same reason); 0: never cache
    cache_dirs: bool = True  # FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE on every opendir
    # answer OPENDIR with ENOSYS: the kernel then opens directories without asking (and
    # caches every listing, as with cache_dirs); listings are found by their offsets
    zero_message_opendir: bool = True


@dataclass(slots=True)
class Request:
    """One request as read from the device (``arg``: its argument bytes, no header)."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    arg: bytes


@dataclass(slots=True)
class Reply:
    """A reply body and what undoes its effect if the kernel never receives it."""

    body: bytes
    undo: Callable[[], None] | None = None


Answer = bytes | Reply | None


def errno_of(exc: BaseException) -> int:
    """The errno a reply carries for ``exc`` (``EIO`` when it has none)."""
    if isinstance(exc, LayerfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


@dataclass
class _OpenDir:
    inode: int
    model_fh: int | None = None  # opened at the first READDIR
    started: bool = False  # a READDIR was answered (offset 0 again: list afresh)
    pending: list[DirEntry] = field(default_factory=list)  # listed, not yet sent
    pending_at: int = -1  # the model offset ``pending`` starts at


@dataclass
class _IoMode:
    """How the kernel has an inode open: cached opens, or passthrough ones on one backing id."""

    cached: int = 0
    passthrough: int = 0
    backing_id: int = 0


CACHED, PASSTHROUGH = 0, 1
# zero-message opendir: a directory offset is (stream << STREAM_SHIFT) | position
STREAM_SHIFT = 32
POSITION_MASK = (1 << STREAM_SHIFT) - 1
STREAMS_PER_DIR = 8  # listings kept per directory (the kernel may hand out offsets of any)
RENAME_EXCHANGE = 2  # renameat2(2)
# the reusable read buffer of each data thread: the largest READ the kernel sends (max_pages)
DATA_BUFFER = 1 << 20
PAGE = os.sysconf("SC_PAGESIZE")
SPLICE_F_NONBLOCK = 2

# requests after which the model may have changed attributes behind the kernel
_CHANGING = frozenset({p.Op.SETATTR, p.Op.SYMLINK, p.Op.MKNOD, p.Op.MKDIR, p.Op.UNLINK, p.Op.RMDIR,
                       p.Op.RENAME, p.Op.RENAME2, p.Op.LINK, p.Op.OPEN, p.Op.CREATE, p.Op.SETXATTR,
                       p.Op.REMOVEXATTR, p.Op.FALLOCATE})

Handler = Callable[[Request], Answer]
AsyncHandler = Callable[[Request], Awaitable[Answer]]


class _Reader:
    """How a data thread answers READ: with ``splice`` (the file's pages go through a pipe
    of the thread's own to the device: the daemon never copies them), else ``preadv`` into
    the thread's reusable buffer and one ``writev`` of header and data."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.buf = bytearray(DATA_BUFFER)
        self.view = memoryview(self.buf)
        self.read_fd: Callable[[int], int] | None = getattr(d.model, "read_fd", None)
        self.pipe: tuple[int, int] | None = None
        self.splice = d.splice and self.read_fd is not None
        self.slots = 0  # pipe capacity in pages (buffers): one for the header, one per data page

    def _open_pipe(self) -> tuple[int, int] | None:
        r, w = os.pipe2(os.O_CLOEXEC)
        size = 0
        # a header page, then up to DATA_BUFFER bytes (one page more when not page aligned);
        # more than /proc/sys/fs/pipe-max-size (1 MiB by default) needs CAP_SYS_RESOURCE
        for want in (DATA_BUFFER + 2 * PAGE, DATA_BUFFER):
            try:
                size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, want)
                break
            except OSError:
                continue
        self.slots = size // PAGE
        if self.slots < 2:
            os.close(r)
            os.close(w)
            self.splice = False
            return None
        return r, w

    def close(self) -> None:
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None

    def read(self, req: Request) -> None:
        fh, offset, size = p.READ_IN.unpack_from(req.arg)[:3]
        d = self.d
        if self.read_fd is None or size > DATA_BUFFER:
            data = d.model.read(fh, offset, size)
            d._reply_parts(req, [p.reply_header(req.unique, 0, len(data)), data])
            return
        fd = self.read_fd(fh)
        if self.splice and self._splice(req, fd, offset, size):
            return
        n = os.preadv(fd, [self.view[:size]], offset)
        d._reply_parts(req, [p.reply_header(req.unique, 0, n), self.view[:n]])

    def _splice(self, req: Request, fd: int, offset: int, size: int) -> bool:
        """Answer with splice; False: not done, nothing sent (read it the other way)."""
        if self.pipe is None:
            self.pipe = self._open_pipe()
            if self.pipe is None:
                return False
        want = min(size, max(0, os.fstat(fd).st_size - offset))
        if want == 0 or 2 + (offset + want - 1) // PAGE - offset // PAGE > self.slots:
            return False  # nothing to move, or more pages than the pipe holds
        r, w = self.pipe
        try:
            os.write(w, p.reply_header(req.unique, 0, want))
            got = 0
            while got < want:
                n = os.splice(fd, w, want - got, offset_src=offset + got, flags=SPLICE_F_NONBLOCK)
                if n == 0:
                    break  # shorter than fstat said (truncated meanwhile)
                got += n
        except OSError as e:
            log.debug("splice from the file failed (%s): reading it instead", e)
            got = -1
        if got != want:
            self.close()  # the pipe holds a partial message: a fresh one next time
            return False
        try:
            os.splice(r, self.d.dev_fd, p.OUT_HEADER.size + want)
        except OSError as e:
            self.close()  # whatever the device did not take is garbage now
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("splicing the reply to READ failed: %s", e)
        self.d.stats["spliced_reads"] += 1
        return True


class Dispatcher:
    """Answers decoded requests from a ``UnionOps`` model (see the module docstring)."""

    def __init__(self, model: UnionOps, cache: CachePolicy | None = None, *,
                 notify: Callable[[bytes], None] | None = None,
                 limiter: trio.CapacityLimiter | None = None, data_threads: int = 0,
                 splice: bool = False) -> None:
        self.model = model
        self.data_threads = data_threads
        self.splice = splice
        self._data: queue.SimpleQueue[Request | None] | None = None
        self._data_pool: list[threading.Thread] = []
        self.cache = cache or CachePolicy()
        self.notify = notify or (lambda msg: None)
        self.limiter = limiter
        if getattr(model, "readdir_can_count_lookups", False):
            # pending entries are kept (not listed again): let the model count, sparing a
            # ``lookup`` per READDIRPLUS entry
            counting: Any = model
            counting.readdir_counts_lookups = True
        self.counts_lookups = bool(getattr(model, "readdir_counts_lookups", False))
        # a model that buffers nothing gets no FLUSH at close (FOPEN_NOFLUSH on every open)
        self.flush_needed = bool(getattr(model, "flush_needed", True))
        self._drain: Callable[[], list[int]] | None = getattr(model, "drain_invalidations", None)
        self._backing_fd: Callable[[int], int | None] | None = getattr(model, "backing_fd", None)
        # told (node id, immutable) of every entry sent (the session's reply cache)
        self.on_entry: Callable[[int, bool], None] | None = None
        # negotiated at INIT (``configure``)
        self.dev_fd = -1
        self.passthrough = False
        self.writeback = False
        self.setxattr_ext = False
        self._dirs: dict[int, _OpenDir] = {}
        self._next_dir = 0
        self._streams: dict[int, _OpenDir] = {}  # zero-message opendir: stream id -> listing
        self._dir_streams: dict[int, list[int]] = {}  # directory -> its streams, oldest first
        self._next_stream = 0
        self._files: dict[int, tuple[int, int]] = {}  # model fh -> (node id, CACHED/PASSTHROUGH)
        self._io: dict[int, _IoMode] = {}
        self.stats: dict[str, int] = {"passthrough_opens": 0, "cached_opens": 0, "backing_opens": 0,
                                      "backing_failures": 0, "notifications": 0, "offloaded": 0,
                                      "unexpected_errors": 0, "listings": 0, "data_requests": 0,
                                      "spliced_reads": 0}
        self.inline: dict[int, Handler] = {
            p.Op.LOOKUP: self.lookup, p.Op.FORGET: self.forget, p.Op.BATCH_FORGET: self.batch_forget,
            p.Op.GETATTR: self.getattr, p.Op.READLINK: self.readlink, p.Op.SYMLINK: self.symlink,
            p.Op.MKNOD: self.mknod, p.Op.MKDIR: self.mkdir, p.Op.UNLINK: self.unlink, p.Op.RMDIR: self.rmdir,
            p.Op.STATFS: self.statfs, p.Op.RELEASE: self.release, p.Op.FLUSH: self.flush,
            p.Op.GETXATTR: self.getxattr, p.Op.LISTXATTR: self.listxattr, p.Op.OPENDIR: self.opendir,
            p.Op.READDIR: self.readdir, p.Op.READDIRPLUS: self.readdirplus, p.Op.RELEASEDIR: self.releasedir,
            p.Op.FSYNCDIR: self.fsyncdir, p.Op.ACCESS: self.access, p.Op.CREATE: self.create,
        }
        self.offloaded: dict[int, AsyncHandler] = {
            p.Op.SETATTR: self.setattr, p.Op.OPEN: self.open, p.Op.READ: self.read,
            p.Op.WRITE: self.write, p.Op.FSYNC: self.fsync, p.Op.FALLOCATE: self.fallocate,
            p.Op.LINK: self.link, p.Op.RENAME: self.rename,
            p.Op.RENAME2: self.rename2, p.Op.SETXATTR: self.setxattr, p.Op.REMOVEXATTR: self.removexattr,
        }

    def configure(self, dev_fd: int, *, passthrough: bool, setxattr_ext: bool, writeback: bool = False) -> None:
        """What INIT negotiated."""
        self.dev_fd = dev_fd
        self.writeback = writeback
        self.passthrough = passthrough and self._backing_fd is not None
        self.setxattr_ext = setxattr_ext
        if self.data_threads > 0 and self._data is None:
            self._data = queue.SimpleQueue()
            for i in range(self.data_threads):
                t = threading.Thread(target=self._data_worker, name=f"fuse-data-{i}", daemon=True)
                t.start()
                self._data_pool.append(t)
            for op in (p.Op.READ, p.Op.WRITE):
                self.offloaded.pop(op, None)
                self.inline[op] = self.queue_data

    # --- plumbing -----------------------------------------------------------------------

    async def _offload(self, fn: Callable[..., T], *args: Any) -> T:
        """A model call that may block on disk work, in a worker thread (never abandoned:
        a copy-up finishes or fails by itself; a request still waiting for a thread is
        cancelled by its INTERRUPT)."""
        self.stats["offloaded"] += 1
        if self.limiter is None:
            return await trio.to_thread.run_sync(fn, *args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def after(self, opcode: int) -> None:
        """Before the reply to a request that may have changed attributes behind the kernel:
        invalidate them, at once (the caller must not see stale attributes after the reply;
        attribute-only invalidations take no lock the request could hold). Notifications
        that may wait for locks go through ``notify`` (another thread) instead."""
        if self._drain is not None and opcode in _CHANGING:
            for ino in self._drain():
                self.stats["notifications"] += 1
                try:
                    os.write(self.dev_fd, p.inval_inode(ino))
                except OSError as e:  # ENOENT: the kernel does not know that inode (any more)
                    if e.errno not in (errno.ENOENT, errno.ENODEV):
                        log.warning("invalidating inode %d: %s", ino, e)

    def _notify(self, msg: bytes) -> None:
        self.stats["notifications"] += 1
        self.notify(msg)

    @staticmethod
    def node_of(attr: Attr) -> int:
        return attr.inode or attr.st_ino

    def attr_fields(self, attr: Attr) -> tuple[int, ...]:
        return p.attr_fields(attr.st_ino, attr.st_size, attr.st_blocks, attr.st_atime_ns, attr.st_mtime_ns,
                             attr.st_ctime_ns, attr.st_mode, attr.st_nlink, attr.st_uid, attr.st_gid,
                             attr.st_rdev, attr.st_blksize)

    def timeout(self, attr: Attr) -> float:
        return self.cache.immutable if attr.immutable else self.cache.mutable

    def entry(self, attr: Attr) -> bytes:
        t = self.timeout(attr)
        node = self.node_of(attr)
        if self.on_entry is not None:
            self.on_entry(node, attr.immutable)
        return p.entry_out(node, max(t, self.cache.entry), t, self.attr_fields(attr))

    def _entry_reply(self, attr: Attr) -> Reply:
        node = self.node_of(attr)
        return Reply(self.entry(attr), lambda: self.model.forget(node, 1))

    @staticmethod
    def ctx(req: Request, umask: int = 0) -> Ctx:
        return Ctx(uid=req.uid, gid=req.gid, umask=umask, pid=req.pid)

    @staticmethod
    def _name(arg: bytes, start: int = 0) -> bytes:
        return p.cstring(arg, start)[0]

    def _is_immutable(self, inode: int) -> bool:
        try:
            return self.model.getattr(inode).immutable
        except Exception:  # only a caching hint: when in doubt, do not cache
            return False

    def immutable(self, inode: int) -> bool:
        """Whether what the model says about ``inode`` (attributes, xattrs) changes only
        through a request that changes something (``Attr.immutable``; False when unknown):
        the session's reply cache keeps answers about such nodes."""
        return self._is_immutable(inode)

    # --- lookups and attributes ---------------------------------------------------------

    def lookup(self, req: Request) -> Answer:
        name = self._name(req.arg)
        try:
            attr = self.model.lookup(req.nodeid, name)
        except (OSError, LayerfsError) as e:
            if errno_of(e) != errno.ENOENT or self.cache.negative <= 0:
                raise
            return p.negative_entry(self.cache.negative)
        return self._entry_reply(attr)

    def forget(self, req: Request) -> Answer:
        (nlookup,) = p.FORGET_IN.unpack_from(req.arg)
        self._forget(req.nodeid, nlookup)
        return None

    def batch_forget(self, req: Request) -> Answer:
        count, _ = p.BATCH_FORGET_IN.unpack_from(req.arg)
        for i in range(count):
            nodeid, nlookup = p.FORGET_ONE.unpack_from(req.arg, p.BATCH_FORGET_IN.size + i * p.FORGET_ONE.size)
            self._forget(nodeid, nlookup)
        return None

    def _forget(self, nodeid: int, nlookup: int) -> None:
        try:
            if nodeid in self._dir_streams:
                self._forget_streams(nodeid)
            self.model.forget(nodeid, nlookup)
        except Exception:  # FORGET has no reply: log and go on
            log.exception("forget(%d, %d) failed", nodeid, nlookup)

    def getattr(self, req: Request) -> Answer:
        attr = self.model.getattr(req.nodeid)
        return p.attr_out(self.timeout(attr), self.attr_fields(attr))

    async def setattr(self, req: Request) -> Answer:
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid,
         _) = p.SETATTR_IN.unpack_from(req.arg)
        atime_now = bool(valid & p.FATTR_ATIME_NOW)
        mtime_now = bool(valid & p.FATTR_MTIME_NOW)
        changes = SetAttr(
            mode=stat.S_IMODE(mode) if valid & p.FATTR_MODE else None,
            uid=uid if valid & p.FATTR_UID else None,
            gid=gid if valid & p.FATTR_GID else None,
            size=size if valid & p.FATTR_SIZE else None,
            atime_ns=atime * 1_000_000_000 + atimensec if valid & p.FATTR_ATIME and not atime_now else None,
            mtime_ns=mtime * 1_000_000_000 + mtimensec if valid & p.FATTR_MTIME and not mtime_now else None,
            atime_now=atime_now, mtime_now=mtime_now,
        )
        # offloaded: chmod or truncate of a lower file copies it up
        attr = await self._offload(self.model.setattr, req.nodeid, changes,
                                   fh if valid & p.FATTR_FH else None, self.ctx(req))
        return p.attr_out(self.timeout(attr), self.attr_fields(attr))

    def readlink(self, req: Request) -> Answer:
        return self.model.readlink(req.nodeid)

    def access(self, req: Request) -> Answer:
        return b""  # default_permissions: the kernel checks (and never asks); allowed

    # --- directories --------------------------------------------------------------------

    def opendir(self, req: Request) -> Answer:
        if self.cache.zero_message_opendir:
            # the kernel takes ENOSYS as "opendir needs no request" and never sends one again
            raise OSError(errno.ENOSYS, "directories are opened without a request")
        # the listing is taken now: offsets the kernel cached from an earlier listing of an
        # unchanged directory are valid in it, even if the directory changes while it is read
        model_fh = self.model.opendir(req.nodeid)
        self._next_dir += 1
        fh = self._next_dir
        self._dirs[fh] = _OpenDir(req.nodeid, model_fh)
        flags = p.FOPEN_CACHE_DIR | p.FOPEN_KEEP_CACHE if self.cache.cache_dirs else 0
        return Reply(p.OPEN_OUT.pack(fh, flags, 0), lambda: self._drop_dir(fh))

    def releasedir(self, req: Request) -> Answer:
        fh = p.RELEASE_IN.unpack_from(req.arg)[0]
        self._drop_dir(fh)
        return b""

    def _drop_dir(self, fh: int) -> None:
        d = self._dirs.pop(fh, None)
        if d is None:
            return
        self._drop_pending(d)
        if d.model_fh is not None:
            self.model.releasedir(d.model_fh)

    def _drop_pending(self, d: _OpenDir) -> None:
        if self.counts_lookups:
            for ent in d.pending:
                if ent.name not in _DOTS:
                    self.model.forget(self.node_of(ent.attr), 1)
        d.pending = []
        d.pending_at = -1

    def fsyncdir(self, req: Request) -> Answer:
        # UnionOps has no directory fsync (as ``ops``): answered so the kernel sees no ENOSYS
        return b""

    def readdir(self, req: Request) -> Answer:
        return self._readdir(req, plus=False)

    def readdirplus(self, req: Request) -> Answer:
        return self._readdir(req, plus=True)

    def _stream(self, inode: int, offset: int) -> tuple[_OpenDir, int, int]:
        """The listing an offset of a handle-less READDIR belongs to (zero-message opendir):
        (listing, its stream bits, the position). Offset 0 (opendir, rewinddir, the kernel
        refilling its cache) starts a new listing of the directory as it is now; an offset of
        a listing that is gone continues a new one from the same position."""
        sid, pos = offset >> STREAM_SHIFT, offset & POSITION_MASK
        d = self._streams.get(sid) if offset else None
        if d is not None and d.inode == inode:
            return d, sid << STREAM_SHIFT, pos
        self._next_stream = self._next_stream % ((1 << 31) - 1) + 1
        sid = self._next_stream
        d = _OpenDir(inode, self.model.opendir(inode), started=True)
        self._streams[sid] = d
        mine = self._dir_streams.setdefault(inode, [])
        mine.append(sid)
        if len(mine) > STREAMS_PER_DIR:
            self._release_listing(self._streams.pop(mine.pop(0)))
        self.stats["listings"] = len(self._streams)
        return d, sid << STREAM_SHIFT, pos

    def _forget_streams(self, inode: int) -> None:
        """The kernel forgot a directory: no offset of its listings can come back."""
        for sid in self._dir_streams.pop(inode, ()):
            self._release_listing(self._streams.pop(sid))
        self.stats["listings"] = len(self._streams)

    def _release_listing(self, d: _OpenDir) -> None:
        self._drop_pending(d)
        if d.model_fh is not None:
            self.model.releasedir(d.model_fh)
            d.model_fh = None

    def _dir_handle(self, fh: int, offset: int) -> _OpenDir:
        d = self._dirs.get(fh)
        if d is None:
            raise OSError(errno.EBADF, "no such directory handle")
        if d.model_fh is None:
            d.model_fh = self.model.opendir(d.inode)
        if offset == 0 and d.started:
            # rewinddir(), or the kernel refilling its readdir cache: the directory as it is now
            fresh = self.model.opendir(d.inode)
            self._drop_pending(d)
            self.model.releasedir(d.model_fh)
            d.model_fh = fresh
        d.started = True
        return d

    def _dot_ino(self, inode: int, name: bytes) -> int:
        """The st_ino of "." or ".." of directory ``inode`` (a counted lookup, given back)."""
        if name == b"." and not self.counts_lookups:
            try:
                return self.model.getattr(inode).st_ino
            except Exception:
                return inode
        try:
            attr = self.model.lookup(inode, name)
        except Exception:
            return inode
        self.model.forget(self.node_of(attr), 1)
        return attr.st_ino

    def _readdir(self, req: Request, plus: bool) -> Answer:
        fh, offset, size = p.READ_IN.unpack_from(req.arg)[:3]
        if fh == 0 and fh not in self._dirs:  # zero-message opendir
            d, base, pos = self._stream(req.nodeid, offset)
        else:
            d, base, pos = self._dir_handle(fh, offset), 0, offset
        out: list[bytes] = []
        counted: list[int] = []  # node ids whose lookup the kernel takes with this reply
        body = self._listing(d, base, pos, size, plus, out, counted)
        if not counted:
            return body

        def undo() -> None:
            for node in counted:
                self.model.forget(node, 1)

        return Reply(body, undo)

    def _listing(self, d: _OpenDir, base: int, offset: int, size: int, plus: bool, out: list[bytes],
                 counted: list[int]) -> bytes:
        """Fill ``out`` with the records from ``offset`` that fit in ``size`` bytes; every
        offset sent is ``base | position``."""
        assert d.model_fh is not None
        room = size
        for off, name in ((1, b"."), (2, b"..")):
            if offset < off:
                rec_size = p.direntplus_size(name) if plus else p.dirent_size(name)
                if rec_size > room:
                    return b"".join(out)
                ino = self._dot_ino(d.inode, name)
                out.append(p.direntplus(p.negative_entry(0), ino, base | off, stat.S_IFDIR, name) if plus
                           else p.dirent(ino, base | off, stat.S_IFDIR, name))
                room -= rec_size
        pos = max(offset - DOT_ENTRIES, 0)
        while True:
            if d.pending and d.pending_at == pos:
                entries, d.pending, d.pending_at = d.pending, [], -1
            else:
                self._drop_pending(d)
                entries = self.model.readdir(d.model_fh, pos)
            if not entries:
                return b"".join(out)
            for i, ent in enumerate(entries):
                if ent.name in _DOTS:
                    pos = ent.next_offset
                    continue
                rec_size = p.direntplus_size(ent.name) if plus else p.dirent_size(ent.name)
                if rec_size > room:
                    d.pending, d.pending_at = entries[i:], pos
                    return b"".join(out)
                attr = ent.attr
                if plus and not self.counts_lookups:
                    try:
                        attr = self.model.lookup(d.inode, ent.name)  # counts the lookup the kernel takes
                    except (OSError, LayerfsError):
                        pos = ent.next_offset  # gone since the listing was made: skip it
                        continue
                elif not plus and self.counts_lookups:
                    self.model.forget(self.node_of(attr), 1)  # plain READDIR entries count nothing
                next_off = base | (ent.next_offset + DOT_ENTRIES)
                if plus:
                    out.append(p.direntplus(self.entry(attr), attr.st_ino, next_off, attr.st_mode, ent.name))
                    counted.append(self.node_of(attr))
                else:
                    out.append(p.dirent(attr.st_ino, next_off, attr.st_mode, ent.name))
                room -= rec_size
                pos = ent.next_offset

    def mkdir(self, req: Request) -> Answer:
        mode, umask = p.MKDIR_IN.unpack_from(req.arg)
        name = self._name(req.arg, p.MKDIR_IN.size)
        return self._entry_reply(self.model.mkdir(req.nodeid, name, mode, self.ctx(req, umask)))

    def rmdir(self, req: Request) -> Answer:
        self.model.rmdir(req.nodeid, self._name(req.arg))
        return b""

    # --- files --------------------------------------------------------------------------

    async def open(self, req: Request) -> Answer:
        flags, _ = p.OPEN_IN.unpack_from(req.arg)
        fh = await self._offload(self.model.open, req.nodeid, self._real_flags(flags))  # may copy up
        return self._open_reply(req.nodeid, fh, keep_cache=self._is_immutable(req.nodeid),
                                readonly=flags & os.O_ACCMODE == os.O_RDONLY)

    def create(self, req: Request) -> Answer:
        # on the trio thread, as mkdir and mknod: a create makes a new file (an existing
        # name is refused) and copies up directories only, never file data
        flags, mode, umask, _ = p.CREATE_IN.unpack_from(req.arg)
        name = self._name(req.arg, p.CREATE_IN.size)
        fh, attr = self.model.create(req.nodeid, name, mode, self._real_flags(flags), self.ctx(req, umask))
        node = self.node_of(attr)
        opened = self._open_reply(node, fh, keep_cache=False, readonly=flags & os.O_ACCMODE == os.O_RDONLY)
        assert opened.undo is not None
        undo_open = opened.undo

        def undo() -> None:
            undo_open()
            self.model.forget(node, 1)

        return Reply(self.entry(attr) + opened.body, undo)

    def _real_flags(self, flags: int) -> int:
        """The open flags for the model. With the writeback cache the kernel reads pages of
        write-only files (to fill partial pages) and places every write itself: the real
        file is then opened read-write and without O_APPEND."""
        if not self.writeback:
            return flags
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags & ~os.O_APPEND

    def _open_reply(self, nodeid: int, fh: int, keep_cache: bool, readonly: bool) -> Reply:
        """The ``fuse_open_out`` of a new model handle: passthrough when it can be; a
        read-only handle has nothing to flush, so its close sends no FLUSH (FOPEN_NOFLUSH)."""
        mode = self._io.get(nodeid)
        backing_id = 0
        if self.passthrough and (mode is None or mode.cached == 0):
            backing_id = self._backing_for(nodeid, fh, mode)
        if backing_id == 0 and mode is not None and mode.passthrough > 0:
            # the inode is open in passthrough mode: the kernel refuses any other mode, so
            # this open shares the backing file for mmap, its reads and writes come to us
            log.warning("inode %d: open without a backing file while in passthrough mode", nodeid)
            backing_id = mode.backing_id
            flags = p.FOPEN_PASSTHROUGH | p.FOPEN_DIRECT_IO
        elif backing_id:
            flags = p.FOPEN_PASSTHROUGH
        else:
            flags = p.FOPEN_KEEP_CACHE if keep_cache else 0
        if mode is None:
            mode = self._io[nodeid] = _IoMode()
        if readonly or not self.flush_needed:
            flags |= p.FOPEN_NOFLUSH
        if backing_id:
            mode.passthrough += 1
            mode.backing_id = backing_id
            self._files[fh] = (nodeid, PASSTHROUGH)
            self.stats["passthrough_opens"] += 1
        else:
            mode.cached += 1
            self._files[fh] = (nodeid, CACHED)
            self.stats["cached_opens"] += 1
        return Reply(p.OPEN_OUT.pack(fh, flags, backing_id), lambda: self._release(fh))

    def _backing_for(self, nodeid: int, fh: int, mode: _IoMode | None) -> int:
        """The backing id for a passthrough open of ``fh`` (0: open it cached)."""
        if mode is not None and mode.passthrough > 0:
            return mode.backing_id
        assert self._backing_fd is not None
        try:
            fd = self._backing_fd(fh)
        except Exception:
            log.exception("backing_fd(%d) failed", fh)
            return 0
        if fd is None:
            return 0
        try:
            backing_id = fusedev.backing_open(self.dev_fd, fd)
        except OSError as e:
            self.stats["backing_failures"] += 1
            if e.errno == errno.EPERM:  # not allowed at all: stop trying
                log.warning("FUSE passthrough refused (%s): serving reads and writes ourselves", e)
                self.passthrough = False
            else:
                log.debug("no passthrough for inode %d: %s", nodeid, e)
            return 0
        self.stats["backing_opens"] += 1
        return backing_id

    def _release(self, fh: int) -> None:
        """Forget the kernel's open of ``fh`` and release the model's handle."""
        nodeid, how = self._files.pop(fh, (0, CACHED))
        mode = self._io.get(nodeid)
        if mode is not None:
            if how == PASSTHROUGH:
                mode.passthrough -= 1
                if mode.passthrough == 0 and mode.backing_id:
                    try:
                        fusedev.backing_close(self.dev_fd, mode.backing_id)
                    except OSError as e:
                        log.debug("backing close %d: %s", mode.backing_id, e)
                    mode.backing_id = 0
            else:
                mode.cached -= 1
            if mode.cached <= 0 and mode.passthrough <= 0:
                del self._io[nodeid]
        self.model.release(fh)

    async def read(self, req: Request) -> Answer:
        fh, offset, size = p.READ_IN.unpack_from(req.arg)[:3]
        return await self._offload(self.model.read, fh, offset, size)

    async def write(self, req: Request) -> Answer:
        fh, offset, size = p.WRITE_IN.unpack_from(req.arg)[:3]
        data = req.arg[p.WRITE_IN.size:p.WRITE_IN.size + size]
        written = await self._offload(self.model.write, fh, offset, data)
        return p.WRITE_OUT.pack(written, 0)

    def queue_data(self, req: Request) -> Answer:
        """READ and WRITE with ``data_threads``: handed to a data thread that serves and
        answers them itself (no reply from the loop)."""
        assert self._data is not None
        self.stats["data_requests"] += 1
        self._data.put(req)
        return None

    def _data_worker(self) -> None:
        """A data thread: serves READ and WRITE and answers them itself; failures are
        answered with their errno."""
        reader = _Reader(self)
        assert self._data is not None
        get = self._data.get
        try:
            while (req := get()) is not None:
                try:
                    if req.opcode == p.Op.READ:
                        reader.read(req)
                        continue
                    fh, offset, size = p.WRITE_IN.unpack_from(req.arg)[:3]
                    written = self.model.write(fh, offset, req.arg[p.WRITE_IN.size:p.WRITE_IN.size + size])
                    parts: list[bytes | memoryview] = [p.reply_header(req.unique, 0, p.WRITE_OUT.size),
                                                       p.WRITE_OUT.pack(written, 0)]
                except Exception as e:
                    if not isinstance(e, (OSError, LayerfsError)):
                        self.stats["unexpected_errors"] += 1
                        log.error("%s failed unexpectedly; answering EIO", p.op_name(req.opcode), exc_info=e)
                    parts = [p.reply_header(req.unique, -errno_of(e), 0)]
                self._reply_parts(req, parts)
        finally:
            reader.close()

    def _reply_parts(self, req: Request, parts: list[bytes | memoryview]) -> None:
        try:
            os.writev(self.dev_fd, parts)
        except OSError as e:  # ENOENT: interrupted meanwhile; ENODEV: unmounted
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("reply to %s failed: %s", p.op_name(req.opcode), e)

    def flush(self, req: Request) -> Answer:
        self.model.flush(p.FLUSH_IN.unpack_from(req.arg)[0])
        return b""

    async def fsync(self, req: Request) -> Answer:
        fh, flags, _ = p.FSYNC_IN.unpack_from(req.arg)
        await self._offload(self.model.fsync, fh, bool(flags & p.FSYNC_FDATASYNC))
        return b""

    async def fallocate(self, req: Request) -> Answer:
        fh, offset, length, mode, _ = p.FALLOCATE_IN.unpack_from(req.arg)
        await self._offload(self.model.fallocate, fh, mode, offset, length)
        return b""

    def release(self, req: Request) -> Answer:
        self._release(p.RELEASE_IN.unpack_from(req.arg)[0])
        return b""

    # --- namespace changes --------------------------------------------------------------

    def unlink(self, req: Request) -> Answer:
        self.model.unlink(req.nodeid, self._name(req.arg))
        return b""

    async def rename(self, req: Request) -> Answer:
        (newdir,) = p.RENAME_IN.unpack_from(req.arg)
        return await self._rename(req, newdir, 0, p.RENAME_IN.size)

    async def rename2(self, req: Request) -> Answer:
        newdir, flags, _ = p.RENAME2_IN.unpack_from(req.arg)
        return await self._rename(req, newdir, flags, p.RENAME2_IN.size)

    async def _rename(self, req: Request, newdir: int, flags: int, start: int) -> Answer:
        old, after = p.cstring(req.arg, start)
        new = self._name(req.arg, after)
        # offloaded: renaming a lower file copies it up
        await self._offload(self.model.rename, req.nodeid, old, newdir, new, flags)
        if newdir != req.nodeid:
            self._moved(newdir, new)
            if flags & RENAME_EXCHANGE:
                self._moved(req.nodeid, old)
        return b""

    def _moved(self, parent: int, name: bytes) -> None:
        """A directory that moved to another parent: its cached listing has a stale ".."."""
        try:
            attr = self.model.lookup(parent, name)
        except Exception:
            return
        self.model.forget(self.node_of(attr), 1)
        if stat.S_ISDIR(attr.st_mode) and self.cache.cache_dirs:
            self._notify(p.inval_inode(self.node_of(attr), 0, 0))

    async def link(self, req: Request) -> Answer:
        (old,) = p.LINK_IN.unpack_from(req.arg)
        name = self._name(req.arg, p.LINK_IN.size)
        return self._entry_reply(await self._offload(self.model.link, old, req.nodeid, name))

    def symlink(self, req: Request) -> Answer:
        name, after = p.cstring(req.arg)
        target = self._name(req.arg, after)
        return self._entry_reply(self.model.symlink(req.nodeid, name, target, self.ctx(req)))

    def mknod(self, req: Request) -> Answer:
        mode, rdev, umask, _ = p.MKNOD_IN.unpack_from(req.arg)
        name = self._name(req.arg, p.MKNOD_IN.size)
        return self._entry_reply(self.model.mknod(req.nodeid, name, mode, rdev, self.ctx(req, umask)))

    # --- extended attributes ------------------------------------------------------------

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        """The getxattr/listxattr size protocol: size 0 asks for the length only."""
        if size == 0:
            return p.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return value

    def getxattr(self, req: Request) -> Answer:
        size, _ = p.GETXATTR_IN.unpack_from(req.arg)
        return self._sized(self.model.getxattr(req.nodeid, self._name(req.arg, p.GETXATTR_IN.size)), size)

    def listxattr(self, req: Request) -> Answer:
        size, _ = p.GETXATTR_IN.unpack_from(req.arg)
        return self._sized(b"".join(n + b"\0" for n in self.model.listxattr(req.nodeid)), size)

    async def setxattr(self, req: Request) -> Answer:
        head = p.SETXATTR_IN_EXT if self.setxattr_ext else p.SETXATTR_IN
        size, flags = head.unpack_from(req.arg)[:2]
        name, after = p.cstring(req.arg, head.size)
        value = req.arg[after:after + size]
        await self._offload(self.model.setxattr, req.nodeid, name, value, flags)
        return b""

    async def removexattr(self, req: Request) -> Answer:
        await self._offload(self.model.removexattr, req.nodeid, self._name(req.arg))
        return b""

    # --- filesystem ---------------------------------------------------------------------

    def statfs(self, req: Request) -> Answer:
        s = self.model.statfs()
        return p.statfs_out(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, s.f_namemax,
                            s.f_frsize)

    def close(self) -> None:
        """Release what the kernel left open (the connection is gone) and the backing ids."""
        if self._data is not None:  # the data threads finish what they hold, then stop
            for _ in self._data_pool:
                self._data.put(None)
            for t in self._data_pool:
                t.join(5)
            self._data_pool.clear()
        for fh in list(self._dirs):
            try:
                self._drop_dir(fh)
            except Exception:
                log.exception("releasedir at shutdown")
        self._dir_streams.clear()
        while self._streams:
            try:
                self._release_listing(self._streams.popitem()[1])
            except Exception:
                log.exception("releasedir at shutdown")
        for fh in list(self._files):
            try:
                self._release(fh)
            except Exception:
                log.exception("release at shutdown")

