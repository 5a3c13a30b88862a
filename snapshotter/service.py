"""containerd's ``Snapshots`` gRPC service over the layerfs ``Snapshotter``, on a unix socket.

A containerd configured with::

    [proxy_plugins.layerfs]
      type = "snapshot"
      address = "/run/layerfs/snapshotter.sock"

sends every snapshot call for ``--snapshotter layerfs`` here. This module is a protocol
adapter only: requests in, ``snapshotter.core.Snapshotter`` calls, messages or a gRPC status
out. Everything about snapshots (rules, errors, mount descriptions) lives in the core.

Translation rules:

- ``LayerfsError.grpc_code`` becomes the gRPC status of the same name, with the error's
  message (containerd's errdefs turn NotFound, AlreadyExists, FailedPrecondition and
  InvalidArgument back into its own error kinds). Anything else is INTERNAL, logged with its
  traceback.
- The request's ``snapshotter`` field is ignored: containerd fills in the proxy plugin's
  name, and this server serves exactly one snapshotter.
- Mounts are ``MountSpec.to_containerd()`` (type, source, options; target left empty).
- ``List`` streams ``LIST_BATCH`` infos per message, as containerd's own service does.
- ``Update`` honours ``update_mask.paths`` (none: all mutable fields, i.e. the labels).

Concurrency and lifecycle: RPCs run on a thread pool. SQLite connections belong to the thread
that opened them, so every worker thread opens its own ``Store`` and ``Snapshotter`` on first
use (``threading.local``); SQLite serialises the writes. Prepare, View, Commit and Remove hold
the store's shared lock, Cleanup (``fsck --repair``) takes the exclusive one, so Cleanup never
removes the staging of a Prepare in flight (in this process or another). Reads (Stat, List,
Mounts) run inside one read transaction, so they see one consistent state of the database.
The server keeps no per-client state: containerd may restart and reconnect at will, and a
restarted server finds every snapshot in the store.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from types import FrameType
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from layerfs.errors import InvalidArgument, LayerfsError
from layerfs.mount import fuse
from layerfs.mount.spec import MountSpec
from layerfs.store import Store
from snapshotter.core import Info, Snapshotter
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.proto.containerd.types import mount_pb2

log = logging.getLogger("layerfs.snapshotter")

T = TypeVar("T")
LIST_BATCH = 100  # infos per ListSnapshotsResponse, like containerd's snapshots service
DEFAULT_NAMESPACE = "containerd"

_KIND_TO_PB = {"view": pb.VIEW, "active": pb.ACTIVE, "committed": pb.COMMITTED}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}


# -- messages ------------------------------------------------------------------------------


def info_to_pb(info: Info) -> pb.Info:
    """A core ``Info`` as containerd's ``Info`` message."""
    msg = pb.Info(name=info.name, parent=info.parent, kind=_KIND_TO_PB.get(info.kind, pb.UNKNOWN),
                  labels=info.labels)
    if info.created is not None:
        msg.created_at.FromDatetime(info.created)
    if info.updated is not None:
        msg.updated_at.FromDatetime(info.updated)
    return msg


def info_from_pb(msg: pb.Info) -> Info:
    """containerd's ``Info`` message as a core ``Info`` (timestamps are not read: immutable)."""
    return Info(kind=_PB_TO_KIND.get(msg.kind, ""), name=msg.name, parent=msg.parent,
                labels=dict(msg.labels))


def mounts_to_pb(specs: Sequence[MountSpec]) -> list[mount_pb2.Mount]:
    """Mount descriptions as containerd's ``types.Mount`` (the target stays empty)."""
    out = []
    for spec in specs:
        m = spec.to_containerd()
        out.append(mount_pb2.Mount(type=m["type"], source=m["source"], options=m["options"]))
    return out


def status_code(err: LayerfsError) -> grpc.StatusCode:
    """The gRPC status named by ``err.grpc_code`` (UNKNOWN for a name gRPC does not have)."""
    code = getattr(grpc.StatusCode, err.grpc_code, None)
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


# -- the service ---------------------------------------------------------------------------


