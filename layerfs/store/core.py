"""The layer store: snapshots, blobs and images under one root, changed atomically.

Layout (ARCHITECTURE.md has the whole store format)::

    $ROOT/ (0700)
      meta.db            SQLite (WAL): the source of truth (layerfs.store.schema)
      lock               flock: shared for imports, exclusive for gc/fsck/rmi
      blobs/sha256/<hex> verified blobs (layerfs.store.content)
      snapshots/<id>/fs  layer or upper contents, overlayfs on-disk format
      snapshots/<id>/work overlay workdir (active snapshots)
      tmp/               staging (new-*, ingest-*): garbage after a crash
      reserve            room for the commands that free space on a full disk (``make_room``)

``Store`` owns snapshots (layers, uppers, their labels), blobs and images; the records of
containers and mounts are its ``containers`` and ``mounts`` (``layerfs.store.records``).
Collecting garbage (``layerfs.store.garbage``) and checking (``layerfs.store.fsck``) work on
a ``Store``; this module imports neither.

Lifecycle of a change: stage files under ``tmp/``; open one SQLite transaction; insert the
rows; rename the staged directories into ``snapshots/<id>``; commit. A crash before the
commit leaves directories the database does not know (fsck removes them); deleting is done
after the commit, so a crash there leaves only orphans as well. Nothing committed is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from layerfs import failpoint
from layerfs.digest import Digest
from layerfs.errors import AlreadyExists, FailedPrecondition, InUse, InvalidArgument, NotFound, StoreError
from layerfs.store.content import ContentStore, Ingest, fsync_dir
from layerfs.store.records import ContainerRecord, ContainerRecords, MountRecords
from layerfs.store.schema import Metadata, is_space_error, now_ns
from layerfs.text import human_size
from layerfs.union import whiteout

IMAGE_LAYER_LABEL = "layerfs.io/image-layer"
# Room kept on the store's disk for the commands that free space (a full disk must not lock
# the user out): deleted when the disk is full, made again when there is room.
RESERVE_FILE = "reserve"
DEFAULT_RESERVE_BYTES = 8 << 20
RESERVE_SLICE = 1 << 20  # given back per full-disk episode (a quarter to open the database)


def reserve_bytes() -> int:
    """The size of the reserve file: ``LAYERFS_RESERVE_BYTES`` (0: none), default 8 MiB."""
    raw = os.environ.get("LAYERFS_RESERVE_BYTES", "").strip()
    try:
        return max(int(raw), 0) if raw else DEFAULT_RESERVE_BYTES
    except ValueError:
        raise InvalidArgument(f"LAYERFS_RESERVE_BYTES={raw!r}: expected a number of bytes") from None
_T = TypeVar("_T")


def default_root() -> str:
    env = os.environ.get("LAYERFS_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/layerfs"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "layerfs")


@dataclass(frozen=True)
class Snapshot:
    id: int
    key: str
    kind: str
    parent_id: int | None
    created_ns: int
    updated_ns: int
    size: int
    inodes: int
    diff_id: Digest | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Snapshot:
        return cls(
            row["id"], row["key"], row["kind"], row["parent_id"], row["created_ns"], row["updated_ns"],
            row["size"], row["inodes"], Digest(row["diff_id"]) if row["diff_id"] else None,
        )


@dataclass(frozen=True)
class Image:
    name: str
    manifest_digest: Digest
    config_digest: Digest
    top_chain_id: Digest | None
    created_ns: int


@dataclass
class StagedLayer:
    """A layer applied into ``tmp/new-*/fs``, waiting for ``commit_image``."""

    chain_id: Digest
    diff_id: Digest
    parent_chain_id: Digest | None
    staging: str  # tmp/new-XXXX (contains fs/)
    size: int
    inodes: int


@dataclass
class BlobRecord:
    digest: Digest
    size: int
    media_type: str
    diff_id: Digest | None = None
    staged: Ingest | None = None  # verified in tmp/, renamed in by commit_image


class Store:
    """One layer store. Cheap to open; several processes may open the same root."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_root())
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)
            for sub in ("blobs", "snapshots", "tmp"):
                os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store at {self.root}: {e.strerror}") from e
        self.tmp_dir = os.path.join(self.root, "tmp")
        try:
            self.meta = Metadata(os.path.join(self.root, "meta.db"))
        except StoreError as e:
            # a full disk: SQLite cannot make its shared-memory file; the reserve is for this
            if not (is_space_error(e) and self.release_reserve(RESERVE_SLICE // 4)):
                raise
            self.meta = Metadata(os.path.join(self.root, "meta.db"))
        self.keep_reserve()
        self.free_at_open = self._free_or_zero()
        self.content = ContentStore(os.path.join(self.root, "blobs"), self.tmp_dir)
        self.containers = ContainerRecords(self.meta)
        self.mounts = MountRecords(self.meta)
        self.fmt = self._layer_format()
        self._lock_fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self._lock_depth = 0
        self._lock_mode = 0

    def close(self) -> None:
        self.meta.close()
        os.close(self._lock_fd)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- room on a full disk --------------------------------------------------------------
    @property
    def reserve_path(self) -> str:
        return os.path.join(self.root, RESERVE_FILE)

    def free_bytes(self) -> int:
        """Bytes an unprivileged process may still write on the store's filesystem (root
        may have the blocks kept for root too, but not those ext4 keeps for itself, which
        ``f_bfree`` counts: ``f_bavail`` is the measure that errs on the safe side)."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _free_or_zero(self) -> int:
        try:
            return self.free_bytes()
        except OSError:
            return 0

    def space_note(self, needed: int | None = None) -> str:
        """For an error of a full disk: how much room there was and how much was needed
        (``needed`` when the operation knows it; else at least what was free when the
        store was opened, which it used up)."""
        now = self._free_or_zero()
        need = (f"it needs about {human_size(needed)}" if needed is not None
                else f"it needed more than the {human_size(self.free_at_open)} free when it started")
        return f"{need}, {human_size(now)} free now on the filesystem of {self.root}"

    def keep_reserve(self) -> None:
        """Make the reserve file ``reserve_bytes()`` long (allocated, not sparse) if it is
        missing or shorter, when the disk has room for what is missing twice over. Never
        an error: it is a precaution."""
        self.reserve_short = 0  # bytes the reserve still lacks (``check_room``)
        size = reserve_bytes()
        if not size:
            return
        try:
            have = os.lstat(self.reserve_path).st_blocks * 512
        except FileNotFoundError:
            have = 0
        except OSError:
            return
        if have >= size:
            return
        self.reserve_short = size - have
        try:
            if self.free_bytes() < 2 * (size - have):
                return
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
            self.reserve_short = 0
        except OSError:
            pass

    def check_room(self, what: str) -> None:
        """Before a command that adds data (import, pull, commit, create): refused, in one
        line, while the reserve is not whole and the disk has no room to make it whole (a
        freeing command used part of it and the disk is still full). The command would
        most likely fail midway, and it would use up the room that rm, rmi and gc need."""
        if not self.reserve_short:
            return
        raise StoreError(
            f"{what}: the filesystem of {self.root} is still full ({human_size(self._free_or_zero())} free; "
            f"layerfs needs {human_size(2 * self.reserve_short)} free to restore its "
            f"{human_size(reserve_bytes())} reserve for rm, rmi and gc): free space first (layerfs rm, "
            f"layerfs rmi, layerfs gc, or other files there), or set LAYERFS_RESERVE_BYTES=0")

    def release_reserve(self, amount: int = RESERVE_SLICE) -> int:
        """Give ``amount`` bytes of the reserve file back to the disk (it is cut shorter, so
        the rest stays for the next time the disk is full); the bytes freed (0: none left)."""
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return 0
        try:
            st = os.fstat(fd)
            before = st.st_blocks * 512
            os.ftruncate(fd, max(0, min(st.st_size, before) - amount))
            return max(0, before - os.fstat(fd).st_blocks * 512)
        except OSError:
            return 0
        finally:
            os.close(fd)

    def make_room(self) -> None:
        """Before an operation that frees space (umount, rm, rmi, gc, fsck --repair): on a
        disk (nearly) full, give a slice of the reserve back, so the database can record
        the change. ``keep_reserve`` makes it whole again once there is room."""
        try:
            if self.free_bytes() < RESERVE_SLICE:
                self.release_reserve(RESERVE_SLICE)
        except OSError:
            pass

    def read_transaction(self) -> contextlib.AbstractContextManager[None]:
        """One read transaction: every query inside sees the same state of the database."""
        return self.meta.read_transaction()

    def reading(self, fn: Callable[[], _T], attempts: int = 5) -> _T:
        """``fn()`` in one read transaction, so it sees one state of the database; retried
        (up to ``attempts`` times) when it fails on something that vanished (``NotFound``,
        ``StoreError``, ``FileNotFoundError``: a blob or layer directory a concurrent rmi,
        gc or rm deleted after its rows went) and another process committed meanwhile.
        Files go only after their rows, so the next state no longer lists what vanished.
        What read-only commands (images, ps, history, diff, df) run their reads in."""
        for attempt in range(attempts):
            before = self.meta.data_version()
            try:
                with self.meta.read_transaction():
                    return fn()
            except (NotFound, StoreError, FileNotFoundError):
                if attempt + 1 >= attempts or self.meta.in_transaction() or self.meta.data_version() == before:
                    raise
        raise AssertionError("unreachable")

    def _layer_format(self) -> whiteout.LayerFormat:
        opaque = self.meta.get_meta("opaque_xattr")
        if opaque is None:
            fmt = whiteout.default_format(self.tmp_dir)  # by trying what this user may write there
            with self.meta.transaction() as db:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('opaque_xattr', ?)", (fmt.opaque_xattr,))
                db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('device_whiteouts', ?)", (str(int(fmt.device_whiteouts)),)
                )
            opaque = self.meta.get_meta("opaque_xattr")
        dev = self.meta.get_meta("device_whiteouts") == "1"
        return whiteout.LayerFormat(opaque_xattr=str(opaque), device_whiteouts=dev)

    # -- locking -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self, mode: int, what: str) -> Iterator[None]:
        """flock on this Store's fd, re-entrant: a nested acquire of the same or a weaker
        mode only counts (an inner unlock must not drop the outer lock); upgrading a shared
        lock to exclusive in place is refused (it could deadlock with another upgrader)."""
        if self._lock_depth:
            if mode == fcntl.LOCK_EX and self._lock_mode != fcntl.LOCK_EX:
                raise RuntimeError("store lock: cannot upgrade a held shared lock to exclusive")
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        try:
            fcntl.flock(self._lock_fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"layerfs: waiting for the store lock ({what})", file=sys.stderr)
            fcntl.flock(self._lock_fd, mode)
        self._lock_depth, self._lock_mode = 1, mode
        try:
            yield
        finally:
            self._lock_depth = 0
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def shared_lock(self) -> contextlib.AbstractContextManager[None]:
        """Held by imports for their whole run: gc/fsck will not touch their staging."""
        return self._flock(fcntl.LOCK_SH, "another command is collecting or repairing")

    def exclusive_lock(self) -> contextlib.AbstractContextManager[None]:
        return self._flock(fcntl.LOCK_EX, "an import is running")

    @contextlib.contextmanager
    def exclusive_if_free(self) -> Iterator[bool]:
        """The exclusive store lock if nobody holds the store lock now (never waited for):
        yields True while it is held here, False (nothing held) otherwise. fsck lists the
        staging and the directories under it, so no import or creation is halfway."""
        if self._lock_depth:
            yield False
            return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        self._lock_depth, self._lock_mode = 1, fcntl.LOCK_EX
        try:
            yield True
        finally:
            self._lock_depth = 0
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def try_exclusive(self) -> bool:
        """True when no other process holds the store lock right now (checked, not kept)."""
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        return True

    # -- snapshots -----------------------------------------------------------------------
    def snapshot_dir(self, sid: int) -> str:
        return os.path.join(self.root, "snapshots", str(sid))

    def fs_dir(self, sid: int) -> str:
        return os.path.join(self.snapshot_dir(sid), "fs")

    def get_snapshot(self, key: str) -> Snapshot | None:
        row = self.meta.db.execute("SELECT * FROM snapshots WHERE key=?", (key,)).fetchone()
        return None if row is None else Snapshot.from_row(row)

    def snapshot_by_id(self, sid: int) -> Snapshot:
        row = self.meta.db.execute("SELECT * FROM snapshots WHERE id=?", (sid,)).fetchone()
        if row is None:
            raise StoreError(f"snapshot id {sid} referenced but missing")
        return Snapshot.from_row(row)

    def chain(self, key: str) -> list[Snapshot]:
        """The snapshot ``key`` and all its parents, top first."""
        snap = self.get_snapshot(key)
        if snap is None:
            raise NotFound(f"snapshot {key} not found")
        out = [snap]
        while out[-1].parent_id is not None:
            out.append(self.snapshot_by_id(out[-1].parent_id))
        return out

    def layer_dirs(self, chain_id: Digest | None) -> list[str]:
        """fs directories of a committed chain, top first (empty for no layers)."""
        if chain_id is None:
            return []
        return [self.fs_dir(s.id) for s in self.chain(chain_id)]

    def new_staging(self) -> str:
        """A fresh ``tmp/new-*`` directory with an empty ``fs/`` (mode 0755) inside."""
        path = tempfile.mkdtemp(prefix="new-", dir=self.tmp_dir)
        os.mkdir(os.path.join(path, "fs"), 0o755)
        os.chmod(os.path.join(path, "fs"), 0o755)
        return path

    def list_snapshots(self, prefix: str = "") -> list[Snapshot]:
        """Every snapshot (whose key starts with ``prefix``, case-sensitively), by id."""
        # substr, not LIKE: LIKE ignores ASCII case, and namespaces must not mix
        rows = self.meta.db.execute("SELECT * FROM snapshots WHERE substr(key, 1, ?) = ? ORDER BY id",
                                    (len(prefix), prefix))
        return [Snapshot.from_row(r) for r in rows]

    def labels(self, sid: int) -> dict[str, str]:
        rows = self.meta.db.execute("SELECT k, v FROM snapshot_labels WHERE snapshot_id=?", (sid,))
        return {r["k"]: r["v"] for r in rows}

    def set_labels(self, snap: Snapshot, labels: Mapping[str, str]) -> None:
        """Replace the labels of ``snap``; its updated time moves (strictly forward), its created time does not."""
        with self.meta.transaction() as db:
            db.execute("DELETE FROM snapshot_labels WHERE snapshot_id=?", (snap.id,))
            db.executemany("INSERT INTO snapshot_labels VALUES (?, ?, ?)", [(snap.id, k, v) for k, v in labels.items()])
            db.execute("UPDATE snapshots SET updated_ns=? WHERE id=?", (max(now_ns(), snap.updated_ns + 1), snap.id))

    def _place(self, staging: str, sid: int) -> str:
        """Rename a staged directory into ``snapshots/<sid>``; an orphan there is removed first."""
        target = self.snapshot_dir(sid)
        if os.path.lexists(target):
            # A directory the database does not know (left by a crash): garbage.
            shutil.rmtree(target)
        failpoint.fault("store.rename", target)
        os.rename(staging, target)
        return target

    def create_active(
        self,
        key: str,
        parent: str | None,
        kind: str = "active",
        labels: dict[str, str] | None = None,
    ) -> Snapshot:
        """A new active (writable) or view snapshot over the committed ``parent``.

        Its directory holds ``fs/`` (the upper, mode 0755) and ``work/`` (overlay's workdir).
        """
        if kind not in ("active", "view"):
            raise ValueError(kind)
        with self.shared_lock():  # fsck --repair must not take the staging or the new dir
            return self._create_active(key, parent, kind, None, labels)

    def create_container(self, name: str, key: str, image: Image) -> None:
        """Container ``name``: the active snapshot ``key`` over ``image``'s top layer and the
        row that owns it, in one transaction, so a crash never leaves a snapshot without it."""
        def record(db: sqlite3.Connection, sid: int) -> None:
            rec = ContainerRecord(name, image.name, image.manifest_digest, image.config_digest, sid, now_ns())
            self.containers.insert(db, rec)

        self.check_room(f"create {name}")
        with self.shared_lock():  # fsck --repair must not take the staging or the new dir
            self._create_active(key, image.top_chain_id, "active", record, None)

    def _create_active(
        self,
        key: str,
        parent: str | None,
        kind: str,
        in_txn: Callable[[sqlite3.Connection, int], None] | None,
        labels: dict[str, str] | None,
    ) -> Snapshot:
        """``create_active``; ``in_txn(db, id)`` runs inside the same transaction."""
        staging = self.new_staging()
        os.mkdir(os.path.join(staging, "work"), 0o700)
        ts = now_ns()
        try:
            with self.meta.transaction() as db:
                if db.execute("SELECT 1 FROM snapshots WHERE key=?", (key,)).fetchone():
                    raise AlreadyExists(f"snapshot {key} already exists")
                parent_id = None
                if parent is not None:
                    row = db.execute("SELECT id, kind FROM snapshots WHERE key=?", (parent,)).fetchone()
                    if row is None:
                        raise NotFound(f"parent snapshot {parent} not found")
                    if row["kind"] != "committed":
                        raise InvalidArgument(f"parent snapshot {parent} is {row['kind']}, not committed")
                    parent_id = row["id"]
                cur = db.execute(
                    "INSERT INTO snapshots (key, kind, parent_id, created_ns, updated_ns) VALUES (?, ?, ?, ?, ?)",
                    (key, kind, parent_id, ts, ts),
                )
                sid = int(cur.lastrowid or 0)
                db.executemany("INSERT INTO snapshot_labels VALUES (?, ?, ?)",
                               [(sid, k, v) for k, v in (labels or {}).items()])
                if in_txn is not None:
                    in_txn(db, sid)
                self._place(staging, sid)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.snapshot_by_id(sid)

    def remove_snapshot(self, key: str) -> None:
        """Remove a snapshot that has no children and is not mounted (files deleted after commit)."""
        self._remove_snapshot(key, None)

    def remove_container(self, name: str, key: str) -> None:
        """Remove container ``name``: its row and its active snapshot ``key``, in one
        transaction. Refused while it is mounted (stale mount records are dropped first)."""
        self.make_room()  # it frees space: it must work on a full disk
        self.mounts.prune()
        target = self.mounts.target_of(key)
        if target is not None:
            raise InUse(f"container {name} is mounted at {target}; unmount it first (layerfs umount)")
        self._remove_snapshot(key, lambda db, sid: self.containers.delete(db, name))

    def _remove_snapshot(self, key: str, in_txn: Callable[[sqlite3.Connection, int], None] | None) -> None:
        """``remove_snapshot``; ``in_txn(db, id)`` runs inside the same transaction, before the row goes.
        Under the shared store lock until the files are gone: fsck lists the snapshot
        directories only while nobody holds it, and must not take one being deleted for an orphan."""
        with self.shared_lock():
            with self.meta.transaction() as db:
                row = db.execute("SELECT id FROM snapshots WHERE key=?", (key,)).fetchone()
                if row is None:
                    raise NotFound(f"snapshot {key} not found")
                if db.execute("SELECT 1 FROM snapshots WHERE parent_id=?", (row["id"],)).fetchone():
                    raise FailedPrecondition(f"cannot remove snapshot {key}: it has children")
                target = self.mounts.target_of(key)
                if target is not None:
                    raise InUse(f"cannot remove snapshot {key}: it is mounted at {target}")
                if in_txn is not None:
                    in_txn(db, row["id"])
                db.execute("DELETE FROM snapshot_labels WHERE snapshot_id=?", (row["id"],))
                db.execute("DELETE FROM snapshots WHERE id=?", (row["id"],))
                failpoint.hit("remove.before-commit")
            failpoint.hit("remove.after-commit")
            shutil.rmtree(self.snapshot_dir(row["id"]), ignore_errors=True)

    def work_dir(self, sid: int) -> str:
        return os.path.join(self.snapshot_dir(sid), "work")

    def commit_snapshot(self, snap: Snapshot, key: str, labels: Mapping[str, str]) -> None:
        """Commit the active snapshot ``snap`` under the new key ``key`` (containerd's Commit):
        its size and inodes are measured and stored, its labels replaced by ``labels``, its
        created and updated times both set to now (the committed snapshot is a new one, as in
        containerd's storage), and its workdir (only for writable mounts) dropped once the
        commit is recorded. AlreadyExists if ``key`` is taken; NotFound if ``snap`` is gone,
        FailedPrecondition if it is no longer active (a concurrent Remove or Commit)."""
        size, inodes = disk_usage(self.fs_dir(snap.id))
        with self.meta.transaction() as db:
            row = db.execute("SELECT kind FROM snapshots WHERE id=? AND key=?", (snap.id, snap.key)).fetchone()
            if row is None:
                raise NotFound(f"snapshot {snap.key} does not exist")
            if row["kind"] != "active":
                raise FailedPrecondition(f"snapshot {snap.key} is {row['kind']}: only active snapshots can be committed")
            if db.execute("SELECT 1 FROM snapshots WHERE key=?", (key,)).fetchone():
                raise AlreadyExists(f"snapshot {key} already exists")
            ts = now_ns()
            db.execute("UPDATE snapshots SET key=?, kind='committed', created_ns=?, updated_ns=?, size=?, inodes=?"
                       " WHERE id=?", (key, ts, ts, size, inodes, snap.id))
            db.execute("DELETE FROM snapshot_labels WHERE snapshot_id=?", (snap.id,))
            db.executemany("INSERT INTO snapshot_labels VALUES (?, ?, ?)", [(snap.id, k, v) for k, v in labels.items()])
        shutil.rmtree(self.work_dir(snap.id), ignore_errors=True)

    # -- blobs ---------------------------------------------------------------------------
    def blob(self, digest: Digest) -> BlobRecord | None:
        row = self.meta.db.execute("SELECT * FROM blobs WHERE digest=?", (digest,)).fetchone()
        if row is None:
            return None
        return BlobRecord(Digest(row["digest"]), row["size"], row["media_type"],
                          Digest(row["diff_id"]) if row["diff_id"] else None)

    def has_blob(self, digest: Digest) -> bool:
        return self.blob(digest) is not None and self.content.has(digest)

    def blob_sizes(self) -> list[tuple[Digest, int, bool]]:
        """Every recorded blob: its digest, its size, and whether an image lists it."""
        rows = self.meta.db.execute(
            "SELECT digest, size, digest IN (SELECT digest FROM image_blobs) AS used FROM blobs").fetchall()
        return [(Digest(r["digest"]), int(r["size"]), bool(r["used"])) for r in rows]

    # -- images --------------------------------------------------------------------------
    def get_image(self, name: str) -> Image:
        row = self.meta.db.execute("SELECT * FROM images WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"image {name} not found")
        return self._image(row)

    def find_image(self, name: str) -> Image | None:
        try:
            return self.get_image(name)
        except NotFound:
            return None

    @staticmethod
    def _image(row: sqlite3.Row) -> Image:
        top = Digest(row["top_chain_id"]) if row["top_chain_id"] else None
        return Image(row["name"], Digest(row["manifest_digest"]), Digest(row["config_digest"]), top,
                     row["created_ns"])

    def list_images(self) -> list[Image]:
        images = [self._image(r) for r in self.meta.db.execute("SELECT * FROM images ORDER BY name")]
        failpoint.hit("store.images-listed")  # (where a reader meets a concurrent rmi, in tests)
        return images

    def commit_image(
        self,
        names: Sequence[str],
        staged: Sequence[StagedLayer],
        blobs: Iterable[BlobRecord],
        manifest_digest: Digest,
        config_digest: Digest,
        top_chain_id: Digest | None,
        image_blobs: Iterable[Digest],
    ) -> list[Digest]:
        """Record staged layers, blobs and image names in one transaction.

        Staged layers whose ChainID appeared meanwhile (a concurrent import) are dropped.
        Returns the ChainIDs that were newly committed. Names already pointing elsewhere are
        moved to the new image (like ``docker tag``).
        """
        blobs = list(blobs)
        image_blobs = sorted(set(image_blobs))
        committed: list[Digest] = []
        placed: list[str] = []
        ts = now_ns()
        with self.meta.transaction() as db:
            try:
                failpoint.hit("commit.txn-begin")
                for b in blobs:
                    if b.staged is not None and b.staged.place():
                        placed.append(self.content.path(b.digest))
                    db.execute(
                        "INSERT OR IGNORE INTO blobs (digest, size, media_type, diff_id, created_ns) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (b.digest, b.size, b.media_type, b.diff_id, ts),
                    )
                for layer in staged:
                    if db.execute("SELECT 1 FROM snapshots WHERE key=?", (layer.chain_id,)).fetchone():
                        continue
                    parent_id = None
                    if layer.parent_chain_id is not None:
                        prow = db.execute("SELECT id FROM snapshots WHERE key=?", (layer.parent_chain_id,)).fetchone()
                        if prow is None:
                            raise StoreError(f"parent layer {layer.parent_chain_id} vanished during import")
                        parent_id = prow["id"]
                    cur = db.execute(
                        "INSERT INTO snapshots (key, kind, parent_id, created_ns, updated_ns, size, inodes, diff_id)"
                        " VALUES (?, 'committed', ?, ?, ?, ?, ?, ?)",
                        (layer.chain_id, parent_id, ts, ts, layer.size, layer.inodes, layer.diff_id),
                    )
                    sid = int(cur.lastrowid or 0)
                    db.execute("INSERT INTO snapshot_labels VALUES (?, ?, 'true')", (sid, IMAGE_LAYER_LABEL))
                    failpoint.hit("commit.before-rename")
                    placed.append(self._place(layer.staging, sid))
                    failpoint.hit("commit.after-rename")
                    committed.append(layer.chain_id)
                for name in names:
                    db.execute("DELETE FROM images WHERE name=?", (name,))
                    db.execute(
                        "INSERT INTO images (name, manifest_digest, config_digest, top_chain_id, created_ns,"
                        " updated_ns) VALUES (?, ?, ?, ?, ?, ?)",
                        (name, manifest_digest, config_digest, top_chain_id, ts, ts),
                    )
                    db.executemany("INSERT INTO image_blobs VALUES (?, ?)", [(name, d) for d in image_blobs])
                failpoint.hit("commit.before-commit")
            except BaseException:
                # The transaction will roll back: what was renamed in is unknown to the
                # database. Remove it *before* the rollback releases the write lock, or a
                # writer waiting for it could reuse the id (or share a blob) and lose its files.
                for path in placed:
                    remove_path(path)
                raise
        failpoint.hit("commit.after-commit")
        fsync_dir(os.path.join(self.root, "snapshots"))
        return committed

    def tag(self, source: str, target: str) -> None:
        img = self.get_image(source)
        if target == img.name:
            return  # already so named (deleting the target first would delete the image)
        with self.meta.transaction() as db:
            db.execute("DELETE FROM images WHERE name=?", (target,))
            db.execute(
                "INSERT INTO images SELECT ?, manifest_digest, config_digest, top_chain_id, created_ns, ? "
                "FROM images WHERE name=?", (target, now_ns(), img.name))
            db.execute("INSERT INTO image_blobs SELECT ?, digest FROM image_blobs WHERE name=?", (target, img.name))


def disk_usage(path: str) -> tuple[int, int]:
    """Bytes (allocated blocks) and inodes below ``path``, hardlinks counted once — what a
    snapshot costs on disk (containerd's fs.DiskUsage measures the same way)."""
    seen: set[tuple[int, int]] = set()
    size = inodes = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            size += st.st_blocks * 512
    return size, inodes


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


__all__ = ["Store", "Snapshot", "Image", "StagedLayer", "BlobRecord", "InUse", "default_root"]
