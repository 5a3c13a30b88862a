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
from layerfs.progress import Bar, Progress
from layerfs.store import Image, Store


def _blob_opener(store: Store, digest: Digest) -> Callable[[], BinaryIO]:
    return lambda: store.content.open(digest)


def _file_opener(path: str) -> Callable[[], BinaryIO]:
    return lambda: open(path, "rb")


class _CountingWriter:
    """``out`` with every byte written counted on a progress bar."""

    def __init__(self, out: BinaryIO, bar: Bar) -> None:
        self.out = out
        self.bar = bar

    def write(self, data: bytes) -> int:
        n = self.out.write(data)
        self.bar.update(len(data))
        return n


def _tar_estimate(layer_dir: str) -> int:
    """About the size of the layer's tar: a 512-byte header per entry, contents padded to
    512 bytes (PAX headers for long names and xattrs aside), the two end blocks."""
    total = 1024
    for dirpath, dirnames, filenames in os.walk(layer_dir):
        total += 512 * len(dirnames)
        for name in filenames:
            with contextlib.suppress(OSError):
                total += 512 + -(-os.lstat(os.path.join(dirpath, name)).st_size // 512) * 512
    return total


@contextlib.contextmanager
def export_images(store: Store, imgs: Sequence[Image], rebuild: bool = False,
                  progress: Progress | None = None) -> Iterator[list[images.ExportImage]]:
    """ExportImage records for ``imgs``; temp files for rebuilt layers live while the block runs.
    A layer written from its directory shows a bar on ``progress`` (``Writing layer N/M``)."""
    with tempfile.TemporaryDirectory(prefix="export-", dir=store.tmp_dir) as tmp:
        out = []
        for img in imgs:
            out.append(_export_one(store, img, tmp, rebuild, progress or Progress(enabled=False)))
        yield out


def _export_one(store: Store, img: Image, tmp: str, rebuild: bool, progress: Progress) -> images.ExportImage:
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
        layer_dir = store.fs_dir(snap.id)
        bar = progress.bar(f"Writing layer {i + 1}/{len(chain)} {Digest(snap.key).short()}",
                           _tar_estimate(layer_dir) if progress.enabled else None)
        with open(path, "wb") as f:
            changes.write_layer_tar(layer_dir, _CountingWriter(f, bar))  # type: ignore[arg-type]
        bar.total = bar.done  # the estimate gives way to what was written
        bar.finish()
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


def export(store: Store, refs: Sequence[str], out: str, fmt: str = "oci", rebuild: bool = False,
           progress: Progress | None = None) -> list[Image]:
    if not refs:
        raise UsageError("export needs at least one image")
    imgs = [resolve_image(store, r) for r in refs]
    with store.shared_lock(), export_images(store, imgs, rebuild, progress) as records:
        if fmt == "oci":
            images.export_oci(records, out)
        elif fmt == "docker-archive":
            images.export_docker_archive(records, out)
        else:
            raise UsageError(f"unknown export format {fmt!r} (oci or docker-archive)")
    return imgs
