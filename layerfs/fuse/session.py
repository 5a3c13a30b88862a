"""The kernel FUSE transport: layerfs speaks the FUSE protocol on ``/dev/fuse`` itself.

The second transport of ``layerfs-fuse`` (``--transport kernel``), beside pyfuse3 (which
goes through libfuse). It owns the connection: opening the device and mounting it
(``mount(2)`` as root, ``fusermount3`` otherwise: ``layerfs.linux.fusedev``), INIT
negotiation, the request loop, replies, interrupts, notifications, request counters and
the end of the connection. What to answer is ``layerfs.fuse.dispatch``'s business, the
bytes are ``layerfs.fuse.protocol``'s.

INIT asks for what the kernel offers of: async reads, atomic O_TRUNC, big writes with
``max_pages`` (``max_write`` 1 MiB less a page), parallel dirops, readdirplus (auto), async direct
I/O, cached symlinks, POSIX ACLs (the kernel enforces them, as kernel overlayfs does, and
caches them: ``ls -l`` asks the daemon for one xattr per entry instead of two), and
passthrough when the daemon runs as root with CAP_SYS_ADMIN (``--passthrough off`` turns it
off). Not: writeback cache (``--writeback on`` asks for it: a measured lever, off by
default, since it excludes passthrough), export support, locks (the kernel then keeps POSIX
and BSD locks local, as with pyfuse3). The negotiated minor is the kernel's, capped at
``protocol.KERNEL_MINOR``. ``max_write`` is one page short of 1 MiB, so that a READ reply
fits a default-sized pipe and is spliced (``dispatch``; ``--splice off``: never). As root,
once INIT is answered, the mount's readahead window is raised to one ``max_write``
(``fusedev.set_readahead``). READ and WRITE go to ``DATA_THREADS`` threads of the
dispatcher that answer them themselves.

The loop (one trio task) reads a request at a time into one reusable buffer, counts it per
opcode, and answers cheap requests at once. Answers that cannot change until a request
changes something -- GETATTR, GETXATTR and LISTXATTR of an immutable node (a lower-only
entry, ``Attr.immutable``) -- are kept encoded (``ReplyCache``) and sent again straight from
the loop, without decoding the request or asking the model: ``ls -l`` asks for
``security.selinux`` of every entry it shows, every time. The cache is dropped whole when
a request that may change anything arrives and again when it has been answered (see
``ReplyCache``), and a node's answers when the kernel forgets it; requests that may block on disk (see
``dispatch``) get a task of their own that waits for a worker thread, so a slow copy-up
never stalls the loop. INTERRUPT cancels a request still waiting for its thread (answered
EINTR); one already running finishes and is answered normally. A reply the kernel refuses
with ENOENT (the request was interrupted or aborted) is undone (handles released,
lookups given back). Notifications go through a queue to a thread of their own: the
kernel may block a notification write on locks that the request being served holds.

The connection ends when reading the device fails with ENODEV (the filesystem was
unmounted: ``umount``, ``fusermount3 -u``) or on SIGTERM/SIGINT/SIGHUP (the daemon then
detaches its mount itself); either way the model's ``destroy()`` runs and the daemon
exits. SIGUSR1 writes the request counters to the ``--stats`` file (JSON, written to a
temporary name and renamed into place); they are written at exit, too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import select
import signal
import struct
import threading
from collections.abc import Callable
from typing import Any

import trio

from layerfs.errors import LayerfsError
from layerfs.fuse import protocol as p
from layerfs.fuse.connection import Connection, MountConfig, connect
from layerfs.fuse.dispatch import Answer, AsyncHandler, CachePolicy, Dispatcher, Reply, Request, errno_of
from layerfs.linux import fusedev
from layerfs.linux.proc import in_initial_userns
from layerfs.union.api import UnionOps

log = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGESIZE")
# one page short of 1 MiB: a READ reply (header page + data pages) then fits a pipe of the
# default /proc/sys/fs/pipe-max-size (1 MiB, 256 pages), so it can be spliced (``dispatch``)
MAX_WRITE = (1 << 20) - PAGE
MAX_PAGES = MAX_WRITE // PAGE
# a WRITE of max_write bytes plus its header and argument, with room to spare
BUFFER_SIZE = MAX_WRITE + 2 * PAGE
MAX_BACKGROUND = 32
CONGESTION_THRESHOLD = 24
MAX_STACK_DEPTH = 1  # backing files on plain filesystems; the mount itself stays stackable
THREADS = 32
# threads that serve READ and WRITE start to finish, reply included (``Dispatcher.queue_data``):
# no trio task or thread hand-off per request, file data read into a reusable buffer
DATA_THREADS = 4
# INIT flags asked for (those the kernel offers); PASSTHROUGH is added when allowed
WANTED = (p.ASYNC_READ | p.ATOMIC_O_TRUNC | p.BIG_WRITES | p.PARALLEL_DIROPS | p.MAX_PAGES
          | p.DO_READDIRPLUS | p.READDIRPLUS_AUTO | p.ASYNC_DIO | p.CACHE_SYMLINKS | p.INIT_EXT | p.POSIX_ACL)
# a read of the device that failed with one of these is simply tried again
_RETRY = (errno.EINTR, errno.EAGAIN, errno.ENOENT)
# with no request of ours in a worker thread, an empty device is first waited for this long
# (ms) outside trio: a client that just got its reply usually asks again within microseconds
# (ls -l: stat, then getxattr; create, write, close), and a plain poll(2) costs a fraction of
# a trio wait (epoll re-arm, scheduler pass, task switch) -- the largest per-request cost
QUICK_WAIT_MS = 1
OPCODES = 64  # request counters kept per opcode below this (higher ones share the last)
# the part of fuse_in_header the loop reads itself: opcode unique nodeid (at offset 4)
_HEAD = struct.Struct("<IQQ")


class ReplyCache:
    """Encoded answers about immutable nodes, for the loop to send again unchanged.

    Keyed by node id, then by the request's argument bytes (GETXATTR: the size asked for and
    the name; LISTXATTR: the size; GETATTR: nothing -- its handle does not matter for a node
    whose attributes cannot change). An answer is kept only for a node the dispatcher calls
    immutable: what the model says about it (attributes, xattrs) changes only through a
    request that changes something (a copy-up, setattr, setxattr, a new link ...), never
    behind our back. So every request not in ``READ_ONLY`` drops the whole cache when it is
    read and again once it is answered (a change served in a worker thread: answers
    computed meanwhile may be of the state before it); FORGET drops the node's answers (its
    id may name another node later). Whether a node is immutable is asked of the dispatcher
    once per node between drops, or learnt for free from the entries it sends (``seen``).
    """

    OPS = frozenset({p.Op.GETATTR, p.Op.GETXATTR, p.Op.LISTXATTR})
    # requests that never change what the model reports about any node
    READ_ONLY = frozenset({p.Op.LOOKUP, p.Op.FORGET, p.Op.BATCH_FORGET, p.Op.GETATTR, p.Op.READLINK,
                           p.Op.STATFS, p.Op.GETXATTR, p.Op.LISTXATTR, p.Op.OPENDIR, p.Op.READDIR,
                           p.Op.READDIRPLUS, p.Op.RELEASEDIR, p.Op.FSYNCDIR, p.Op.ACCESS, p.Op.READ,
                           p.Op.FLUSH, p.Op.RELEASE, p.Op.FSYNC, p.Op.INTERRUPT, p.Op.INIT, p.Op.DESTROY})
    # errors that are answers about the node (no such attribute, buffer too small)
    ERRORS = frozenset({errno.ENODATA, errno.ERANGE})

    __slots__ = ("nodes", "verdicts", "hits", "drops")

    def __init__(self) -> None:
        self.nodes: dict[int, dict[bytes, tuple[int, bytes]]] = {}  # node id -> {argument bytes: (error, body)}
        self.verdicts: dict[int, bool] = {}  # node id -> immutable
        self.hits = 0
        self.drops = 0

    @staticmethod
    def key(opcode: int, arg: bytes | memoryview) -> bytes:
        return b"" if opcode == p.Op.GETATTR else bytes(arg)

    def drop(self) -> None:
        if self.nodes or self.verdicts:
            self.nodes = {}
            self.verdicts = {}
            self.drops += 1

    def forget(self, nodeid: int) -> None:
        self.nodes.pop(nodeid, None)
        self.verdicts.pop(nodeid, None)

    def seen(self, nodeid: int, immutable: bool) -> None:
        """The dispatcher sent an entry of ``nodeid`` (it knew then whether it is immutable)."""
        self.verdicts[nodeid] = immutable

    def store(self, nodeid: int, opcode: int, arg: bytes, error: int, body: bytes,
              immutable: Callable[[int], bool]) -> None:
        verdict = self.verdicts.get(nodeid)
        if verdict is None:
            verdict = self.verdicts[nodeid] = immutable(nodeid)
        if verdict:
            answers = self.nodes.get(nodeid)
            if answers is None:
                answers = self.nodes[nodeid] = {}
            answers[self.key(opcode, arg)] = (error, body)


class Notifier:
    """Writes notifications to the device from a thread of its own, in order."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fuse-notify", daemon=True)
        self._thread.start()

    def send(self, msg: bytes) -> None:
        self._queue.put(msg)

    def _run(self) -> None:
        while (msg := self._queue.get()) is not None:
            try:
                os.write(self.fd, msg)
            except OSError as e:
                # ENOENT: the kernel no longer knows that inode/entry; ENODEV: unmounted
                if e.errno not in (errno.ENOENT, errno.ENODEV, errno.ENOTDIR):
                    log.warning("notification failed: %s", e)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)


