"""Container and mount records: the ``containers`` and ``mounts`` tables.

- ``ContainerRecords`` (``Store.containers``): the row that makes an active snapshot a
  container: its name, the image it was created from and that image's manifest and config
  digests (kept for ``commit`` even if the image's name is removed). ``Store.create_container``
  and ``Store.remove_container`` write it in the same transaction as the snapshot.
- ``MountRecords`` (``Store.mounts``): what layerfs mounted, so that ``rmi``/``gc``/``rm``
  refuse to remove what is in use. ``snapshot_key`` is a container's active snapshot or an
  image's top ChainID.

A mount record is *stale* when it was made in another boot (``/proc/sys/kernel/random/boot_id``
differs), or when its target is not a mount point and its pid (the mounting process while
the record is pending, the daemon for FUSE) is gone. Stale records are dropped whenever
records are listed, and by the store before rmi, gc and container removal check what is
mounted, so a stale record never pins layers, containers or mount points.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from layerfs.digest import Digest
from layerfs.errors import AlreadyExists, InUse
from layerfs.linux.mountinfo import mount_table
from layerfs.linux.proc import boot_id, pid_alive
from layerfs.store.schema import Metadata


@dataclass(frozen=True)
class MountRecord:
    target: str
    snapshot_key: str
    backend: str
    readonly: bool
    pid: int | None
    boot_id: str
    created_ns: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> MountRecord:
        return cls(row["target"], row["snapshot_key"], row["backend"], bool(row["readonly"]), row["pid"],
                   row["boot_id"], row["created_ns"])


@dataclass(frozen=True)
class ContainerRecord:
    name: str
    image: str
    manifest_digest: Digest
    config_digest: Digest
    snapshot_id: int
    created_ns: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ContainerRecord:
        return cls(row["name"], row["image"], Digest(row["manifest_digest"]), Digest(row["config_digest"]),
                   row["snapshot_id"], row["created_ns"])


def describe_mount(rec: MountRecord) -> str:
    """``kernel, pid -`` / ``fuse, pid 123``: how a mount is served, for messages."""
    return f"{rec.backend}, pid {rec.pid if rec.pid is not None else '-'}"


def _mount_points() -> set[str]:
    """Every mount point of the calling process (``/proc/self/mountinfo``)."""
    return {m.mount_point for m in mount_table()}


class MountRecords:
    """The ``mounts`` table of one store (``Store.mounts``)."""

    def __init__(self, meta: Metadata) -> None:
        self.meta = meta

    def live(self, prune: bool = True) -> list[MountRecord]:
        """Live mount records, by target; stale ones are dropped (with ``prune``)."""
        rows = self.meta.db.execute("SELECT * FROM mounts ORDER BY target").fetchall()
        live: list[MountRecord] = []
        stale: list[MountRecord] = []
        if rows:
            points, boot = _mount_points(), boot_id()
            for r in rows:
                rec = MountRecord.from_row(r)
                # A record is made before its mount exists and carries the pid of the process
                # making it until then: while that lives, it is pending, not stale. A FUSE
                # record keeps its daemon's pid.
                alive = rec.boot_id == boot and (rec.target in points or pid_alive(rec.pid))
                (live if alive else stale).append(rec)
        # Dropping stale records is tidying, never needed for the answer: not inside a
        # read transaction (a reader must not write), and not an error when the database
        # cannot be written (a full disk, a read-only store)
        if prune and stale and not self.meta.in_transaction():
            try:
                with self.meta.transaction() as db:
                    db.executemany("DELETE FROM mounts WHERE target=?", [(r.target,) for r in stale])
            except sqlite3.OperationalError:
                pass
        return live

    def prune(self) -> None:
        """Drop stale records (see the module docstring)."""
        self.live(prune=True)

    def get(self, target: str) -> MountRecord | None:
        """The record of ``target`` (stale or not), or None."""
        row = self.meta.db.execute("SELECT * FROM mounts WHERE target=?", (target,)).fetchone()
        return None if row is None else MountRecord.from_row(row)

    def target_of(self, snapshot_key: str) -> str | None:
        """Where snapshot ``snapshot_key`` is mounted (one target if several), or None."""
        row = self.meta.db.execute("SELECT target FROM mounts WHERE snapshot_key=?", (snapshot_key,)).fetchone()
        return None if row is None else str(row["target"])

    def add(self, rec: MountRecord, what: str | None = None) -> None:
        """Record ``rec``; AlreadyExists when its target has a record already, and, for a
        read-write ``rec``, InUse when its snapshot has a live read-write record (mounted,
        or being mounted by a live process): one writer per upper. Checked and written in
        one transaction, so two concurrent mounts cannot both pass."""
        with self.meta.transaction() as db:
            if db.execute("SELECT 1 FROM mounts WHERE target=?", (rec.target,)).fetchone():
                raise AlreadyExists(f"{rec.target} already has a layerfs mount")
            if not rec.readonly:
                rows = db.execute("SELECT * FROM mounts WHERE snapshot_key=? AND readonly=0 ORDER BY created_ns",
                                  (rec.snapshot_key,)).fetchall()
                points, boot = (_mount_points(), boot_id()) if rows else (set(), "")
                for r in rows:
                    other = MountRecord.from_row(r)
                    if other.boot_id == boot and (other.target in points or pid_alive(other.pid)):
                        raise InUse(f"{what or 'snapshot ' + rec.snapshot_key} is already mounted read-write at {other.target} "
                                    f"({describe_mount(other)}): one read-write mount at a time; "
                                    f"unmount it first (layerfs umount {other.target})")
                    db.execute("DELETE FROM mounts WHERE target=?", (other.target,))  # stale
            db.execute("INSERT INTO mounts VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (rec.target, rec.snapshot_key, rec.backend, int(rec.readonly), rec.pid, rec.boot_id,
                        rec.created_ns))

    def update(self, target: str, backend: str, pid: int | None) -> None:
        """Set the backend and pid of ``target``'s record (once its mount is live)."""
        with self.meta.transaction() as db:
            db.execute("UPDATE mounts SET backend=?, pid=? WHERE target=?", (backend, pid, target))

    def remove(self, target: str) -> None:
        with self.meta.transaction() as db:
            db.execute("DELETE FROM mounts WHERE target=?", (target,))


