"""containerd's snapshot API over the layerfs store, with containerd's rules exactly.

Vocabulary (containerd ``core/snapshots``): an *active* snapshot (``key``) is writable; a
*view* (``key``) is a read-only active snapshot; ``commit`` turns an active snapshot into
a *committed* one (``name``), which can only be a parent. ``mounts`` *describes* how to
mount a snapshot (``MountSpec``); nothing here mounts anything.

Keys and names are arbitrary strings (containerd's contain ``/`` and spaces): they live
only in the database, under this snapshotter's namespace prefix; directories are numbered
by the store. Rules, errors (``layerfs.errors``, mapped to gRPC codes by the service):

- ``prepare``/``view``: key exists -> AlreadyExists; parent missing -> NotFound; parent
  not committed -> InvalidArgument.
- ``commit``: name exists -> AlreadyExists; key missing -> NotFound; key not active ->
  FailedPrecondition; labels are replaced by the ones given (not inherited); the key is
  gone afterwards; size and inodes are measured and stored; the committed snapshot's
  ``created`` and ``updated`` are both the commit's time (containerd's storage does so).
- ``remove``: has children -> FailedPrecondition (``cannot remove snapshot KEY: ...``).
- ``mounts``: committed -> FailedPrecondition.
- ``update``: no field paths, or ``labels``, replaces all labels; ``labels.K`` sets (or with
  no value, deletes) one; any other path -> InvalidArgument. ``updated`` moves, ``created``
  does not.
- ``usage``: this snapshot only; active measured on disk, committed as stored at commit.

Every error names the keys as the client sent them, never the store's namespace-prefixed
ones (``_client_keys`` rewrites the store's messages).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from layerfs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, LayerfsError, NotFound
from layerfs.mount import fuse
from layerfs.mount.backend import for_format
from layerfs.mount.spec import OVERLAY, MountSpec, snapshot_spec
from layerfs.store import Snapshot, Store
from layerfs.store import disk_usage as store_disk_usage
from layerfs.store.fsck import fsck
from snapshotter import filters

KINDS = ("active", "view", "committed")


@dataclass(frozen=True)
class Info:
    """containerd's snapshots.Info."""

    kind: str
    name: str
    parent: str
    labels: dict[str, str] = field(default_factory=dict)
    created: _dt.datetime | None = None
    updated: _dt.datetime | None = None


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


