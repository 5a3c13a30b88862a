"""SQLite metadata: the store's source of truth.

Owns the schema of ``meta.db`` (WAL mode). Tables:

- ``meta(k, v)``: schema version and the store's layer format (``opaque_xattr``,
  ``device_whiteouts``), fixed when the store is created.
- ``snapshots``: one row per snapshot (containerd's model). ``id`` names the directory
  ``snapshots/<id>``; ``key`` is containerd's key (active/view) or name (committed; image
  layers are named by their OCI ChainID); ``parent_id`` links the chain; ``diff_id`` is set
  on committed image layers; ``size``/``inodes`` are measured at commit.
- ``snapshot_labels(snapshot_id, k, v)``.
- ``blobs(digest, size, media_type, diff_id)``: what the content store holds; ``diff_id`` is the
  uncompressed digest of a layer blob.
- ``images(name, manifest_digest, config_digest, top_chain_id, created_ns)`` and
  ``image_blobs(name, digest)``: an image is a name pointing at a manifest; its blobs are
  listed so gc needs no JSON parsing.
- ``containers(name, image, manifest_digest, config_digest, snapshot_id)``: a writable
  container is an active snapshot over its image's top layer; the image's manifest and
  config are kept (for commit) even if the image name is removed.
- ``mounts(target, snapshot_key, backend, readonly, pid, boot_id)``: what layerfs mounted,
  so rmi/gc refuse to remove layers in use. ``snapshot_key`` is a container's active
  snapshot or an image's top ChainID; a record from another boot is stale.

All writes go through ``Metadata.transaction()`` (``BEGIN IMMEDIATE``), so several processes
may use one store: SQLite serialises writers and the WAL lets readers go on. Reads that must
see one state (the snapshotter's Stat, List, Mounts) run in ``Metadata.read_transaction()``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator

from layerfs.errors import StoreError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
    parent_id INTEGER REFERENCES snapshots(id),
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    diff_id TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS snapshot_labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    k TEXT NOT NULL,
    v TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, k)
);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    diff_id TEXT,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY,
    manifest_digest TEXT NOT NULL,
    config_digest TEXT NOT NULL,
    top_chain_id TEXT,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS containers (
    name TEXT PRIMARY KEY,
    image TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    config_digest TEXT NOT NULL,
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id),
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mounts (
    target TEXT PRIMARY KEY,
    snapshot_key TEXT NOT NULL,
    backend TEXT NOT NULL,
    readonly INTEGER NOT NULL,
    pid INTEGER,
    boot_id TEXT NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS image_blobs (
    name TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    PRIMARY KEY (name, digest)
);
"""


# what SQLite says when it cannot grow meta.db, its WAL or its shared-memory file
_SPACE_MESSAGES = ("database or disk is full", "disk I/O error")


def is_space_error(e: BaseException) -> bool:
    """Whether ``e`` (or what it was raised from) is SQLite failing for want of disk space
    (an I/O error counts: the shared-memory file cannot grow on a full disk)."""
    while e is not None:
        if isinstance(e, sqlite3.OperationalError) and any(m in str(e) for m in _SPACE_MESSAGES):
            return True
        e = e.__cause__  # type: ignore[assignment]
    return False


def now_ns() -> int:
    return time.time_ns()


class Metadata:
    """A connection to ``meta.db``. One per Store object; not shared between threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(path, timeout=60.0, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            with self.transaction():
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                row = self.db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()
                if row is None:
                    self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                elif int(row["v"]) > SCHEMA_VERSION:
                    raise StoreError(
                        f"{path}: store schema {row['v']} is newer than this layerfs ({SCHEMA_VERSION})"
                    )
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open store database {path}: {e}") from e

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; commits on success, rolls back on any exception.
        A database that cannot be written for want of space is a one-line ``StoreError``."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                if self.db.in_transaction:  # (SQLite may have rolled back already)
                    self.db.execute("ROLLBACK")
                raise
            else:
                self.db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            if is_space_error(e):
                raise StoreError(f"cannot write the store database {self.path}: {e} (is its disk full?)") from e
            raise

    @contextlib.contextmanager
    def read_transaction(self) -> Iterator[None]:
        """One read transaction (``BEGIN``, deferred): every query inside sees the same
        state of the database. Ends with ``COMMIT`` however the block ends (nothing to undo).
        Inside a transaction already, it is that one (nested reads share its state)."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            # the first read fixes the state this transaction sees (WAL snapshot)
            self.db.execute("SELECT 1 FROM meta LIMIT 1").fetchall()
            yield
        finally:
            self.db.execute("COMMIT")

    def in_transaction(self) -> bool:
        return self.db.in_transaction

    def data_version(self) -> int:
        """A number that changes whenever another connection committed (``PRAGMA data_version``)."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def get_meta(self, k: str) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return None if row is None else str(row["v"])

    def close(self) -> None:
        self.db.close()
