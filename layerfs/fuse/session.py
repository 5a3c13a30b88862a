"""The kernel FUSE transport: layerfs speaks the FUSE protocol on ``/dev/fuse`` itself.

The second transport of ``layerfs-fuse`` (``--transport kernel``), beside pyfuse3 (which
goes through libfuse). It owns the connection: opening the device and mounting it
(``mount(2)`` as root, ``fusermount3`` otherwise: ``layerfs.linux.fusedev``), INIT
negotiation, the request loop, replies, interrupts, notifications, request counters and
the end of the connection. What to answer is ``layerfs.fuse.dispatch``'s business, the
bytes are ``layerfs.fuse.protocol``'s.

INIT asks for what the kernel offers of: async reads, atomic O_TRUNC, big writes with
``max_pages`` (``max_write`` 1 MiB), parallel dirops, readdirplus (auto), async direct
I/O, cached symlinks, POSIX ACLs (the kernel enforces them, as kernel overlayfs does, and
caches them: ``ls -l`` asks the daemon for one xattr per entry instead of two), and
passthrough when the daemon runs as root with CAP_SYS_ADMIN (``--passthrough off`` turns it
off). Not: writeback cache (off for now), export support, splice, locks (the kernel then
keeps POSIX and BSD locks local, as with pyfuse3). The negotiated minor is the kernel's,
capped at ``protocol.KERNEL_MINOR``. As root, once INIT is answered, the mount's readahead
window is raised to one ``max_write`` (``fusedev.set_readahead``).

The loop (one trio task) reads a request at a time into one reusable buffer, counts it per
opcode, and answers cheap requests at once; requests that may block on disk (see
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
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from layerfs.errors import LayerfsError
from layerfs.fuse import protocol as p
from layerfs.fuse.dispatch import Answer, AsyncHandler, CachePolicy, Dispatcher, Reply, Request, errno_of
from layerfs.linux import fusedev
from layerfs.linux.proc import in_initial_userns
from layerfs.union.api import UnionOps

log = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGESIZE")
MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // PAGE
# a WRITE of max_write bytes plus its header and argument, with room to spare
BUFFER_SIZE = MAX_WRITE + 2 * PAGE
MAX_BACKGROUND = 32
CONGESTION_THRESHOLD = 24
MAX_STACK_DEPTH = 1  # backing files on plain filesystems; the mount itself stays stackable
THREADS = 32
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
        self.debug = debug
        self.stats_path = stats_path
        self.on_ready = on_ready
        self.on_stop = on_stop  # detaches the mount (called on a stop signal)
        self.counts: dict[str, int] = {}
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
        while True:
            try:
                n = os.readv(fd, [buf])
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
            if n < p.IN_HEADER.size:
                log.error("short read from /dev/fuse (%d bytes)", n)
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
        name = p.op_name(opcode)
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.debug:
            log.debug("%s unique=%d node=%d uid=%d pid=%d (%d bytes)", name, unique, nodeid, uid, pid,
                      len(req.arg))
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
                self._failed(req, e)
            else:
                d.after(opcode)
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
                self._failed(req, e)
            else:
                self._pending.pop(req.unique, None)
                self.dispatcher.after(req.opcode)
                self._send(req, answer)
            finally:
                self._pending.pop(req.unique, None)
                self._slow -= 1
        if scope.cancelled_caught:
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
        # ENOENT: the request was interrupted or aborted meanwhile; ENODEV: unmounted
        if exc.errno not in (errno.ENOENT, errno.ENODEV):
            log.error("reply to %s failed: %s", p.op_name(req.opcode), exc)

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
        granted = flags & want
        passthrough = bool(granted & p.PASSTHROUGH)
        readahead = min(max_readahead, MAX_WRITE)
        body = p.INIT_OUT.pack(p.KERNEL_VERSION, minor, readahead, granted & 0xFFFFFFFF, MAX_BACKGROUND,
                               CONGESTION_THRESHOLD, MAX_WRITE, 1, MAX_PAGES, 0, granted >> 32,
                               MAX_STACK_DEPTH if passthrough else 0)
        if minor < 23:
            body = body[:24]  # FUSE_COMPAT_22_INIT_OUT_SIZE
        self.dispatcher.configure(self.fd, passthrough=passthrough, setxattr_ext=False)
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
        return {"transport": "kernel", "pid": os.getpid(), "requests": dict(sorted(self.counts.items())),
                "errors": self.errors, "interrupted": self.interrupted, "init": self.negotiated,
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


@dataclass(frozen=True)
class MountConfig:
    """What to mount and how (``layerfs.fuse.main`` makes it from the command line)."""

    mountpoint: str  # a directory, or /dev/fd/N: a device fd its caller mounted (libfuse's convention)
    source: str  # the mount's source in mountinfo (fsname)
    subtype: str  # the type is fuse.SUBTYPE
    flags: int  # mount(2) flags (MS_*), as root
    options: list[str]  # FUSE's own mount options, as root (default_permissions, allow_other)
    fusermount_options: list[str]  # everything for fusermount3 -o, unprivileged
    timeout: float | None = None  # attribute cache of changeable entries (None: the default)
    passthrough: bool = True  # use FUSE passthrough where allowed (root with CAP_SYS_ADMIN)
    dir_cache: bool = True  # directory listings cached in the kernel (off: every readdir reaches us)
    debug: bool = False  # log every request
    stats: str | None = None  # the request counters' file


def serve(config: MountConfig, model: UnionOps, on_ready: Callable[[], None] | None = None) -> int:
    """Mount ``config.mountpoint`` on a new FUSE connection, serve ``model`` until unmounted.

    ``on_ready`` runs once the kernel's INIT is answered (the mount is live and answering).
    The model is destroyed before this returns, whatever happened.
    """
    euid = os.geteuid()
    target = config.mountpoint
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a statistics request must never kill the daemon
    premounted = target.startswith("/dev/fd/")
    real_target = target if premounted else os.path.realpath(target)  # after the mount, a lookup would ask us
    try:
        if premounted:
            fd = int(target[len("/dev/fd/"):])
            os.fstat(fd)
            os.set_blocking(fd, False)
        elif euid == 0:
            fd = fusedev.open_device()
            try:
                fusedev.mount_fuse(fd, target, source=config.source, subtype=config.subtype, flags=config.flags,
                                   options=config.options)
            except BaseException:
                os.close(fd)
                raise
        else:
            fd = fusedev.fusermount_mount(target, config.fusermount_options)
    except (OSError, ValueError) as e:
        model.destroy()
        raise LayerfsError(f"cannot mount on {target}: {e}") from e

    def detach() -> None:
        if premounted:
            return  # no path to unmount: closing the device ends the connection
        if euid == 0:
            fusedev.detach(target)
        else:
            fusedev.fusermount_unmount(target, lazy=True)

    if euid == 0 and not premounted:
        # the kernel's readahead for FUSE is 128 KiB whatever INIT says; a window of one
        # max_write lets a sequential read arrive in 1 MiB requests (8x fewer round trips)
        inner = on_ready

        def on_ready() -> None:
            if not fusedev.set_readahead(real_target, MAX_WRITE // 1024):
                log.info("could not raise the readahead window of %s", target)
            if inner is not None:
                inner()

    notifier = Notifier(fd)
    cache = CachePolicy(mutable=config.timeout if config.timeout is not None else 1.0,
                        cache_dirs=config.dir_cache, zero_message_opendir=config.dir_cache)
    dispatcher = Dispatcher(model, cache, notify=notifier.send, limiter=None)
    # passthrough (BACKING_OPEN) needs CAP_SYS_ADMIN in the initial user namespace, not a child one's
    want_passthrough = config.passthrough and euid == 0 and fusedev.has_cap_sys_admin() and in_initial_userns()
    session = Session(fd, dispatcher, passthrough=want_passthrough, debug=config.debug, stats_path=config.stats,
                      on_ready=on_ready, on_stop=detach)
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