class _ThreadState:
    """One worker thread's store and snapshotter. Closed when the thread ends: the
    thread-local that holds it is released by the exiting thread itself, which is the only
    thread allowed to close its SQLite connection."""

    def __init__(self, root: str, namespace: str, backend: str, fuse_program: str | None) -> None:
        self.store = Store(root)
        self.snapshotter = Snapshotter(self.store, namespace=namespace, backend=backend, fuse_program=fuse_program)
        self.owner = threading.get_ident()

    def close(self) -> None:
        if threading.get_ident() != self.owner:
            return  # only the owner thread may close its connection; it does at exit
        self.snapshotter.close()
        with contextlib.suppress(Exception):
            self.store.close()
        self.owner = 0

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class SnapshotsService(pb_grpc.SnapshotsServicer):
    """``containerd.services.snapshots.v1.Snapshots`` over the store at ``root``."""

    def __init__(self, root: str, *, namespace: str = DEFAULT_NAMESPACE, backend: str = "kernel") -> None:
        if backend not in ("kernel", "fuse"):
            raise InvalidArgument(f"unknown backend {backend!r} (kernel or fuse)")
        self.root = os.path.abspath(root)
        self.namespace = namespace
        self.backend = backend
        # found once here (Unsupported if missing), so the server fails at start, not on a Prepare
        self.fuse_program = fuse.program_path() if backend == "fuse" else None
        self._local = threading.local()
        # Opened once here so a bad root fails at start, not on the first request.
        Store(self.root).close()

    def _state(self) -> _ThreadState:
        state: _ThreadState | None = getattr(self._local, "state", None)
        if state is None:
            state = _ThreadState(self.root, self.namespace, self.backend, self.fuse_program)
            self._local.state = state
        return state

    def _call(self, context: grpc.ServicerContext, method: str, fn: Callable[[_ThreadState], T]) -> T:
        """Run ``fn`` on this thread's snapshotter; errors become the call's gRPC status."""
        code: grpc.StatusCode
        try:
            return fn(self._state())
        except LayerfsError as e:
            code, message = status_code(e), str(e)
            log.debug("%s: %s: %s", method, code.name, message)
        except Exception as e:
            log.exception("%s failed unexpectedly", method)
            code, message = grpc.StatusCode.INTERNAL, f"{method}: {type(e).__name__}: {e}"
        context.abort(code, message)  # raises
        raise AssertionError("unreachable")

    @staticmethod
    @contextlib.contextmanager
    def _reading(state: _ThreadState) -> Iterator[Snapshotter]:
        """One read transaction: every query inside sees the same database state."""
        with state.store.read_transaction():
            yield state.snapshotter

    @staticmethod
    @contextlib.contextmanager
    def _changing(state: _ThreadState) -> Iterator[Snapshotter]:
        """The store's shared lock: Cleanup waits until this change is in place."""
        with state.store.shared_lock():
            yield state.snapshotter

    # -- RPCs (names are containerd's) ---------------------------------------------------
    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        def run(st: _ThreadState) -> list[MountSpec]:
            with self._changing(st) as s:
                return s.prepare(request.key, request.parent, dict(request.labels))

        log.debug("Prepare %r parent %r", request.key, request.parent)
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(self._call(context, "Prepare", run)))

    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        def run(st: _ThreadState) -> list[MountSpec]:
            with self._changing(st) as s:
                return s.view(request.key, request.parent, dict(request.labels))

        log.debug("View %r parent %r", request.key, request.parent)
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(self._call(context, "View", run)))

    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> pb.MountsResponse:
        def run(st: _ThreadState) -> list[MountSpec]:
            with self._reading(st) as s:
                return s.mounts(request.key)

        return pb.MountsResponse(mounts=mounts_to_pb(self._call(context, "Mounts", run)))

    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        def run(st: _ThreadState) -> None:
            with self._changing(st) as s:
                s.commit(request.name, request.key, dict(request.labels))

        log.debug("Commit %r as %r", request.key, request.name)
        self._call(context, "Commit", run)
        return empty_pb2.Empty()

    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        def run(st: _ThreadState) -> None:
            with self._changing(st) as s:
                s.remove(request.key)

        log.debug("Remove %r", request.key)
        self._call(context, "Remove", run)
        return empty_pb2.Empty()

    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        def run(st: _ThreadState) -> Info:
            with self._reading(st) as s:
                return s.stat(request.key)

        return pb.StatSnapshotResponse(info=info_to_pb(self._call(context, "Stat", run)))

    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        paths = tuple(request.update_mask.paths) if request.HasField("update_mask") else ()

        def run(st: _ThreadState) -> Info:
            return st.snapshotter.update(info_from_pb(request.info), *paths)

        log.debug("Update %r paths %s", request.info.name, list(paths))
        return pb.UpdateSnapshotResponse(info=info_to_pb(self._call(context, "Update", run)))

    def List(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> Iterator[pb.ListSnapshotsResponse]:
        def run(st: _ThreadState) -> list[Info]:
            with self._reading(st) as s:
                return s.infos(*request.filters)

        infos = self._call(context, "List", run)
        for start in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(i) for i in infos[start:start + LIST_BATCH]])

    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> pb.UsageResponse:
        use = self._call(context, "Usage", lambda st: st.snapshotter.usage(request.key))
        return pb.UsageResponse(size=use.size, inodes=use.inodes)

    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        log.debug("Cleanup")
        removed = self._call(context, "Cleanup", lambda st: st.snapshotter.cleanup())
        for problem in removed:
            log.info("Cleanup: removed %s", problem)
        return empty_pb2.Empty()


# -- the server ----------------------------------------------------------------------------


