"""Collecting what no image needs: ``rmi`` (untag, then collect) and ``gc``.

Roots: the top layer of every image, every mounted snapshot (rmi of a mounted image
untags it only), and every snapshot that is not an image layer (containers, snapshotter
clients); their chains are kept, every other image layer goes. Blobs go when no image
lists them and no container needs them (a container keeps its image's manifest, config
and layer blobs for ``commit`` even after the image's name is gone).

Both collect under the exclusive store lock (no import is staging meanwhile) and drop stale
mount records first (``layerfs.store.records``): a stale record must not pin layers. Rows go in
one transaction; files are deleted only after it committed, so a crash leaves orphans
(``fsck --repair`` removes them), never a row without its files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from layerfs import failpoint
from layerfs.digest import Digest
from layerfs.errors import InUse, NotFound
from layerfs.store.core import IMAGE_LAYER_LABEL, Store, disk_usage


def remove_images(store: Store, names: Sequence[str], force: bool = False) -> tuple[list[Digest], list[Digest]]:
    """Untag images, then collect layers and blobs no image needs (like ``docker rmi``).

    Refused for an image that is mounted, and (unless ``force``) for one a container was
    created from; a forced removal keeps the layers the container stands on. Returns
    (layers, blobs) removed.
    """
    store.make_room()  # it frees space: it must work on a full disk
    store.mounts.prune()
    for name in names:
        img = store.get_image(name)
        target = store.mounts.target_of(str(img.top_chain_id))
        if target is not None:
            raise InUse(f"image {name} is mounted at {target}; unmount it first")
        container = store.containers.created_from(name)
        if container is not None and not force:
            raise InUse(f"image {name} is used by container {container} (remove it, or use --force)")
    with store.exclusive_lock():
        return _collect(store, untag=names)  # untag and collect in one transaction


def collect(store: Store) -> tuple[list[Digest], list[Digest]]:
    """Drop image layers and blobs no image needs (``layerfs gc``). Returns (layers, blobs) removed."""
    store.make_room()  # it frees space: it must work on a full disk
    store.mounts.prune()
    with store.exclusive_lock():
        return _collect(store)


@dataclass(frozen=True)
class GcPlan:
    """What ``gc`` would remove now (``layerfs gc --dry-run``): per layer its ChainID, its
    directory and the bytes it takes; per blob its digest and bytes (allocated blocks on
    disk, hardlinks counted once, as ``disk_usage``)."""

    layers: list[tuple[Digest, str, int]]
    blobs: list[tuple[Digest, int]]

    @property
    def bytes(self) -> int:
        return sum(n for _d, _p, n in self.layers) + sum(n for _d, n in self.blobs)


def plan(store: Store) -> GcPlan:
    """What ``collect`` would remove, read in one state of the store and changing nothing
    (no lock taken, no stale mount record dropped: a stale record still pins its layers here)."""

    def read() -> GcPlan:
        db = store.meta.db
        needed = _needed_snapshot_ids(db)
        layers = []
        for r in db.execute("SELECT id, key FROM snapshots ORDER BY id DESC").fetchall():
            if r["id"] in needed:
                continue
            d = store.snapshot_dir(r["id"])
            size = disk_usage(d)[0] + os.lstat(d).st_blocks * 512 if os.path.isdir(d) else 0  # d itself too
            layers.append((Digest(r["key"]), d, size))
        keep = _container_blobs(store)
        blobs = []
        for r in db.execute("SELECT digest FROM blobs WHERE digest NOT IN (SELECT digest FROM image_blobs) "
                            "ORDER BY digest").fetchall():
            if r["digest"] in keep:
                continue
            try:
                size = os.lstat(store.content.path(Digest(r["digest"]))).st_blocks * 512
            except FileNotFoundError:
                size = 0
            blobs.append((Digest(r["digest"]), size))
        return GcPlan(layers, blobs)

    return store.reading(read)


def _needed_snapshot_ids(db: sqlite3.Connection) -> set[int]:
    needed: set[int] = set()
    starts = [r["id"] for r in db.execute(
        "SELECT s.id FROM snapshots s JOIN images i ON i.top_chain_id = s.key")]
    # Mounted image views keep their chains (rmi of a mounted image untags it only).
    starts += [r["id"] for r in db.execute(
        "SELECT s.id FROM snapshots s JOIN mounts m ON m.snapshot_key = s.key")]
    # Every snapshot that is not an image layer (containers, snapshotter clients) is a root too.
    starts += [r["id"] for r in db.execute(
        "SELECT id FROM snapshots WHERE id NOT IN (SELECT snapshot_id FROM snapshot_labels WHERE k=?)",
        (IMAGE_LAYER_LABEL,))]
    for sid in starts:
        cur: int | None = sid
        while cur is not None and cur not in needed:
            needed.add(cur)
            row = db.execute("SELECT parent_id FROM snapshots WHERE id=?", (cur,)).fetchone()
            cur = row["parent_id"] if row else None
    return needed


def _collect(store: Store, untag: Sequence[str] = ()) -> tuple[list[Digest], list[Digest]]:
    """Remove the names ``untag``, then what no image needs, in one transaction: a crash
    leaves the store before the rmi or after it, never halfway (files go after the commit)."""
    # Mounted chains are gc roots (see ``_needed_snapshot_ids``): nothing mounted is removed.
    removed_layers: list[Digest] = []
    removed_blobs: list[Digest] = []
    dirs: list[str] = []
    with store.meta.transaction() as db:
        for name in untag:
            db.execute("DELETE FROM images WHERE name=?", (name,))
        needed = _needed_snapshot_ids(db)
        rows = db.execute("SELECT id, key FROM snapshots ORDER BY id DESC").fetchall()
        for row in rows:  # children have larger ids than their parents: delete them first
            if row["id"] in needed:
                continue
            db.execute("DELETE FROM snapshot_labels WHERE snapshot_id=?", (row["id"],))
            db.execute("DELETE FROM snapshots WHERE id=?", (row["id"],))
            removed_layers.append(Digest(row["key"]))
            dirs.append(store.snapshot_dir(row["id"]))
        keep = _container_blobs(store)
        for row in db.execute(
            "SELECT digest FROM blobs WHERE digest NOT IN (SELECT digest FROM image_blobs)"
        ).fetchall():
            if row["digest"] in keep:
                continue
            db.execute("DELETE FROM blobs WHERE digest=?", (row["digest"],))
            removed_blobs.append(Digest(row["digest"]))
        failpoint.hit("gc.before-commit")
    failpoint.hit("gc.after-commit")
    # Delete files only after the transaction committed.
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        failpoint.hit("gc.layer-deleted")
    for d in removed_blobs:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(store.content.path(d))
        failpoint.hit("gc.blob-deleted")
    return removed_layers, removed_blobs


def _container_blobs(store: Store) -> set[str]:
    """Manifest, config and layer blobs of the images containers were created from:
    ``commit`` needs them even after the image's name is gone."""
    keep: set[str] = set()
    for c in store.containers.all():
        keep.update((c.manifest_digest, c.config_digest))
        try:
            manifest = json.loads(store.content.read(c.manifest_digest))
            keep.update(str(d.get("digest")) for d in manifest.get("layers") or [])
        except (NotFound, ValueError, AttributeError):
            pass
    return keep
