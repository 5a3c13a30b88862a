"""``layerfs snapshotter serve`` over gRPC, with a client stub as containerd's proxy uses it.

The server runs in a subprocess on a socket and store under the test's tmp dir. Covered:
every RPC, the error codes containerd relies on, labels and update masks, List filters (OR of
several) and streaming in batches, Usage, Cleanup, many concurrent clients, SIGTERM with a
call in flight, stale and live sockets, a restart on the same store, and that
``scripts/gen-proto`` reproduces the committed generated modules byte for byte.

``TestOverGrpc`` binds the shared snapshotter behaviours (``tests.support.snapshotter_suite``,
also run on the Python API in ``test_snapshotter.py``) to the service: a server per test, with
the kernel backend and with the FUSE backend, called through
``tests.support.snapshotter_client.GrpcSnapshotter``, which turns the status codes back into
the ``layerfs.errors`` classes.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from layerfs.errors import (
    AlreadyExists,
    DigestMismatch,
    FailedPrecondition,
    InUse,
    InvalidArgument,
    LayerfsError,
    NotFound,
    StoreError,
    UsageError,
)
from layerfs.store import Store
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.proto.containerd.types import mount_pb2
from snapshotter.service import LIST_BATCH, SnapshotsService, status_code
from tests.support.containerd_util import SnapshotterServer
from tests.support.markers import needs_root
from tests.support.paths import REPO
from tests.support.snapshotter_client import GrpcSnapshotter, error_class
from tests.support.snapshotter_suite import SnapshotterBehaviours

Stub = pb_grpc.SnapshotsStub
C = grpc.StatusCode
# containerd's keys: namespace/id/name, with slashes and spaces
KEY = "test/1/extract-123 sha256:aaaa"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SnapshotterServer]:
    srv = SnapshotterServer(tmp_path, tmp_path / "store").start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def stub(server: SnapshotterServer) -> Iterator[Stub]:
    with server.channel() as ch:
        yield server.stub(ch)


def code_of(fn: object, *args: object) -> grpc.StatusCode:
    """Call ``fn`` expecting an RpcError; its status code."""
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)  # type: ignore[operator]
    return e.value.code()  # type: ignore[no-any-return]


def prepare(stub: Stub, key: str, parent: str = "", **labels: str) -> list[object]:
    return list(stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="layerfs", key=key, parent=parent,
                                                       labels=labels)).mounts)


def commit(stub: Stub, name: str, key: str, **labels: str) -> None:
    stub.Commit(pb.CommitSnapshotRequest(snapshotter="layerfs", name=name, key=key, labels=labels))


def stat(stub: Stub, key: str) -> pb.Info:
    return stub.Stat(pb.StatSnapshotRequest(key=key)).info


def names(stub: Stub, *filters: str) -> list[str]:
    return [i.name for r in stub.List(pb.ListSnapshotsRequest(filters=filters)) for i in r.info]


def layer(stub: Stub, name: str, parent: str = "", files: Mapping[str, str] | None = None,
          labels: Mapping[str, str] | None = None) -> None:
    """A committed snapshot ``name`` with ``labels``, whose upper got ``files``."""
    mounts = prepare(stub, f"{name}-active", parent)
    (m,) = mounts
    if files:
        assert m.type == "bind" or m.type == "overlay"  # type: ignore[attr-defined]
        upper = m.source if m.type == "bind" else _option(m, "upperdir")  # type: ignore[attr-defined]
        for path, content in files.items():
            Path(upper, path).write_text(content)
    commit(stub, name, f"{name}-active", **(labels or {}))


def _option(mount: object, key: str) -> str:
    for o in mount.options:  # type: ignore[attr-defined]
        if o.startswith(key + "="):
            return str(o.split("=", 1)[1])
    raise AssertionError(f"no {key} in {mount}")


# -- the protocol --------------------------------------------------------------------------


def test_gen_proto_reproduces_the_committed_modules(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    r = subprocess.run([str(REPO / "scripts/gen-proto"), str(out)], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, r.stderr
    generated = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert {str(p) for p in generated} >= {
        "containerd/types/mount_pb2.py", "containerd/services/snapshots/v1/snapshots_pb2.py",
        "containerd/services/snapshots/v1/snapshots_pb2_grpc.py",
    }
    committed = REPO / "snapshotter/proto"
    for rel in generated:
        assert (committed / rel).exists(), f"{rel} is generated but not committed"
        assert filecmp.cmp(out / rel, committed / rel, shallow=False), f"{rel} differs: rerun scripts/gen-proto"
    on_disk = {p.relative_to(committed) for p in committed.rglob("*_pb2*") if p.suffix in (".py", ".pyi")}
    assert on_disk == {p for p in generated if "_pb2" in p.name}, "stale generated modules"


def test_wire_format_is_containerds() -> None:
    """Field numbers and names as containerd's api/services/snapshots/v1 and api/types."""
    def fields(msg: type) -> dict[str, int]:
        return {f.name: f.number for f in msg.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert fields(pb.PrepareSnapshotRequest) == {"snapshotter": 1, "key": 2, "parent": 3, "labels": 4}
    assert fields(pb.CommitSnapshotRequest) == {"snapshotter": 1, "name": 2, "key": 3, "labels": 4}
    assert fields(pb.Info) == {"name": 1, "parent": 2, "kind": 3, "created_at": 4, "updated_at": 5, "labels": 6}
    assert fields(pb.UpdateSnapshotRequest) == {"snapshotter": 1, "info": 2, "update_mask": 3}
    assert fields(pb.ListSnapshotsRequest) == {"snapshotter": 1, "filters": 2}
    assert fields(pb.UsageResponse) == {"size": 1, "inodes": 2}
    assert fields(mount_pb2.Mount) == {"type": 1, "source": 2, "target": 3, "options": 4}
    for response in (pb.PrepareSnapshotResponse, pb.ViewSnapshotResponse, pb.MountsResponse):
        mounts = response.DESCRIPTOR.fields_by_name["mounts"]
        assert (mounts.number, mounts.message_type.full_name) == (1, "containerd.types.Mount")
    assert (pb.UNKNOWN, pb.VIEW, pb.ACTIVE, pb.COMMITTED) == (0, 1, 2, 3)
    service = pb.DESCRIPTOR.services_by_name["Snapshots"]
    assert service.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert [m.name for m in service.methods] == ["Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update",
                                                 "List", "Usage", "Cleanup"]
    assert service.methods_by_name["List"].server_streaming


def test_error_codes_map_by_name() -> None:
    assert status_code(NotFound("x")) == C.NOT_FOUND
    assert status_code(FailedPrecondition("x")) == C.FAILED_PRECONDITION
    assert status_code(DigestMismatch("x")) == C.DATA_LOSS
    assert status_code(StoreError("x")) == C.INTERNAL
    odd = LayerfsError("x")
    odd.grpc_code = "NO_SUCH_CODE"
    assert status_code(odd) == C.UNKNOWN


class _Aborted(Exception):
    pass


class _Context:
    """Just enough of grpc.ServicerContext for calling the service in-process."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted(details)


def test_unexpected_errors_are_internal_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    service = SnapshotsService(str(tmp_path / "store"))
    ctx = _Context()

    def boom(state: object) -> None:
        raise RuntimeError("disk on fire")

    with pytest.raises(_Aborted):
        service._call(ctx, "Stat", boom)  # type: ignore[arg-type]
    assert ctx.code == C.INTERNAL and "disk on fire" in ctx.details
    assert "Stat failed unexpectedly" in caplog.text and "RuntimeError" in caplog.text


def test_worker_threads_close_their_own_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite connections may only be closed by the thread that opened them: each worker's
    store is closed by that worker, when the pool ends it."""
    import snapshotter.service as service_module

    closed: list[tuple[int, int]] = []
    original = service_module._ThreadState.close

    def close(self: service_module._ThreadState) -> None:
        owner = self.owner
        original(self)
        if owner and not self.owner:
            closed.append((owner, threading.get_ident()))

    monkeypatch.setattr(service_module._ThreadState, "close", close)
    service = SnapshotsService(str(tmp_path / "store"))

    def work(i: int) -> int:
        service._state().snapshotter.infos()
        time.sleep(0.02)
        return threading.get_ident()

    pool = futures.ThreadPoolExecutor(4)
    workers = set(pool.map(work, range(16)))
    pool.shutdown(wait=True)
    deadline = time.monotonic() + 5
    while len(closed) < len(workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(o for o, _ in closed) == sorted(workers)
    assert all(owner == closer for owner, closer in closed)


def test_client_maps_codes_back_to_the_errors_they_came_from() -> None:
    """The shared suite asserts ``layerfs.errors`` classes over gRPC: each status the service
    sends for one of containerd's error kinds comes back as the class that was raised (or
    the base class of its kind, for a subclass)."""
    for raised, kind in [(NotFound, NotFound), (AlreadyExists, AlreadyExists),
                         (FailedPrecondition, FailedPrecondition), (InvalidArgument, InvalidArgument),
                         (InUse, FailedPrecondition), (UsageError, InvalidArgument)]:
        assert error_class(status_code(raised("x"))) is kind, raised
    for unmapped in (DigestMismatch, StoreError, LayerfsError):
        assert error_class(status_code(unmapped("x"))) is None, unmapped


# -- the shared behaviours -----------------------------------------------------------------


class TestOverGrpc(SnapshotterBehaviours):
    """The shared behaviours through ``layerfs snapshotter serve`` (one per test) and a client."""

    @contextlib.contextmanager
    def snapshotter(self, root: Path, backend: str) -> Iterator[GrpcSnapshotter]:
        srv = SnapshotterServer(root.parent, root, backend=backend).start()
        try:
            client = GrpcSnapshotter(srv.channel())
            try:
                yield client
            finally:
                client.close()
        finally:
            srv.stop()


# -- the RPCs ------------------------------------------------------------------------------


@needs_root
def test_every_rpc(stub: Stub, server: SnapshotterServer) -> None:
    (m,) = prepare(stub, KEY, **{"containerd.io/snapshot.ref": "sha256:aaaa"})
    assert (m.type, list(m.options), m.target) == ("bind", ["rw", "rbind"], "")  # type: ignore[attr-defined]
    Path(m.source, "hello").write_text("hello\n")  # type: ignore[attr-defined]
    info = stat(stub, KEY)
    assert (info.name, info.parent, info.kind) == (KEY, "", pb.ACTIVE)
    assert dict(info.labels) == {"containerd.io/snapshot.ref": "sha256:aaaa"}
    assert info.created_at == info.updated_at and info.created_at.seconds > 1_600_000_000
    use = stub.Usage(pb.UsageRequest(key=KEY))
    assert use.size > 0 and use.inodes == 1

    commit(stub, "base", KEY, committed="yes")
    assert code_of(stat, stub, KEY) == C.NOT_FOUND  # the key is gone
    base = stat(stub, "base")
    assert (base.kind, dict(base.labels)) == (pb.COMMITTED, {"committed": "yes"})  # replaced, not inherited
    assert stub.Usage(pb.UsageRequest(key="base")) == use  # stored at commit

    layer(stub, "top", "base", {"top": "top\n"})
    (m,) = prepare(stub, "rw", "top")
    assert m.type == "overlay" and m.source == "overlay"  # type: ignore[attr-defined]
    opts = list(m.options)  # type: ignore[attr-defined]
    lowers = _option(m, "lowerdir").split(":")
    assert len(lowers) == 2 and Path(lowers[0], "top").exists() and Path(lowers[1], "hello").exists()
    assert any(o.startswith("upperdir=") for o in opts) and any(o.startswith("workdir=") for o in opts)
    assert list(stub.Mounts(pb.MountsRequest(key="rw")).mounts) == [m]

    (v,) = stub.View(pb.ViewSnapshotRequest(key="v1", parent="base")).mounts
    assert (v.type, list(v.options)) == ("bind", ["ro", "rbind"]) and Path(v.source, "hello").exists()
    (v2,) = stub.View(pb.ViewSnapshotRequest(key="v2", parent="top", labels={"a": "b"})).mounts
    assert v2.type == "overlay" and "ro" in v2.options
    assert stat(stub, "v2").kind == pb.VIEW and dict(stat(stub, "v2").labels) == {"a": "b"}

    assert names(stub) == ["base", "top", "rw", "v1", "v2"]
    stub.Remove(pb.RemoveSnapshotRequest(key="v2"))
    stub.Remove(pb.RemoveSnapshotRequest(key="rw"))
    assert names(stub) == ["base", "top", "v1"]

    # Cleanup removes what the database does not know, nothing else
    orphan = server.root / "snapshots" / "999"
    (orphan / "fs").mkdir(parents=True)
    (server.root / "tmp" / "new-crashed").mkdir()
    stub.Cleanup(pb.CleanupRequest(snapshotter="layerfs"))
    assert not orphan.exists() and not (server.root / "tmp" / "new-crashed").exists()
    assert names(stub) == ["base", "top", "v1"]
    assert "Cleanup: removed orphan snapshot directory snapshots/999" in server.log_text()


@needs_root
def test_error_codes(stub: Stub) -> None:
    layer(stub, "base")
    prepare(stub, "active", "base")
    stub.View(pb.ViewSnapshotRequest(key="view", parent="base"))
    # NotFound
    assert code_of(stat, stub, "nope") == C.NOT_FOUND
    assert code_of(prepare, stub, "k", "nope") == C.NOT_FOUND
    assert code_of(stub.Mounts, pb.MountsRequest(key="nope")) == C.NOT_FOUND
    assert code_of(stub.Remove, pb.RemoveSnapshotRequest(key="nope")) == C.NOT_FOUND
    assert code_of(stub.Usage, pb.UsageRequest(key="nope")) == C.NOT_FOUND
    assert code_of(commit, stub, "x", "nope") == C.NOT_FOUND
    assert code_of(stub.Update, pb.UpdateSnapshotRequest(info=pb.Info(name="nope"))) == C.NOT_FOUND
    # AlreadyExists
    assert code_of(prepare, stub, "active", "base") == C.ALREADY_EXISTS
    assert code_of(prepare, stub, "base") == C.ALREADY_EXISTS
    assert code_of(stub.View, pb.ViewSnapshotRequest(key="view")) == C.ALREADY_EXISTS
    prepare(stub, "again", "base")
    assert code_of(commit, stub, "base", "again") == C.ALREADY_EXISTS
    # FailedPrecondition
    assert code_of(stub.Remove, pb.RemoveSnapshotRequest(key="base")) == C.FAILED_PRECONDITION  # children
    assert code_of(stub.Mounts, pb.MountsRequest(key="base")) == C.FAILED_PRECONDITION  # committed
    assert code_of(commit, stub, "from-view", "view") == C.FAILED_PRECONDITION  # not active
    # InvalidArgument
    assert code_of(prepare, stub, "k2", "active") == C.INVALID_ARGUMENT  # parent not committed
    assert code_of(prepare, stub, "") == C.INVALID_ARGUMENT
    assert code_of(names, stub, "name==") == C.INVALID_ARGUMENT
    assert code_of(stub.Update, pb.UpdateSnapshotRequest(
        info=pb.Info(name="base"), update_mask={"paths": ["parent"]})) == C.INVALID_ARGUMENT
    # the message names the object
    with pytest.raises(grpc.RpcError) as e:
        stat(stub, "missing key")
    assert "missing key" in (e.value.details() or "")  # type: ignore[attr-defined]


@needs_root
def test_update_labels_and_masks(stub: Stub) -> None:
    layer(stub, "s", labels={"a": "1", "b": "2"})
    before = stat(stub, "s")

    def update(labels: dict[str, str], *paths: str) -> dict[str, str]:
        req = pb.UpdateSnapshotRequest(info=pb.Info(name="s", labels=labels))
        if paths:
            req.update_mask.paths.extend(paths)
        resp = stub.Update(req).info
        assert resp == stat(stub, "s")
        return dict(resp.labels)

    assert update({"c": "3"}) == {"c": "3"}  # no mask: all mutable fields (labels) replaced
    assert update({"a": "1", "d": "4"}, "labels") == {"a": "1", "d": "4"}
    assert update({"e": "5"}, "labels.e") == {"a": "1", "d": "4", "e": "5"}  # one label set
    assert update({}, "labels.a") == {"d": "4", "e": "5"}  # absent from info: deleted
    assert update({"x/y.z": "v", "d": "ignored"}, "labels.x/y.z") == {"d": "4", "e": "5", "x/y.z": "v"}
    after = stat(stub, "s")
    assert after.created_at == before.created_at and after.updated_at.ToNanoseconds() > before.updated_at.ToNanoseconds()
    assert (after.kind, after.parent, after.name) == (before.kind, before.parent, before.name)


@needs_root
def test_list_filters_and_streaming(stub: Stub) -> None:
    layer(stub, "base", labels={"kind": "base", "containerd.io/gc.root": "1"})
    layer(stub, "app", "base", labels={"tier": "app"})
    prepare(stub, "work/c1", "app", tier="container")
    stub.View(pb.ViewSnapshotRequest(key="view one", parent="base", labels={"tier": "view"}))
    assert names(stub) == ["base", "app", "work/c1", "view one"]
    assert names(stub, "name==app") == ["app"]
    assert names(stub, "kind==committed") == ["base", "app"]
    assert names(stub, "kind==active", "kind==view") == ["work/c1", "view one"]  # OR
    assert names(stub, "parent==app", "name==base") == ["base", "work/c1"]
    assert names(stub, "kind==committed,labels.tier==app") == ["app"]  # AND
    assert names(stub, "labels.tier") == ["app", "work/c1", "view one"]  # presence
    assert names(stub, "labels.tier!=app") == ["base", "work/c1", "view one"]
    assert names(stub, 'labels."containerd.io/gc.root"') == ["base"]
    assert names(stub, "name~=^w.*1$") == ["work/c1"]
    assert names(stub, "name==nothing") == []

    for i in range(2 * LIST_BATCH + 37):
        prepare(stub, f"many/{i:04d}", "base", n=str(i))
    batches = [len(r.info) for r in stub.List(pb.ListSnapshotsRequest())]
    assert batches == [LIST_BATCH, LIST_BATCH, 41]  # 237 + 4
    many = names(stub, "name~=^many/")
    assert many == [f"many/{i:04d}" for i in range(2 * LIST_BATCH + 37)]
    assert [len(r.info) for r in stub.List(pb.ListSnapshotsRequest(filters=["kind==committed"]))] == [2]


@needs_root
def test_concurrent_clients(stub: Stub, server: SnapshotterServer) -> None:
    layer(stub, "base", files={"f": "base\n"})
    threads, rounds = 16, 12

    def worker(t: int) -> list[str]:
        # a channel per thread, as several containerd goroutines share one connection or not
        with server.channel() as ch:
            s = server.stub(ch)
            parent = "base"
            done = []
            for r in range(rounds):
                key, name = f"t{t}/active/{r}", f"t{t}/layer/{r}"
                prepare(s, key, parent, t=str(t))
                assert stat(s, key).parent == parent
                s.Usage(pb.UsageRequest(key=key))
                commit(s, name, key, r=str(r))
                assert stat(s, name).kind == pb.COMMITTED
                names(s, f"labels.r=={r}")
                parent = name
                done.append(name)
            return done

    with futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(worker, range(threads)))
    listed = set(names(stub))
    assert all(set(r) <= listed for r in results)
    assert len(listed) == 1 + threads * rounds
    chain = [stat(stub, f"t3/layer/{r}").parent for r in range(rounds)]
    assert chain == ["base"] + [f"t3/layer/{r}" for r in range(rounds - 1)]
    assert "Traceback" not in server.log_text()


@needs_root
def test_restart_keeps_everything(tmp_path: Path, server: SnapshotterServer, stub: Stub) -> None:
    layer(stub, "base", files={"f": "x" * 10000}, labels={"keep": "me"})
    layer(stub, "mid", "base")
    prepare(stub, "c 1", "mid", who="container")
    stub.View(pb.ViewSnapshotRequest(key="v", parent="base"))
    before = {n: stat(stub, n) for n in names(stub)}
    mounts_before = list(stub.Mounts(pb.MountsRequest(key="c 1")).mounts)
    usage_before = stub.Usage(pb.UsageRequest(key="base"))

    assert server.stop() == 0  # SIGTERM: a clean exit
    assert not server.address.exists(), "the socket is removed on shutdown"
    assert "SIGTERM: shutting down" in server.log_text()
    server.start()
    with server.channel() as ch:
        again = server.stub(ch)
        assert {n: stat(again, n) for n in names(again)} == before
        assert list(again.Mounts(pb.MountsRequest(key="c 1")).mounts) == mounts_before
        assert again.Usage(pb.UsageRequest(key="base")) == usage_before
        commit(again, "c1-done", "c 1")
        assert stat(again, "c1-done").parent == "mid"


@needs_root
def test_sigterm_finishes_calls_in_flight(tmp_path: Path, server: SnapshotterServer, stub: Stub) -> None:
    layer(stub, "base")
    # Hold the store's exclusive lock (as `layerfs fsck --repair` would): a Prepare waits for it.
    other = Store(str(server.root))
    result: dict[str, object] = {}
    with other.exclusive_lock():
        def call() -> None:
            try:
                result["mounts"] = prepare(stub, "late", "base")
            except grpc.RpcError as e:
                result["error"] = e

        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 10
        while "Prepare 'late'" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None, "the server must wait for the call in flight"
    t.join(20)
    other.close()
    assert "error" not in result and len(result["mounts"]) == 1  # type: ignore[arg-type]
    assert server.wait() == 0
    assert not server.address.exists()
    server.start()
    with server.channel() as ch:
        assert stat(server.stub(ch), "late").kind == pb.ACTIVE


@needs_root
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_taken_by_another_thread_stops_the_server(server: SnapshotterServer, stub: Stub,
                                                           signum: int) -> None:
    """A process-wide signal may land in any thread (the kernel prefers the main thread, not
    always): grpc's and the workers' threads too. Python runs its handler in the main thread
    only, and a main thread blocked waiting is not woken by a signal another thread took, so
    the server once ignored SIGTERM until it was killed. Sent here to each thread in turn
    that is not the main one (kill(2) on a thread id tries that thread first)."""
    layer(stub, "base")
    assert server.proc is not None
    pid = server.proc.pid
    threads = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert threads, "grpc serves from threads of its own"
    os.kill(threads[-1], signum)
    assert server.wait(10) == 0, server.log_text()
    assert f"{signal.Signals(signum).name}: shutting down" in server.log_text()
    assert not server.address.exists()


@needs_root
def test_a_second_signal_aborts_the_calls_in_flight(server: SnapshotterServer, stub: Stub) -> None:
    """SIGTERM waits for the calls in flight; a second one (here taken by a thread other than
    the main one) aborts them: the client gets an error at once, and the server exits once the
    worker, blocked on the store lock, is done."""
    layer(stub, "base")
    other = Store(str(server.root))
    result: dict[str, object] = {}
    assert server.proc is not None
    pid = server.proc.pid
    with other.exclusive_lock():
        def call() -> None:
            try:
                result["mounts"] = prepare(stub, "late", "base")
            except grpc.RpcError as e:
                result["error"] = e.code()

        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 10
        while "Prepare 'late'" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        while "SIGTERM: shutting down" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.proc.poll() is None and t.is_alive(), "the first signal waits for the call"
        threads = sorted(int(x) for x in os.listdir(f"/proc/{pid}/task") if int(x) != pid)
        os.kill(threads[-1], signal.SIGTERM)
        t.join(10)
        assert not t.is_alive() and "mounts" not in result, result
        assert "SIGTERM again: aborting the calls in flight" in server.log_text()
    other.close()
    assert server.wait(20) == 0, server.log_text()
    assert not server.address.exists()


@needs_root
def test_stale_socket_is_replaced_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed server leaves
    srv = SnapshotterServer(tmp_path, tmp_path / "store", address=path).start()
    try:
        second = SnapshotterServer(tmp_path, tmp_path / "store", address=path).command()
        r = subprocess.run(second, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and f"another server is listening on {path}" in r.stderr
        with srv.channel() as ch:
            assert names(srv.stub(ch)) == []  # the first one still serves
    finally:
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGINT)  # ^C stops it as cleanly as SIGTERM
        assert srv.wait() == 0
    assert not path.exists() and "SIGINT: shutting down" in srv.log_text()
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("precious")
    third = SnapshotterServer(tmp_path, tmp_path / "store", address=not_a_socket).command()
    r = subprocess.run(third, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "is not a socket: refusing to replace it" in r.stderr
    assert not_a_socket.read_text() == "precious"
