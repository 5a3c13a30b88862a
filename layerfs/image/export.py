"""Writing images out: OCI image layouts and docker archives.

Formats owned here:

- OCI image layout, as a directory or a tar: ``oci-layout``, ``index.json`` (one manifest
  descriptor per image and name, with ``io.containerd.image.name`` = the full name and
  ``org.opencontainers.image.ref.name`` = its tag, as containerd's exporter writes them, so
  ``skopeo copy oci:OUT:TAG`` and ``umoci unpack --image OUT:TAG`` find it), and the blobs
  copied byte for byte, so every digest stays what it was.
- docker archive (a tar): ``<config hex>.json``, one uncompressed ``<diffID hex>.tar`` per
  layer, ``manifest.json`` (``Config``, ``RepoTags``, ``Layers``) and ``repositories``
  (``{repo: {tag: <top layer diffID hex>}}``, as Docker >= 25 writes it). ``docker load``,
  ``podman load`` and ``skopeo ... docker-archive:`` read the layers through manifest.json,
  so the legacy ``<id>/json`` directories are not written.

Everything written is verified on the way: each blob against its digest and size, each
uncompressed docker layer against its diffID. Output goes to a hidden staging directory
next to ``out`` and is renamed into place at the end, so a failed export leaves nothing
behind. Tars are deterministic: members sorted, mtime 0, owner 0:0 without names, mode
0644/0755, PAX format.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from layerfs import failpoint
from layerfs.digest import Digest, VerifyingReader
from layerfs.errors import AlreadyExists, DigestMismatch, InvalidArgument, InvalidImage, NotFound
from layerfs.image.oci import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    blob_name,
    canonical_json,
    layer_compression,
    parse_config,
    parse_descriptor,
    parse_json,
)
from layerfs.image.ref import parse_ref

Opener = Callable[[], AbstractContextManager[BinaryIO]]


@dataclass
class ExportLayer:
    """A layer as the store keeps it. ``open`` yields the blob (``digest``, ``size``);
    ``open_uncompressed`` yields the tar whose sha256 is ``diff_id`` (for docker archives;
    when None the blob is decompressed here according to ``media_type``)."""

    digest: Digest
    size: int
    media_type: str
    diff_id: Digest
    open: Opener
    open_uncompressed: Opener | None = None


@dataclass
class ExportImage:
    """An image to export: its names, its manifest and config exactly as stored, its layers."""

    names: list[str]
    manifest_bytes: bytes
    config_bytes: bytes
    layers: list[ExportLayer]


@dataclass
class _Blob:
    """A file to write from a stream, checked against ``digest`` (and ``size`` when known)."""

    what: str
    open: Opener
    digest: Digest
    size: int | None


_Plan = dict[str, "bytes | _Blob"]


@dataclass
class _Checked:
    image: ExportImage
    manifest_digest: Digest
    manifest_media_type: str
    config_digest: Digest
    config: dict[str, Any]


def _check(img: ExportImage) -> _Checked:
    """Refuse an image whose parts disagree; an export must not write a broken image."""
    mdigest = Digest.of(img.manifest_bytes)
    label = f"image {img.names[0] if img.names else mdigest}"
    try:
        manifest = parse_json(img.manifest_bytes, f"{label}: manifest")
        media_type = manifest.get("mediaType") or OCI_MANIFEST
        if media_type not in MANIFEST_TYPES:
            raise InvalidImage(f"{label}: manifest media type {media_type!r} is not an image manifest")
        cdesc = parse_descriptor(manifest.get("config"), f"{label}: manifest config")
        cdigest = Digest.of(img.config_bytes)
        if (cdesc.digest, cdesc.size) != (cdigest, len(img.config_bytes)):
            raise InvalidImage(f"{label}: manifest names config {cdesc.digest}, but the config is {cdigest}")
        raw_layers = manifest.get("layers")
        if not isinstance(raw_layers, list) or len(raw_layers) != len(img.layers):
            raise InvalidImage(f"{label}: manifest and export list different numbers of layers")
        for i, (raw, layer) in enumerate(zip(raw_layers, img.layers, strict=True)):
            desc = parse_descriptor(raw, f"{label}: manifest layers[{i}]")
            if (desc.digest, desc.size, desc.media_type) != (layer.digest, layer.size, layer.media_type):
                raise InvalidImage(f"{label}: layer {i} is {layer.digest}, the manifest says {desc.digest}")
        config, diff_ids = parse_config(img.config_bytes, cdigest, len(img.layers))
        if diff_ids != [layer.diff_id for layer in img.layers]:
            raise InvalidImage(f"{label}: layer diffIDs differ from the config's rootfs.diff_ids")
    except InvalidImage as e:
        raise InvalidArgument(str(e)) from e
    for name in img.names:
        parse_ref(name)  # InvalidArgument names it
    return _Checked(img, mdigest, media_type, cdigest, config)


# -- OCI layout ----------------------------------------------------------------------------


def export_oci(images: list[ExportImage], out: str) -> None:
    """Write ``images`` as an OCI image layout: a tar if ``out`` ends with ``.tar``, else a
    directory (which must not exist, or be empty). A tar at ``out`` is replaced."""
    checked = [_check(img) for img in images]
    if not checked:
        raise InvalidArgument("nothing to export: no images")
    plan: _Plan = {"oci-layout": canonical_json({"imageLayoutVersion": "1.0.0"})}
    manifests: list[dict[str, Any]] = []
    for c in checked:
        plan[blob_name(c.manifest_digest)] = c.image.manifest_bytes
        plan[blob_name(c.config_digest)] = c.image.config_bytes
        for layer in c.image.layers:
            plan.setdefault(
                blob_name(layer.digest), _Blob(f"layer {layer.digest}", layer.open, layer.digest, layer.size)
            )
        desc: dict[str, Any] = {
            "mediaType": c.manifest_media_type,
            "digest": c.manifest_digest,
            "size": len(c.image.manifest_bytes),
        }
        plat = {k: c.config[k] for k in ("architecture", "os", "variant") if isinstance(c.config.get(k), str)}
        if "os" in plat and "architecture" in plat:
            desc["platform"] = plat  # lets containerd's import pick by platform
        if not c.image.names:
            manifests.append(desc)
        for name in c.image.names:
            annotations = {ANNOTATION_CONTAINERD_NAME: name}
            tag = parse_ref(name).tag
            if tag:
                annotations[ANNOTATION_REF_NAME] = tag
            entry = {**desc, "annotations": annotations}
            if entry not in manifests:
                manifests.append(entry)
    plan["index.json"] = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    _write(plan, out, as_tar=out.endswith(".tar"))


# -- docker archive ------------------------------------------------------------------------


@contextmanager
def _uncompressed(layer: ExportLayer) -> Iterator[BinaryIO]:
    if layer.open_uncompressed is not None:
        with layer.open_uncompressed() as f:
            yield f
        return
    kind = layer_compression(layer.media_type)
    with layer.open() as raw:
        if kind == "none":
            yield raw
        elif kind == "gzip":
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz  # type: ignore[misc]
        else:
            with zstandard.ZstdDecompressor().stream_reader(raw, closefd=False) as zs:
                yield zs


def export_docker_archive(images: list[ExportImage], out: str) -> None:
    """Write ``images`` as a docker archive tar at ``out`` (``docker load`` style); a file
    already at ``out`` is replaced. Layers are written uncompressed, named by diffID."""
    checked = [_check(img) for img in images]
    if not checked:
        raise InvalidArgument("nothing to export: no images")
    plan: _Plan = {}
    entries: dict[Digest, dict[str, Any]] = {}  # by config digest: one entry per image ID
    repositories: dict[str, dict[str, str]] = {}
    for c in checked:
        config_file = f"{c.config_digest.hex}.json"
        plan[config_file] = c.image.config_bytes
        layer_files = []
        for layer in c.image.layers:
            name = f"{layer.diff_id.hex}.tar"
            layer_files.append(name)
            # An uncompressed blob's size is its tar's size; otherwise it is known only
            # after decompressing, and _write spools it to learn it.
            size = (
                layer.size
                if layer.open_uncompressed is None and layer_compression(layer.media_type) == "none"
                else None
            )
            opener: Opener = functools.partial(_uncompressed, layer)
            plan.setdefault(
                name, _Blob(f"layer {layer.digest} (diffID {layer.diff_id})", opener, layer.diff_id, size)
            )
        entry = entries.setdefault(
            c.config_digest, {"Config": config_file, "RepoTags": [], "Layers": layer_files}
        )
        for name in c.image.names:
            ref = parse_ref(name)
            if ref.tag is None:
                continue  # digest-only names have no place in RepoTags
            repo_tag = f"{ref.repository}:{ref.tag}"
            if repo_tag not in entry["RepoTags"]:
                entry["RepoTags"].append(repo_tag)
            if layer_files:
                repositories.setdefault(ref.repository, {})[ref.tag] = c.image.layers[-1].diff_id.hex
    plan["manifest.json"] = json.dumps(list(entries.values()), separators=(",", ":")).encode()
    plan["repositories"] = json.dumps(repositories, separators=(",", ":")).encode()
    _write(plan, out, as_tar=True)


# -- output --------------------------------------------------------------------------------


def _prepare(out: str, as_tar: bool) -> str:
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise NotFound(f"cannot export to {out}: directory {parent} does not exist")
    if as_tar and os.path.isdir(out):
        raise AlreadyExists(f"cannot export to {out}: it is a directory")
    if not as_tar and os.path.lexists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise AlreadyExists(f"cannot export to {out}: it exists and is not an empty directory")
    return out


def _finish(reader: VerifyingReader) -> None:
    reader.read(1)  # past the expected size this raises; at the end it reads nothing
    reader.verify()


def _copy(blob: _Blob, dst: BinaryIO) -> int:
    with blob.open() as raw:
        reader = VerifyingReader(raw, blob.what, blob.digest, blob.size)
        try:
            shutil.copyfileobj(reader, dst, 1 << 20)
        except (gzip.BadGzipFile, EOFError, zlib.error, zstandard.ZstdError) as e:
            raise DigestMismatch(f"{blob.what}: cannot decompress: {e}") from e
        _finish(reader)
        return reader.size


def _tarinfo(name: str, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    ti.mode = 0o755 if is_dir else 0o644
    ti.size = size
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _add_to_tar(tar: tarfile.TarFile, name: str, item: bytes | _Blob, staging: str) -> None:
    if isinstance(item, bytes):
        tar.addfile(_tarinfo(name, len(item)), io.BytesIO(item))
        return
    if item.size is None:
        # A tar header carries the size before the data: spool to learn it.
        with tempfile.TemporaryFile(dir=staging) as spool:
            size = _copy(item, spool)
            spool.seek(0)
            tar.addfile(_tarinfo(name, size), spool)
        return
    with item.open() as raw:
        reader = VerifyingReader(raw, item.what, item.digest, item.size)
        try:
            tar.addfile(_tarinfo(name, item.size), reader)
        except OSError as e:
            if e.errno is None and reader.size < item.size:  # tarfile's "unexpected end of data", not ENOSPC
                raise DigestMismatch(
                    f"{item.what}: size mismatch: expected {item.size} bytes, got {reader.size}"
                ) from e
            raise
        _finish(reader)


def _write(plan: _Plan, out: str, as_tar: bool) -> None:
    out = _prepare(out, as_tar)
    dirs = {d for name in plan for d in _parents(name)}
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=os.path.dirname(out))
    try:
        if as_tar:
            target = os.path.join(staging, "out.tar")
            with open(target, "wb") as f:
                with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for name in sorted(dirs | plan.keys()):
                        if name in dirs:
                            tar.addfile(_tarinfo(name, is_dir=True))
                        else:
                            _add_to_tar(tar, name, plan[name], staging)
                f.flush()
                os.fsync(f.fileno())
        else:
            target = os.path.join(staging, "out")
            for d in sorted(dirs | {""}):
                os.mkdir(os.path.join(target, d), 0o755)
            for name in sorted(plan):
                item = plan[name]
                with open(os.path.join(target, name), "wb") as f:
                    if isinstance(item, bytes):
                        f.write(item)
                    else:
                        _copy(item, f)
        failpoint.hit("export.staged")  # (crash points: the output is whole or absent)
        os.rename(target, out)  # over a missing path, an old tar, or an empty directory
        failpoint.hit("export.renamed")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _parents(name: str) -> Iterator[str]:
    parts = name.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield "/".join(parts[:i])
