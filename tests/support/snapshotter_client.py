"""containerd's Snapshots service called the way ``snapshotter.core.Snapshotter`` is called.

``GrpcSnapshotter(channel)`` has the core's API (``prepare``, ``view``, ``mounts``,
``commit``, ``remove``, ``stat``, ``update``, ``usage``, ``walk``, ``infos``, ``cleanup``,
``close``) and returns the core's types (``MountSpec``, ``Info``, ``Usage``), so that one
suite of behaviours (``tests.support.snapshotter_suite``) runs against both.

A failed call raises the ``layerfs.errors`` class its status code stands for, the way
containerd's errdefs turns the codes back into its own error kinds: ``NOT_FOUND`` ->
``NotFound``, ``ALREADY_EXISTS`` -> ``AlreadyExists``, ``FAILED_PRECONDITION`` ->
``FailedPrecondition``, ``INVALID_ARGUMENT`` -> ``InvalidArgument`` (the message is the
status details; the ``grpc.RpcError`` is the cause). Any other status is raised as the
``grpc.RpcError`` itself, so an INTERNAL error never passes for an expected one.

The conversions are written here, independently of ``snapshotter.service``, so a mistake in
the service's own conversions is not cancelled out by using them on both ends.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from collections.abc import Callable, Iterable, Iterator, Mapping

import grpc
from google.protobuf import field_mask_pb2

from layerfs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, LayerfsError, NotFound
from layerfs.mount.spec import MountSpec
from snapshotter.core import Info, Usage
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

# what containerd's proxy puts in the requests' snapshotter field (the server ignores it)
SNAPSHOTTER = "layerfs"

ERRORS: dict[grpc.StatusCode, type[LayerfsError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
}

KINDS = {pb.VIEW: "view", pb.ACTIVE: "active", pb.COMMITTED: "committed"}
KINDS_PB = {v: k for k, v in KINDS.items()}


def error_class(code: grpc.StatusCode) -> type[LayerfsError] | None:
    """The ``layerfs.errors`` class a status code is turned back into (None: not mapped)."""
    return ERRORS.get(code)


@contextlib.contextmanager
def errors_mapped() -> Iterator[None]:
    """Turn an ``RpcError`` with a mapped status code into its ``layerfs.errors`` class."""
    try:
        yield
    except grpc.RpcError as e:
        cls = error_class(e.code())  # type: ignore[attr-defined]
        if cls is None:
            raise
        raise cls(e.details() or "") from e  # type: ignore[attr-defined]


def _time(msg: pb.Info, name: str) -> _dt.datetime | None:
    return getattr(msg, name).ToDatetime(tzinfo=_dt.UTC) if msg.HasField(name) else None


def info_from_pb(msg: pb.Info) -> Info:
    """containerd's ``Info`` message as the core's ``Info`` (timestamps included)."""
    return Info(KINDS.get(msg.kind, ""), msg.name, msg.parent, dict(msg.labels),
                _time(msg, "created_at"), _time(msg, "updated_at"))


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=KINDS_PB.get(info.kind, pb.UNKNOWN),
                   labels=dict(info.labels))


def mounts_from_pb(mounts: Iterable[object]) -> list[MountSpec]:
    """containerd's ``types.Mount`` messages as mount descriptions (the target must be empty)."""
    out = []
    for m in mounts:
        assert m.target == "", f"the service fills in no mount target: {m}"  # type: ignore[attr-defined]
        out.append(MountSpec.from_containerd({"type": m.type, "source": m.source,  # type: ignore[attr-defined]
                                              "options": list(m.options)}))  # type: ignore[attr-defined]
    return out


class GrpcSnapshotter:
    """The ``Snapshotter`` API over a gRPC channel to ``layerfs snapshotter serve``."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub = pb_grpc.SnapshotsStub(channel)

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[MountSpec]:
        with errors_mapped():
            resp = self.stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key=key, parent=parent,
                                                               labels=dict(labels or {})))
        return mounts_from_pb(resp.mounts)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[MountSpec]:
        with errors_mapped():
            resp = self.stub.View(pb.ViewSnapshotRequest(snapshotter=SNAPSHOTTER, key=key, parent=parent,
                                                         labels=dict(labels or {})))
        return mounts_from_pb(resp.mounts)

    def mounts(self, key: str) -> list[MountSpec]:
        with errors_mapped():
            resp = self.stub.Mounts(pb.MountsRequest(snapshotter=SNAPSHOTTER, key=key))
        return mounts_from_pb(resp.mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        with errors_mapped():
            self.stub.Commit(pb.CommitSnapshotRequest(snapshotter=SNAPSHOTTER, name=name, key=key,
                                                      labels=dict(labels or {})))

    def remove(self, key: str) -> None:
        with errors_mapped():
            self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=key))

    def stat(self, key: str) -> Info:
        with errors_mapped():
            return info_from_pb(self.stub.Stat(pb.StatSnapshotRequest(snapshotter=SNAPSHOTTER, key=key)).info)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        req = pb.UpdateSnapshotRequest(snapshotter=SNAPSHOTTER, info=info_to_pb(info))
        if fieldpaths:
            req.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(fieldpaths)))
        with errors_mapped():
            return info_from_pb(self.stub.Update(req).info)

    def usage(self, key: str) -> Usage:
        with errors_mapped():
            resp = self.stub.Usage(pb.UsageRequest(snapshotter=SNAPSHOTTER, key=key))
        return Usage(resp.size, resp.inodes)

    def walk(self, fn: Callable[[Info], None], *filter_strings: str) -> None:
        """``fn`` for every listed snapshot, called while the stream is read (``fn`` may make
        calls of its own on the same channel)."""
        with errors_mapped():
            for resp in self.stub.List(pb.ListSnapshotsRequest(snapshotter=SNAPSHOTTER, filters=filter_strings)):
                for msg in resp.info:
                    fn(info_from_pb(msg))

    def infos(self, *filter_strings: str) -> list[Info]:
        out: list[Info] = []
        self.walk(out.append, *filter_strings)
        return out

    def cleanup(self) -> None:
        """Cleanup answers nothing (the core's list of what it removed goes to the server's log)."""
        with errors_mapped():
            self.stub.Cleanup(pb.CleanupRequest(snapshotter=SNAPSHOTTER))

    def close(self) -> None:
        self.channel.close()
