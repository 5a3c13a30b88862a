"""Exporting images from the store as OCI layouts or docker archives.

Layer blobs are reused byte for byte when the content store has them, so import -> export
-> import keeps every digest. A layer whose blob the store does not have (or every layer,
with ``rebuild=True``) is written from its directory as a deterministic uncompressed OCI
tar (``changes.write_layer_tar``: OCI whiteouts, no overlay-private xattrs); its new diffID
then replaces the old one in a rewritten config, and the manifest is rewritten to match.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

from layerfs.catalog import resolve_image
from layerfs.digest import Digest
from layerfs.errors import InvalidImage, UsageError
from layerfs.image import source as images
from layerfs.image.oci import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, canonical_json
from layerfs.importer import hash_stream
from layerfs.layer import changes
from layerfs.store import Image, Store


def _blob_opener(store: Store, digest: Digest) -> Callable[[], BinaryIO]:
    return lambda: store.content.open(digest)


def _file_opener(path: str) -> Callable[[], BinaryIO]:
    return lambda: open(path, "rb")


@contextlib.contextmanager
def export_images(store: Store, imgs: Sequence[Image], rebuild: bool = False) -> Iterator[list[images.ExportImage]]:
    """ExportImage records for ``imgs``; temp files for rebuilt layers live while the block runs."""
    with tempfile.TemporaryDirectory(prefix="export-", dir=store.tmp_dir) as tmp:
        out = []
        for img in imgs:
            out.append(_export_one(store, img, tmp, rebuild))
        yield out


def _export_one(store: Store, img: Image, tmp: str, rebuild: bool) -> images.ExportImage:
    manifest_bytes = store.content.read(img.manifest_digest)
    config_bytes = store.content.read(img.config_digest)
    manifest = json.loads(manifest_bytes)
    config = json.loads(config_bytes)
    descs = manifest.get("layers") or []
    chain = list(reversed(store.chain(img.top_chain_id))) if img.top_chain_id else []
    if len(descs) != len(chain):
        raise InvalidImage(f"image {img.name}: manifest has {len(descs)} layers, store has {len(chain)}")
    layers: list[images.ExportLayer] = []
    rewritten = False
    for i, (desc, snap) in enumerate(zip(descs, chain, strict=True)):
        digest = Digest.parse(desc["digest"])
        if not rebuild and store.has_blob(digest):
            rec = store.blob(digest)
            assert rec is not None and snap.diff_id is not None
            layers.append(images.ExportLayer(digest, rec.size, desc.get("mediaType", rec.media_type),
                                             snap.diff_id, _blob_opener(store, digest)))
            continue
        path = os.path.join(tmp, f"layer-{img.config_digest.short()}-{i}.tar")
        with open(path, "wb") as f:
            changes.write_layer_tar(store.fs_dir(snap.id), f)
        with open(path, "rb") as f:
            new = hash_stream(f)
        size = os.path.getsize(path)
        layers.append(images.ExportLayer(new, size, OCI_LAYER, new, _file_opener(path)))
        rewritten = True
    if rewritten:
        config.setdefault("rootfs", {})["diff_ids"] = [layer.diff_id for layer in layers]
        config_bytes = canonical_json(config, ensure_ascii=True)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": Digest.of(config_bytes), "size": len(config_bytes)},
            "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size} for layer in layers],
            **({"annotations": manifest["annotations"]} if manifest.get("annotations") else {}),
        }
        manifest_bytes = canonical_json(manifest, ensure_ascii=True)
    return images.ExportImage([img.name], manifest_bytes, config_bytes, layers)


def export(store: Store, refs: Sequence[str], out: str, fmt: str = "oci", rebuild: bool = False) -> list[Image]:
    if not refs:
        raise UsageError("export needs at least one image")
    imgs = [resolve_image(store, r) for r in refs]
    with store.shared_lock(), export_images(store, imgs, rebuild) as records:
        if fmt == "oci":
            images.export_oci(records, out)
        elif fmt == "docker-archive":
            images.export_docker_archive(records, out)
        else:
            raise UsageError(f"unknown export format {fmt!r} (oci or docker-archive)")
    return imgs