def _time(ns: int) -> _dt.datetime:
    """Nanoseconds since the epoch as a UTC datetime, truncated to its microsecond (exact:
    no float rounding, so equal times stay equal and never move past their nanosecond)."""
    return _dt.datetime.fromtimestamp(ns // 1_000_000_000, _dt.UTC).replace(microsecond=ns % 1_000_000_000 // 1000)


def disk_usage(path: str) -> Usage:
    return Usage(*store_disk_usage(path))


class Snapshotter:
    """Snapshots of one namespace of a layerfs store.

    ``backend`` chooses the mount type ``mounts`` describes: ``kernel`` (``overlay``/``bind``)
    or ``fuse``: overlays as ``fuse3.PROGRAM`` with the same options, ``PROGRAM`` the absolute
    path of the ``layerfs-fuse`` program (``fuse_program``, default
    ``layerfs.mount.fuse.program_path()``), so that whoever mounts them (containerd, its
    shims, ``ctr``: ``mount.fuse3 ... -t PROGRAM``) needs no PATH of ours.
    """

    def __init__(self, store: Store, *, namespace: str = "snapshotter", backend: str = "kernel",
                 fuse_program: str | None = None) -> None:
        if backend not in ("kernel", "fuse"):
            raise InvalidArgument(f"unknown backend {backend!r} (kernel or fuse)")
        self.store = store
        self.prefix = f"{namespace}/"
        self.backend = backend
        self.fuse_program = (fuse_program or fuse.program_path()) if backend == "fuse" else None
        self.closed = False

    # -- names -------------------------------------------------------------------------
    def _db_key(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise InvalidArgument("snapshot key must be a non-empty string")
        return self.prefix + key

    def _get(self, key: str) -> Snapshot:
        self._check_open()
        snap = self.store.get_snapshot(self._db_key(key))
        if snap is None:
            raise NotFound(f"snapshot {key} does not exist")
        return snap

    @contextlib.contextmanager
    def _client_keys(self, *keys: str) -> Iterator[None]:
        """Store errors name the store's keys (this namespace's prefix + the client's key):
        re-raise them naming ``keys`` as the client sent them."""
        try:
            yield
        except LayerfsError as e:
            names = sorted({k for k in keys if k}, key=len, reverse=True)  # the longest match first
            if names and e.args and isinstance(e.args[0], str):
                pattern = "|".join(re.escape(self.prefix + k) for k in names)
                e.args = (re.sub(pattern, lambda m: m.group(0)[len(self.prefix):], e.args[0]), *e.args[1:])
            raise

    def _check_open(self) -> None:
        if self.closed:
            raise FailedPrecondition("snapshotter is closed")

    def _info(self, snap: Snapshot) -> Info:
        parent = ""
        if snap.parent_id is not None:
            parent = self.store.snapshot_by_id(snap.parent_id).key.removeprefix(self.prefix)
        return Info(snap.kind, snap.key.removeprefix(self.prefix), parent, self.store.labels(snap.id),
                    _time(snap.created_ns), _time(snap.updated_ns))

    # -- the API -------------------------------------------------------------------------
    def stat(self, key: str) -> Info:
        return self._info(self._get(key))

    def update(self, info: Info, *fieldpaths: str) -> Info:
        snap = self._get(info.name)
        labels = dict(self.store.labels(snap.id))
        if not fieldpaths:
            fieldpaths = ("labels",)
        for path in fieldpaths:
            if path == "labels":
                labels = dict(info.labels)
            elif path.startswith("labels."):
                k = path[len("labels."):]
                if k in info.labels:
                    labels[k] = info.labels[k]
                else:
                    labels.pop(k, None)
            else:
                raise InvalidArgument(f"cannot update field {path!r} of snapshot {info.name} (only labels)")
        self.store.set_labels(snap, labels)
        return self.stat(info.name)

    def usage(self, key: str) -> Usage:
        snap = self._get(key)
        if snap.kind == "committed":
            return Usage(snap.size, snap.inodes)
        return disk_usage(self.store.fs_dir(snap.id))

    def mounts(self, key: str) -> list[MountSpec]:
        snap = self._get(key)
        if snap.kind == "committed":
            raise FailedPrecondition(f"snapshot {key} is committed: mount an active snapshot or a view of it")
        return [self._describe(snap)]

    def _parents(self, snap: Snapshot) -> list[Snapshot]:
        out = []
        cur = snap
        while cur.parent_id is not None:
            cur = self.store.snapshot_by_id(cur.parent_id)
            out.append(cur)
        return out

    def _describe(self, snap: Snapshot) -> MountSpec:
        """containerd's rules (``snapshot_spec``): a snapshot without parents is a bind mount
        of its own directory; a view is its parents alone, read-only; an active snapshot is
        its directory over its parents."""
        layers = [self.store.fs_dir(p.id) for p in self._parents(snap)]
        fs = self.store.fs_dir(snap.id)
        if snap.kind == "view":
            spec = snapshot_spec(layers, None if layers else fs, readonly=True)
        else:
            spec = snapshot_spec(layers, fs, self.store.work_dir(snap.id))
        spec = for_format(spec, self.store.fmt)  # a userxattr store's overlays get userxattr
        if self.fuse_program is not None and spec.type == OVERLAY:
            return spec.as_fuse(self.fuse_program)
        return spec

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[MountSpec]:
        return self._create(key, parent, "active", labels)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[MountSpec]:
        return self._create(key, parent, "view", labels)

    def _create(self, key: str, parent: str, kind: str, labels: Mapping[str, str] | None) -> list[MountSpec]:
        self._check_open()
        db_key = self._db_key(key)
        if self.store.get_snapshot(db_key) is not None:
            raise AlreadyExists(f"snapshot {key} already exists")
        with self._client_keys(key, parent):
            snap = self.store.create_active(db_key, self._db_key(parent) if parent else None, kind=kind,
                                            labels=dict(labels or {}))
        if not parent:
            # containerd: the root of prepare(key, "") is a 0755 directory
            os.chmod(self.store.fs_dir(snap.id), 0o755)
        return [self._describe(snap)]

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        snap = self._get(key)
        db_name = self._db_key(name)
        if snap.kind != "active":
            raise FailedPrecondition(f"snapshot {key} is {snap.kind}: only active snapshots can be committed")
        # measures size and inodes, replaces the labels, sets created = updated = now, drops the workdir
        with self._client_keys(key, name):
            self.store.commit_snapshot(snap, db_name, dict(labels or {}))

    def remove(self, key: str) -> None:
        self._get(key)
        with self._client_keys(key):  # e.g. "cannot remove snapshot KEY: it has children"
            self.store.remove_snapshot(self._db_key(key))

    def walk(self, fn: Callable[[Info], None], *filter_strings: str) -> None:
        """Call ``fn`` for every snapshot matching any of the filters (all when none given).
        ``fn`` may call ``stat`` (the listing is read before the first call)."""
        self._check_open()
        parsed = filters.parse_all(filter_strings)
        infos = [self._info(snap) for snap in self.store.list_snapshots(prefix=self.prefix)]
        for info in infos:
            if filters.match_any(parsed, _adaptor(info)):
                fn(info)

    def infos(self, *filter_strings: str) -> list[Info]:
        """``walk`` into a list."""
        out: list[Info] = []
        self.walk(out.append, *filter_strings)
        return out

    def cleanup(self) -> list[str]:
        """Remove directories and staging the database does not know (containerd's Cleanup)."""
        self._check_open()
        report = fsck(self.store, repair=True)
        return [f.problem for f in report.findings if f.repaired]

    def close(self) -> None:
        self.closed = True


def _adaptor(info: Info) -> filters.Adaptor:
    def get(path: list[str]) -> str | None:
        if not path:
            return None
        head = path[0]
        if head == "name" and len(path) == 1:
            return info.name
        if head == "parent" and len(path) == 1:
            return info.parent
        if head == "kind" and len(path) == 1:
            return info.kind
        if head == "labels" and len(path) >= 2:
            return info.labels.get(".".join(path[1:]))
        return None

    return get