def _listening(path: str) -> bool:
    """Does something accept connections on the unix socket ``path``?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(path)
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
        return True


def prepare_socket_path(path: str) -> None:
    """Make the socket's directory; remove a stale socket file nobody listens on.

    A live socket (another server) or a path that is not a socket is refused: never
    steal another server's address, never delete a file that is not ours to delete."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o711, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument(f"{path} exists and is not a socket: refusing to replace it")
    if _listening(path):
        raise InvalidArgument(f"another server is listening on {path}")
    log.info("removing stale socket %s", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Server:
    """The gRPC server on one unix socket: ``start()``, then ``stop()`` (or ``serve()``)."""

    def __init__(self, address: str, root: str, *, namespace: str = DEFAULT_NAMESPACE,
                 backend: str = "kernel", workers: int = 16) -> None:
        self.address = os.path.abspath(address.removeprefix("unix://").removeprefix("unix:"))
        self.service = SnapshotsService(root, namespace=namespace, backend=backend)
        self.workers = workers
        self._pool: futures.ThreadPoolExecutor | None = None
        self._server: Any = None
        self._inode: tuple[int, int] | None = None

    def start(self) -> None:
        prepare_socket_path(self.address)
        self._pool = futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="snapshots")
        self._server = grpc.server(self._pool)
        pb_grpc.add_SnapshotsServicer_to_server(self.service, self._server)  # type: ignore[no-untyped-call]
        self._server.add_insecure_port("unix://" + self.address)
        self._server.start()
        os.chmod(self.address, 0o600)  # the snapshot API is root's business (containerd runs as root)
        st = os.stat(self.address)
        self._inode = (st.st_dev, st.st_ino)
        log.info("serving containerd.services.snapshots.v1.Snapshots on %s (store %s, backend %s, namespace %s)",
                 self.address, self.service.root, self.service.backend, self.service.namespace)
        if self.service.fuse_program is not None:
            log.info("FUSE mounts are described as fuse3.%s", self.service.fuse_program)

    def stop(self, grace: float = 30.0, *, signals: SignalPipe | None = None) -> None:
        """Stop accepting calls, let the ones in flight finish (up to ``grace`` seconds),
        end the worker threads (they close their stores) and remove our socket. With
        ``signals``, a stop signal meanwhile aborts the calls still in flight."""
        if self._server is None:
            return
        stopped = self._server.stop(grace)  # returns at once: no new calls, those in flight get grace
        while signals is not None and not stopped.is_set():
            signum = signals.wait(0.05)
            if signum is not None:
                log.warning("%s again: aborting the calls in flight", signal.Signals(signum).name)
                self._server.stop(0)
                break
        stopped.wait()
        self._server = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.address)
            if (st.st_dev, st.st_ino) == self._inode:  # still ours, not a successor's
                os.unlink(self.address)
        log.info("stopped serving on %s", self.address)

    def serve(self, grace: float = 30.0) -> None:
        """``start()``, run until SIGTERM or SIGINT, then ``stop(grace)``.

        A second signal while stopping aborts the calls still in flight instead of waiting
        out the grace period (their clients get UNAVAILABLE; a worker blocked on the store
        lock still finishes before the process exits). The signals are seen whichever thread
        the kernel delivers them to (``SignalPipe``). The previous signal handlers are back
        when this returns. Call from the main thread (Python's rule for signal handlers)."""
        with SignalPipe() as signals:
            try:
                self.start()
                signum = signals.next()
                log.info("%s: shutting down (waiting up to %gs for calls in flight)",
                         signal.Signals(signum).name, grace)
            finally:
                self.stop(grace, signals=signals)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalPipe:
    """SIGTERM and SIGINT as the main thread sees them, whichever thread the kernel gave them to.

    A process-wide signal lands in any thread that does not block it (the kernel prefers the
    main thread, but not always: grpc's threads and the workers are candidates too). Python
    runs its handlers in the main thread only, the next time that thread executes bytecode,
    and a main thread blocked waiting (a lock, an ``Event``) is not woken by a signal another
    thread took: the server once slept through SIGTERM that way. So the handlers do nothing;
    the C-level handler writes every signal's number to the wakeup fd
    (``signal.set_wakeup_fd``) from whichever thread it ran in, and ``wait`` selects on that
    pipe. Entering installs the handlers (SIGINT no longer raises KeyboardInterrupt) and the
    wakeup fd; leaving puts the previous ones back. Main thread only."""

    def __init__(self) -> None:
        self._pending: list[int] = []
        self._fds: tuple[int, int] | None = None
        self._previous: dict[int, Any] = {}
        self._previous_fd = -1

    def __enter__(self) -> SignalPipe:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._fds = (r, w)
        self._previous = {s: signal.signal(s, self._noted) for s in STOP_SIGNALS}
        self._previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None

    @staticmethod
    def _noted(signum: int, frame: FrameType | None) -> None:
        """The Python-level handler: nothing to do, ``wait`` reads the signal from the pipe."""

    def next(self) -> int:
        """The next stop signal, waiting for ever."""
        while (signum := self.wait(None)) is None:
            pass
        return signum

    def wait(self, timeout: float | None) -> int | None:
        """The next stop signal (received since entering and not returned yet), waiting up to
        ``timeout`` seconds for one (None: for ever); None if there was none."""
        assert self._fds is not None, "SignalPipe.wait outside its with block"
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with contextlib.suppress(BlockingIOError):
                while data := os.read(self._fds[0], 512):
                    self._pending.extend(b for b in data if b in STOP_SIGNALS)
            if self._pending:
                return self._pending.pop(0)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            select.select([self._fds[0]], [], [], remaining)
