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
  gone afterwards; size and inodes are measured and stored.
- ``remove``: has children -> FailedPrecondition.
- ``mounts``: committed -> FailedPrecondition.
- ``update``: no field paths, or ``labels``, replaces all labels; ``labels.K`` sets (or with
  no value, deletes) one; any other path -> InvalidArgument. ``updated`` moves, ``created``
  does not.
- ``usage``: this snapshot only; active measured on disk, committed as stored at commit.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from layerfs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from layerfs.mount.spec import WRITABLE_OVERLAY_OPTIONS, MountSpec
from layerfs.store import Snapshot, Store
from layerfs.store import disk_usage as store_disk_usage
from layerfs.store.schema import now_ns
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
    return _dt.datetime.fromtimestamp(ns / 1e9, _dt.UTC)


def disk_usage(path: str) -> Usage:
    return Usage(*store_disk_usage(path))


class Snapshotter:
    """Snapshots of one namespace of a layerfs store.

    ``backend`` chooses the mount type ``mounts`` describes: ``kernel`` (``overlay``/``bind``)
    or ``fuse`` (``fuse3.layerfs-fuse`` with the same options).
    """

    def __init__(self, store: Store, *, namespace: str = "snapshotter", backend: str = "kernel") -> None:
        if backend not in ("kernel", "fuse"):
            raise InvalidArgument(f"unknown backend {backend!r} (kernel or fuse)")
        self.store = store
        self.prefix = f"{namespace}/"
        self.backend = backend
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
        with self.store.meta.transaction() as db:
            db.execute("DELETE FROM snapshot_labels WHERE snapshot_id=?", (snap.id,))
            db.executemany("INSERT INTO snapshot_labels VALUES (?, ?, ?)", [(snap.id, k, v) for k, v in labels.items()])
            db.execute("UPDATE snapshots SET updated_ns=? WHERE id=?", (max(now_ns(), snap.updated_ns + 1), snap.id))
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
        parents = self._parents(snap)
        fs = self.store.fs_dir(snap.id)
        if snap.kind == "view":
            if not parents:
                spec = MountSpec.bind(fs, readonly=True)
            elif len(parents) == 1:
                spec = MountSpec.bind(self.store.fs_dir(parents[0].id), readonly=True)
            else:
                # committed snapshots may hold redirects (renamed lower directories): follow
                # them even where the kernel's redirect_always_follow default is off
                spec = MountSpec.overlay([self.store.fs_dir(p.id) for p in parents], readonly=True,
                                         extra=("redirect_dir=follow",))
        elif not parents:
            spec = MountSpec.bind(fs, readonly=False)
        else:
            spec = MountSpec.overlay([self.store.fs_dir(p.id) for p in parents], fs, self.store.work_dir(snap.id),
                                     extra=WRITABLE_OVERLAY_OPTIONS)
        if self.backend == "fuse" and spec.type == "overlay":
            return spec.as_fuse()
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
        use = disk_usage(self.store.fs_dir(snap.id))
        with self.store.meta.transaction() as db:
            if db.execute("SELECT 1 FROM snapshots WHERE key=?", (db_name,)).fetchone():
                raise AlreadyExists(f"snapshot {name} already exists")
            ts = now_ns()
            db.execute("UPDATE snapshots SET key=?, kind='committed', updated_ns=?, size=?, inodes=? WHERE id=?",
                       (db_name, ts, use.size, use.inodes, snap.id))
            db.execute("DELETE FROM snapshot_labels WHERE snapshot_id=?", (snap.id,))
            db.executemany("INSERT INTO snapshot_labels VALUES (?, ?, ?)",
                           [(snap.id, k, v) for k, v in (labels or {}).items()])
        # the workdir is only for writable mounts; drop it after the commit is recorded
        shutil.rmtree(self.store.work_dir(snap.id), ignore_errors=True)

    def remove(self, key: str) -> None:
        self._get(key)
        self.store.remove_snapshot(self._db_key(key))

    def walk(self, fn: Callable[[Info], None], *filter_strings: str) -> None:
        """Call ``fn`` for every snapshot matching any of the filters (all when none given).
        ``fn`` may call ``stat`` (the listing is read before the first call)."""
        self._check_open()
        parsed = filters.parse_all(filter_strings)
        # substr, not LIKE: LIKE ignores ASCII case, and namespaces must not mix
        rows = self.store.meta.db.execute(
            "SELECT id FROM snapshots WHERE substr(key, 1, ?) = ? ORDER BY id",
            (len(self.prefix), self.prefix)).fetchall()
        infos = [self._info(self.store.snapshot_by_id(r["id"])) for r in rows]
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
        report = self.store.fsck(repair=True)
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