class ContainerRecords:
    """The ``containers`` table of one store (``Store.containers``)."""

    def __init__(self, meta: Metadata) -> None:
        self.meta = meta

    def get(self, name: str) -> ContainerRecord | None:
        row = self.meta.db.execute("SELECT * FROM containers WHERE name=?", (name,)).fetchone()
        return None if row is None else ContainerRecord.from_row(row)

    def all(self) -> list[ContainerRecord]:
        """Every container, by name."""
        return [ContainerRecord.from_row(r) for r in self.meta.db.execute("SELECT * FROM containers ORDER BY name")]

    def created_from(self, image: str) -> str | None:
        """The name of a container created from image ``image`` (one if several), or None."""
        row = self.meta.db.execute("SELECT name FROM containers WHERE image=?", (image,)).fetchone()
        return None if row is None else str(row["name"])

    def insert(self, db: sqlite3.Connection, rec: ContainerRecord) -> None:
        """Add ``rec`` inside the open transaction ``db`` (the one creating its snapshot)."""
        db.execute("INSERT INTO containers VALUES (?, ?, ?, ?, ?, ?)",
                   (rec.name, rec.image, rec.manifest_digest, rec.config_digest, rec.snapshot_id, rec.created_ns))

    def delete(self, db: sqlite3.Connection, name: str) -> None:
        """Drop container ``name`` inside the open transaction ``db`` (the one removing its snapshot)."""
        db.execute("DELETE FROM containers WHERE name=?", (name,))