class Session:
    """One FUSE connection, served until the kernel ends it or a stop signal arrives."""

    def __init__(self, fd: int, dispatcher: Dispatcher, *, passthrough: bool = False, debug: bool = False,
                 stats_path: str | None = None, on_ready: Callable[[], None] | None = None,
                 on_stop: Callable[[], None] | None = None) -> None:
        self.fd = fd
        self.dispatcher = dispatcher
        self.want_passthrough = passthrough
        self.want_writeback = False  # FUSE_WRITEBACK_CACHE (``--writeback on``; off by default)
        self.debug = debug
        self.stats_path = stats_path
        self.on_ready = on_ready
        self.on_stop = on_stop  # detaches the mount (called on a stop signal)
        self.counts = [0] * OPCODES  # requests read, per opcode (the last slot: opcodes beyond)
        self.cache = ReplyCache()
        dispatcher.on_entry = self.cache.seen
        self.negotiated: dict[str, Any] = {}
        self.initialized = False
        self.unmounted = False  # the kernel ended the connection (ENODEV)
        self.signalled: int | None = None
        self.errors = 0
        self.interrupted = 0
        self._pending: dict[int, trio.CancelScope] = {}
        self._slow = 0  # requests handed to tasks of their own and not yet answered
        self._nursery: trio.Nursery | None = None

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until ENODEV or a stop signal; in-flight requests finish or are cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # handlers in place before INIT is answered (readiness is reported then)
                await nursery.start(self._watch_signals, nursery.cancel_scope)
                await self._serve()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self.write_stats()

    async def _serve(self) -> None:
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        fd = self.fd
        quick = select.poll()
        quick.register(fd, select.POLLIN)
        since_checkpoint = 0
        cache = self.cache
        cached_ops = () if self.debug else ReplyCache.OPS
        counts = self.counts
        head = _HEAD.unpack_from
        out_header = p.OUT_HEADER.pack
        in_size = p.IN_HEADER.size
        readv, writev = os.readv, os.writev
        bufs = [buf]
        while True:
            try:
                n = readv(fd, bufs)
            except BlockingIOError:
                # only while no task waits for a thread (its reply would wait for us), and at
                # most QUICK_WAIT_MS: signals and the rest of trio wait no longer than that
                if not self._slow and quick.poll(QUICK_WAIT_MS):
                    continue
                await trio.lowlevel.wait_readable(fd)
                since_checkpoint = 0
                continue
            except OSError as e:
                if e.errno == errno.ENODEV:
                    self.unmounted = True
                    return
                if e.errno in _RETRY:
                    continue
                raise
            if n < in_size:
                log.error("short read from /dev/fuse (%d bytes)", n)
                continue
            if cache.nodes:
                opcode, unique, nodeid = head(buf, 4)
                if opcode in cached_ops:
                    answers = cache.nodes.get(nodeid)
                    hit = answers.get(ReplyCache.key(opcode, view[in_size:n])) if answers else None
                    if hit is not None:
                        counts[opcode] += 1
                        cache.hits += 1
                        error, body = hit
                        if error:
                            self.errors += 1
                        try:
                            writev(fd, [out_header(16 + len(body), error, unique), body])
                        except OSError as e:
                            self._reply_failed_op(opcode, e)
                        continue
            self._handle(view, n)
            since_checkpoint += 1
            # let requests whose worker thread finished send their replies
            if since_checkpoint >= 64 or (self._pending and since_checkpoint >= 4):
                since_checkpoint = 0
                await trio.lowlevel.checkpoint()

    def _handle(self, view: memoryview, n: int) -> None:
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = p.IN_HEADER.unpack_from(view)
        end = min(length, n) - extlen * 8
        req = Request(unique, opcode, nodeid, uid, gid, pid, bytes(view[p.IN_HEADER.size:end]))
        self.counts[opcode if opcode < OPCODES else OPCODES - 1] += 1
        if self.debug:
            log.debug("%s unique=%d node=%d uid=%d pid=%d (%d bytes)", p.op_name(opcode), unique, nodeid, uid,
                      pid, len(req.arg))
        cache = self.cache
        if opcode not in ReplyCache.READ_ONLY:
            cache.drop()
        elif opcode == p.Op.FORGET:
            cache.forget(nodeid)
        elif opcode == p.Op.BATCH_FORGET and cache.nodes:
            count = p.BATCH_FORGET_IN.unpack_from(req.arg)[0]
            for i in range(min(count, (len(req.arg) - p.BATCH_FORGET_IN.size) // p.FORGET_ONE.size)):
                cache.forget(p.FORGET_ONE.unpack_from(req.arg, p.BATCH_FORGET_IN.size + i * p.FORGET_ONE.size)[0])
        d = self.dispatcher
        if not self.initialized:
            if opcode == p.Op.INIT:
                self._init(req)
            else:
                self._error(req, errno.EIO)
            return
        handler = d.inline.get(opcode)
        if handler is not None:
            try:
                answer = handler(req)
            except Exception as e:
                d.after(opcode)
                if opcode in ReplyCache.OPS:
                    err = errno_of(e)
                    if err in ReplyCache.ERRORS and isinstance(e, (OSError, LayerfsError)):
                        cache.store(nodeid, opcode, req.arg, -err, b"", d.immutable)
                elif opcode not in ReplyCache.READ_ONLY:
                    cache.drop()
                self._failed(req, e)
            else:
                d.after(opcode)
                if opcode in ReplyCache.OPS and isinstance(answer, bytes):
                    cache.store(nodeid, opcode, req.arg, 0, answer, d.immutable)
                elif opcode not in ReplyCache.READ_ONLY:
                    cache.drop()
                self._send(req, answer)
            return
        slow = d.offloaded.get(opcode)
        if slow is not None:
            assert self._nursery is not None
            self._slow += 1
            self._nursery.start_soon(self._serve_slow, req, slow)
        elif opcode == p.Op.INTERRUPT:
            self._interrupt(req)
        elif opcode == p.Op.DESTROY:
            self._send(req, b"")
        elif opcode == p.Op.INIT:
            self._error(req, errno.EIO)
        else:
            self._error(req, errno.ENOSYS)

    async def _serve_slow(self, req: Request, handler: AsyncHandler) -> None:
        with trio.CancelScope() as scope:
            self._pending[req.unique] = scope
            try:
                answer = await handler(req)
            except Exception as e:
                self._pending.pop(req.unique, None)
                self.dispatcher.after(req.opcode)
                self.cache.drop()  # answers computed while it ran may be of the state before it
                self._failed(req, e)
            else:
                self._pending.pop(req.unique, None)
                self.dispatcher.after(req.opcode)
                self.cache.drop()
                self._send(req, answer)
            finally:
                self._pending.pop(req.unique, None)
                self._slow -= 1
        if scope.cancelled_caught:
            self.cache.drop()
            self.interrupted += 1
            self._error(req, errno.EINTR)

    def _interrupt(self, req: Request) -> None:
        """Cancel the request named (if it still waits for a thread). Unknown: already
        answered (requests are read in order, so never "not read yet"): nothing to do."""
        (target,) = p.INTERRUPT_IN.unpack_from(req.arg)
        scope = self._pending.get(target)
        if scope is not None:
            scope.cancel()

    # --- replies ----------------------------------------------------------------------------

    def _send(self, req: Request, answer: Answer) -> None:
        if answer is None:
            return  # FORGET, BATCH_FORGET
        if isinstance(answer, Reply):
            body, undo = answer.body, answer.undo
        else:
            body, undo = answer, None
        try:
            os.writev(self.fd, [p.reply_header(req.unique, 0, len(body)), body])
        except OSError as e:
            self._reply_failed(req, e)
            if undo is not None:
                try:
                    undo()
                except Exception:
                    log.exception("undoing the lost reply to %s", p.op_name(req.opcode))

    def _error(self, req: Request, err: int) -> None:
        self.errors += 1
        if self.debug:
            log.debug("%s unique=%d -> %s", p.op_name(req.opcode), req.unique, errno.errorcode.get(err, err))
        try:
            os.write(self.fd, p.reply_header(req.unique, -err, 0))
        except OSError as e:
            self._reply_failed(req, e)

    def _failed(self, req: Request, exc: Exception) -> None:
        if not isinstance(exc, (OSError, LayerfsError)):
            self.dispatcher.stats["unexpected_errors"] += 1
            log.error("%s failed unexpectedly; answering EIO", p.op_name(req.opcode), exc_info=exc)
        self._error(req, errno_of(exc))

    def _reply_failed(self, req: Request, exc: OSError) -> None:
        self._reply_failed_op(req.opcode, exc)

    @staticmethod
    def _reply_failed_op(opcode: int, exc: OSError) -> None:
        # ENOENT: the request was interrupted or aborted meanwhile; ENODEV: unmounted
        if exc.errno not in (errno.ENOENT, errno.ENODEV):
            log.error("reply to %s failed: %s", p.op_name(opcode), exc)

    # --- INIT -------------------------------------------------------------------------------

    def _init(self, req: Request) -> None:
        if len(req.arg) < p.INIT_IN_OLD.size:
            self._error(req, errno.EIO)
            return
        major, minor, max_readahead, flags = p.INIT_IN_OLD.unpack_from(req.arg)
        if flags & p.INIT_EXT and len(req.arg) >= p.INIT_IN.size:
            flags |= p.INIT_IN.unpack_from(req.arg)[4] << 32
        if major < p.KERNEL_VERSION:
            log.error("the kernel speaks FUSE %d.%d; 7.x is needed", major, minor)
            self._error(req, errno.EPROTO)
            return
        if major > p.KERNEL_VERSION:  # it will ask again with our major
            self._send(req, p.INIT_OUT.pack(p.KERNEL_VERSION, p.KERNEL_MINOR, *([0] * 10))[:8])
            return
        minor = min(minor, p.KERNEL_MINOR)
        want = WANTED | (p.PASSTHROUGH if self.want_passthrough else 0)
        if self.want_writeback:
            want |= p.WRITEBACK_CACHE
        granted = flags & want
        passthrough = bool(granted & p.PASSTHROUGH)
        readahead = min(max_readahead, MAX_WRITE)
        body = p.INIT_OUT.pack(p.KERNEL_VERSION, minor, readahead, granted & 0xFFFFFFFF, MAX_BACKGROUND,
                               CONGESTION_THRESHOLD, MAX_WRITE, 1, MAX_PAGES, 0, granted >> 32,
                               MAX_STACK_DEPTH if passthrough else 0)
        if minor < 23:
            body = body[:24]  # FUSE_COMPAT_22_INIT_OUT_SIZE
        self.dispatcher.configure(self.fd, passthrough=passthrough, setxattr_ext=False,
                                  writeback=bool(granted & p.WRITEBACK_CACHE))
        self.negotiated = {"major": major, "minor": minor, "offered": p.flag_names(flags),
                           "granted": p.flag_names(granted), "max_write": MAX_WRITE, "max_readahead": readahead,
                           "passthrough": passthrough}
        log.info("FUSE %d.%d, granted %s", major, minor, " ".join(self.negotiated["granted"]))
        self.initialized = True
        self._send(req, body)
        if self.on_ready is not None:
            ready, self.on_ready = self.on_ready, None
            ready()

    # --- signals and counters -----------------------------------------------------------------

    async def _watch_signals(self, scope: trio.CancelScope,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*stops, signal.SIGUSR1) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    self.write_stats()
                    continue
                self.signalled = signum
                if self.on_stop is not None:
                    try:
                        await trio.to_thread.run_sync(self.on_stop)
                    except OSError as e:
                        log.warning("unmounting after signal %d: %s", signum, e)
                scope.cancel()
                return

    def statistics(self) -> dict[str, Any]:
        requests = {p.op_name(op) if op < OPCODES - 1 else "OTHER": n for op, n in enumerate(self.counts) if n}
        return {"transport": "kernel", "pid": os.getpid(), "requests": dict(sorted(requests.items())),
                "errors": self.errors, "interrupted": self.interrupted, "init": self.negotiated,
                "cached_replies": self.cache.hits, "reply_cache_drops": self.cache.drops,
                **self.dispatcher.stats}

    def write_stats(self) -> None:
        if not self.stats_path:
            return
        import json  # only with --stats: a mount need not import it

        tmp = f"{self.stats_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.statistics(), f, indent=1)
            os.replace(tmp, self.stats_path)
        except OSError as e:
            log.warning("cannot write statistics to %s: %s", self.stats_path, e)


# --- the program's side -------------------------------------------------------------------------


def serve(config: MountConfig, model: UnionOps, on_ready: Callable[[], None] | None = None,
          connection: Connection | None = None) -> int:
    """Mount ``config.mountpoint`` on a new FUSE connection, serve ``model`` until unmounted.

    ``connection``: already mounted by the caller (``layerfs.fuse.connection.connect``),
    which may have reported the mount live meanwhile. ``on_ready`` runs once the kernel's
    INIT is answered. The model is destroyed before this returns, whatever happened.
    """
    euid = os.geteuid()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a statistics request must never kill the daemon
    if connection is None:
        try:
            connection = connect(config)
        except LayerfsError:
            model.destroy()
            raise
    fd, target, real_target, premounted = connection.fd, connection.target, connection.real_target, \
        connection.premounted
    detach = connection.detach

    if euid == 0 and not premounted:
        # the kernel's readahead for FUSE is 128 KiB whatever INIT says; a window of one
        # max_write lets a sequential read arrive in requests of ~1 MiB (8x fewer round trips)
        inner = on_ready

        def on_ready() -> None:
            if not fusedev.set_readahead(real_target, MAX_WRITE // 1024):
                log.info("could not raise the readahead window of %s", target)
            if inner is not None:
                inner()

    notifier = Notifier(fd)
    cache = CachePolicy(mutable=config.timeout if config.timeout is not None else 1.0,
                        cache_dirs=config.dir_cache, zero_message_opendir=config.dir_cache)
    dispatcher = Dispatcher(model, cache, notify=notifier.send, limiter=None, data_threads=DATA_THREADS,
                            splice=config.splice)
    # passthrough (BACKING_OPEN) needs CAP_SYS_ADMIN in the initial user namespace, not a child one's
    want_passthrough = config.passthrough and euid == 0 and fusedev.has_cap_sys_admin() and in_initial_userns()
    session = Session(fd, dispatcher, passthrough=want_passthrough, debug=config.debug, stats_path=config.stats,
                      on_ready=on_ready, on_stop=detach)
    session.want_writeback = config.writeback
    try:
        trio.run(_run, session)
    finally:
        try:
            try:
                dispatcher.close()
            finally:
                model.destroy()
        finally:
            notifier.close()
            if not session.unmounted and session.signalled is None:
                with contextlib.suppress(OSError):
                    detach()  # stopped by an error: leave nothing mounted on a dead daemon
            os.close(fd)
    return 0


async def _run(session: Session) -> None:
    limiter = trio.CapacityLimiter(THREADS)
    session.dispatcher.limiter = limiter
    await session.run()
