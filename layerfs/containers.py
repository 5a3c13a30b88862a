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

import errno
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from layerfs import importer
from layerfs.digest import Digest
from layerfs.errors import AlreadyExists, InvalidArgument, NotFound, StoreError
from layerfs.image import source as images
from layerfs.image.config import build_config
from layerfs.image.oci import OCI_LAYER
from layerfs.layer import changes
from layerfs.store import ContainerRecord, Image, Snapshot, Store, disk_usage

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


def _container(store: Store, rec: ContainerRecord) -> Container:
    return Container(rec.name, rec.image, rec.manifest_digest, rec.config_digest,
                     store.snapshot_by_id(rec.snapshot_id), rec.created_ns)


def find(store: Store, name: str) -> Container | None:
    rec = store.containers.get(name)
    return None if rec is None else _container(store, rec)


def get(store: Store, name: str) -> Container:
    c = find(store, name)
    if c is None:
        raise NotFound(f"container {name} not found")
    return c


def list_containers(store: Store) -> list[Container]:
    return [_container(store, rec) for rec in store.containers.all()]


def create(store: Store, name: str, image: Image) -> Container:
    validate_name(name)
    if find(store, name) is not None:
        raise AlreadyExists(f"container {name} already exists")
    store.create_container(name, KEY_PREFIX + name, image)
    return get(store, name)


def remove(store: Store, name: str) -> None:
    """Remove container ``name`` and its changes; refused while it is mounted."""
    c = get(store, name)
    store.remove_container(name, c.key)


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
    store.check_room(f"commit {c.name}")
    # the layer tar and its unpacked copy: about twice the upper (checked first, so a full
    # disk is said at once and nothing is half written)
    needed = 2 * usage(store, c)[0] + (1 << 20)
    if store.free_bytes() < needed:
        raise StoreError(f"commit {c.name}: no space left on device for the new layer: {store.space_note(needed)}")
    try:
        return _commit(store, c, ref, message, author)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StoreError(f"commit {c.name}: no space left on device ({e.filename or store.tmp_dir}): "
                         f"{store.space_note(needed)}") from e


def _commit(store: Store, c: Container, ref: str, message: str | None, author: str | None) -> importer.ImportResult:
    base_manifest = json.loads(store.content.read(c.manifest_digest))
    base_config = json.loads(store.content.read(c.config_digest))
    # the shared store lock keeps fsck --repair away from tmp/commit-* while it is in use
    with store.shared_lock(), tempfile.TemporaryDirectory(prefix="commit-", dir=store.tmp_dir) as tmp:
        tar_path = os.path.join(tmp, "layer.tar")
        with open(tar_path, "wb") as f:
            changes.write_layer_tar(upper(store, c), f, lowers(store, c))
        with open(tar_path, "rb") as f:
            diff_id = importer.hash_stream(f)
        entry = {"created_by": message or f"layerfs commit {c.name}"}
        if message:
            entry["comment"] = message
        config, config_bytes = build_config(base_config, [diff_id], [entry], created_ns=time.time_ns(),
                                            author=author)
        layers = [
            images.LayerBlob(digest=Digest.parse(d["digest"]), size=int(d["size"]), media_type=d["mediaType"],
                             open=_blob_opener(store, Digest.parse(d["digest"])))
            for d in base_manifest.get("layers") or []
        ]
        layers.append(images.LayerBlob(digest=diff_id, size=os.path.getsize(tar_path),
                                       media_type=OCI_LAYER, open=lambda: open(tar_path, "rb")))
        resolved = images.ResolvedImage(
            names=[ref], config_bytes=config_bytes, config_digest=Digest.of(config_bytes), config=config,
            manifest_bytes=None, manifest_digest=None,
            diff_ids=[Digest.parse(d) for d in config["rootfs"]["diff_ids"]],
            layers=layers,
        )
        return importer.import_resolved(store, resolved, [ref])


def _blob_opener(store: Store, digest: Digest) -> Callable[[], BinaryIO]:
    return lambda: store.content.open(digest)
