"""Writable containers: an active snapshot over an image's top layer.

A container ``NAME`` is the row ``containers(NAME)`` plus the active snapshot
``layerfs/container/NAME`` whose ``fs/`` is the overlay upper and ``work/`` its workdir.
Its image's manifest and config digests are kept with it, so ``commit`` can build the new
image even after the image's name was removed.

``diff`` reads the upper (kernel overlayfs format: 0/0 whiteouts, opaque and redirect
xattrs) against the image's layers; ``commit`` writes the upper as a deterministic OCI
layer tar and imports the result as a new image through the same verified path as
``layerfs import`` (the parent's layers are reused, the new layer is applied afresh), so
export -> import of the new image shows the tree the container showed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sqlite3
import tempfile
from dataclasses import dataclass
from typing import Any

from layerfs import importer
from layerfs.digest import Digest
from layerfs.errors import AlreadyExists, InUse, InvalidArgument, NotFound
from layerfs.image import source as images
from layerfs.layer import changes
from layerfs.store import Image, Snapshot, Store, disk_usage
from layerfs.store.schema import now_ns

KEY_PREFIX = "layerfs/container/"
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")


@dataclass(frozen=True)
class Container:
    name: str
    image: str
    manifest_digest: Digest
    config_digest: Digest
    snapshot: Snapshot
    created_ns: int

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.name


def validate_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid container name {name!r}: use letters, digits, '_', '.', '-' (start with a letter or digit)"
        )
    return name


def _row_to_container(store: Store, row: Any) -> Container:
    return Container(row["name"], row["image"], Digest(row["manifest_digest"]), Digest(row["config_digest"]),
                     store.snapshot_by_id(row["snapshot_id"]), row["created_ns"])


def find(store: Store, name: str) -> Container | None:
    row = store.meta.db.execute("SELECT * FROM containers WHERE name=?", (name,)).fetchone()
    return None if row is None else _row_to_container(store, row)


def get(store: Store, name: str) -> Container:
    c = find(store, name)
    if c is None:
        raise NotFound(f"container {name} not found")
    return c


def list_containers(store: Store) -> list[Container]:
    return [_row_to_container(store, r) for r in store.meta.db.execute("SELECT * FROM containers ORDER BY name")]


def create(store: Store, name: str, image: Image) -> Container:
    validate_name(name)
    if find(store, name) is not None:
        raise AlreadyExists(f"container {name} already exists")
    def record(db: sqlite3.Connection, sid: int) -> None:
        db.execute("INSERT INTO containers VALUES (?, ?, ?, ?, ?, ?)",
                   (name, image.name, image.manifest_digest, image.config_digest, sid, now_ns()))

    store.create_active(KEY_PREFIX + name, image.top_chain_id, in_txn=record)
    return get(store, name)


def remove(store: Store, name: str) -> None:
    c = get(store, name)
    m = store.meta.db.execute("SELECT target FROM mounts WHERE snapshot_key=?", (c.key,)).fetchone()
    if m is not None:
        raise InUse(f"container {name} is mounted at {m['target']}; unmount it first (layerfs umount)")
    def unrecord(db: sqlite3.Connection, sid: int) -> None:
        db.execute("DELETE FROM containers WHERE name=?", (name,))

    store.remove_snapshot(c.key, in_txn=unrecord)


def lowers(store: Store, c: Container) -> list[str]:
    """The image's layer directories, top first."""
    parent = store.snapshot_by_id(c.snapshot.parent_id) if c.snapshot.parent_id is not None else None
    return store.layer_dirs(Digest(parent.key)) if parent is not None else []


def upper(store: Store, c: Container) -> str:
    return store.fs_dir(c.snapshot.id)


def diff(store: Store, c: Container) -> list[changes.Change]:
    return changes.layer_changes(upper(store, c), lowers(store, c))


def usage(store: Store, c: Container) -> tuple[int, int]:
    """Bytes and inodes used by the container's upper (hardlinks counted once)."""
    return disk_usage(upper(store, c))


def commit(store: Store, c: Container, new_ref: str, message: str | None = None,
           author: str | None = None) -> importer.ImportResult:
    """The container's changes as a new image ``new_ref`` over its image's layers."""
    ref = images.normalize_ref(new_ref)
    base_manifest = json.loads(store.content.read(c.manifest_digest))
    base_config = json.loads(store.content.read(c.config_digest))
    # the shared store lock keeps fsck --repair away from tmp/commit-* while it is in use
    with store.shared_lock(), tempfile.TemporaryDirectory(prefix="commit-", dir=store.tmp_dir) as tmp:
        tar_path = os.path.join(tmp, "layer.tar")
        with open(tar_path, "wb") as f:
            changes.write_layer_tar(upper(store, c), f, lowers(store, c))
        with open(tar_path, "rb") as f:
            diff_id = importer.hash_stream(f)
        now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        config = dict(base_config)
        config["created"] = now
        rootfs = dict(config.get("rootfs") or {"type": "layers"})
        rootfs["diff_ids"] = [*(rootfs.get("diff_ids") or []), diff_id]
        config["rootfs"] = rootfs
        entry: dict[str, Any] = {"created": now, "created_by": message or f"layerfs commit {c.name}"}
        if message:
            entry["comment"] = message
        if author:
            entry["author"] = author
            config["author"] = author
        config["history"] = [*(config.get("history") or []), entry]
        config_bytes = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
        layers = [
            images.LayerBlob(digest=Digest.parse(d["digest"]), size=int(d["size"]), media_type=d["mediaType"],
                             open=_blob_opener(store, Digest.parse(d["digest"])))
            for d in base_manifest.get("layers") or []
        ]
        layers.append(images.LayerBlob(digest=diff_id, size=os.path.getsize(tar_path),
                                       media_type=importer.MEDIA_OCI_LAYER, open=lambda: open(tar_path, "rb")))
        resolved = images.ResolvedImage(
            names=[ref], config_bytes=config_bytes, config_digest=Digest.of(config_bytes), config=config,
            manifest_bytes=None, manifest_digest=None, diff_ids=[Digest.parse(d) for d in rootfs["diff_ids"]],
            layers=layers,
        )
        return importer.import_resolved(store, resolved, [ref])


def _blob_opener(store: Store, digest: Digest) -> Any:
    return lambda: store.content.open(digest)
