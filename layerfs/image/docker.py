"""Reading docker archives (``docker save``, ``skopeo copy ... docker-archive:``).

Formats owned here:

- ``manifest.json``: a JSON list of ``{"Config", "RepoTags", "Layers", "LayerSources"?}``.
  ``Config`` names the config file (``<hex>.json``, or ``blobs/sha256/<hex>`` since Docker
  25); its sha256 is the image ID. ``Layers`` name the layer tars, lowest first: old style
  ``<id>/layer.tar`` (often a symlink or hardlink to another layer's tar; skopeo writes
  ``<id>/layer.tar -> ../<diffid>.tar``), or ``blobs/sha256/<hex>``. ``RepoTags`` are the
  image's names; ``LayerSources`` describe foreign layers that are not in the archive.
- The legacy ``<id>/json``, ``<id>/VERSION`` and ``repositories`` files are not read:
  ``manifest.json`` says everything they say (archives from docker < 1.10, which have only
  those, are refused).
- Docker >= 25 archives are also OCI image layouts (``oci-layout``, ``index.json``,
  ``blobs/``). Those are read as layouts, so manifests and layer digests are verified, and
  ``manifest.json`` only contributes the names (``RepoTags``, docker's familiar form).

Old-style layers carry no digest (the archive does not promise one, and ``docker load``
accepts compressed layer tars, so the diffID is not it either): their media type is sniffed
from the first bytes and the importer checks the diffID after decompression.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any

from layerfs.digest import Digest
from layerfs.errors import DigestMismatch, InvalidArgument, InvalidImage, NotFound
from layerfs.image.files import ImageFiles
from layerfs.image.oci import (
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    MAX_JSON_BYTES,
    OCI_LAYER_ZSTD,
    LayerBlob,
    OciLayout,
    Platform,
    ResolvedImage,
    config_platform,
    parse_config,
)
from layerfs.image.ref import normalize_ref

_CONTENT_ADDRESSED = re.compile(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?")
_BLOB_PATH = re.compile(r"blobs/sha256/([0-9a-f]{64})")


def _sniff_media_type(head: bytes) -> str:
    # docker load detects compression the same way; zstd has no docker media type.
    if head.startswith(b"\x1f\x8b"):
        return DOCKER_LAYER_GZIP
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return OCI_LAYER_ZSTD
    return DOCKER_LAYER


class DockerArchive:
    """A docker archive read through ``ImageFiles``."""

    def __init__(self, files: ImageFiles, repo_base: str) -> None:
        self.files = files
        self.repo_base = repo_base
        if not files.exists("manifest.json"):
            hint = " (an archive from docker < 1.10?)" if files.exists("repositories") else ""
            raise InvalidImage(f"{files.path}: not a docker archive: no manifest.json{hint}")
        what = f"{files.path}: manifest.json"
        try:
            entries = json.loads(files.read("manifest.json", MAX_JSON_BYTES))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidImage(f"{what}: not valid JSON: {e}") from e
        if not isinstance(entries, list):
            raise InvalidImage(f"{what}: expected a JSON list")
        for i, entry in enumerate(entries):
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("Config"), str)
                and isinstance(entry.get("Layers"), list)
                and all(isinstance(x, str) for x in entry["Layers"])
                and isinstance(entry.get("RepoTags") or [], list)
                and all(isinstance(x, str) for x in entry.get("RepoTags") or [])
            )
            if not ok:
                raise InvalidImage(f"{what}: entry {i} needs Config (string), Layers and RepoTags (lists)")
        self.entries: list[dict[str, Any]] = entries
        self.oci = OciLayout(files, repo_base) if files.exists("oci-layout") else None

    def images(self, platform: str | None = None) -> list[ResolvedImage]:
        wanted = Platform.parse(platform) if platform else None
        if self.oci is not None:
            return self._combined(platform)
        out: dict[Digest, ResolvedImage] = {}
        for i, entry in enumerate(self.entries):
            img = self._entry_image(i, entry)
            merged = out.setdefault(img.config_digest, img)
            merged.names.extend(n for n in img.names if n not in merged.names)
        images = list(out.values())
        if wanted is None:
            return images  # every image of the archive, as `docker load` loads them all
        acceptable = wanted.acceptable()
        chosen = [img for img in images if img.platform and Platform.parse(img.platform) in acceptable]
        if not chosen:
            available = ", ".join(sorted({img.platform or "unknown" for img in images}))
            raise NotFound(f"{self.files.path}: no image for platform {wanted}; available: {available}")
        return chosen

    def _combined(self, platform: str | None) -> list[ResolvedImage]:
        """Docker >= 25: the OCI layout gives the images, manifest.json their names."""
        assert self.oci is not None
        tags: dict[Digest, list[str]] = {}
        for i, entry in enumerate(self.entries):
            _, digest = self._config(i, entry)
            names = tags.setdefault(digest, [])
            names.extend(n for n in self._names(i, entry) if n not in names)
        images = self.oci.images(platform)
        for img in images:
            if tags.get(img.config_digest):
                img.names = list(tags[img.config_digest])
        return images

    def _names(self, i: int, entry: dict[str, Any]) -> list[str]:
        try:
            return [normalize_ref(t) for t in entry.get("RepoTags") or []]
        except InvalidArgument as e:
            raise InvalidImage(f"{self.files.path}: manifest.json entry {i} RepoTags: {e}") from e

    def _config(self, i: int, entry: dict[str, Any]) -> tuple[bytes, Digest]:
        name = entry["Config"]
        if not self.files.exists(name):
            raise InvalidImage(f"{self.files.path}: manifest.json entry {i}: config {name!r} is missing")
        data = self.files.read(name, MAX_JSON_BYTES)
        digest = Digest.of(data)
        # A content-addressed name is a promise: hold the file to it.
        m = _CONTENT_ADDRESSED.fullmatch(name)
        if m and m.group(1) != digest.hex:
            raise DigestMismatch(
                f"config sha256:{m.group(1)} ({name}): digest mismatch: content hashes to {digest}"
            )
        return data, digest

    def _entry_image(self, i: int, entry: dict[str, Any]) -> ResolvedImage:
        config_bytes, config_digest = self._config(i, entry)
        config, diff_ids = parse_config(config_bytes, config_digest, len(entry["Layers"]))
        foreign = entry.get("LayerSources") or {}
        layers = []
        for n, (path, diff_id) in enumerate(zip(entry["Layers"], diff_ids, strict=True)):
            resolved = self.files.resolve(path)
            if resolved is None:
                what = (
                    f"{self.files.path}: image {config_digest.short()} layer {n} ({path}, diffID {diff_id})"
                )
                if isinstance(foreign, dict) and diff_id in foreign:
                    raise InvalidImage(f"{what} is a foreign layer that the archive does not include")
                raise InvalidImage(f"{what} is missing")
            with self.files.open(resolved) as f:
                head = f.read(4)
            m = _BLOB_PATH.fullmatch(posixpath.normpath(path))
            layers.append(
                LayerBlob(
                    digest=Digest.from_hex(m.group(1)) if m else None,
                    size=self.files.size(resolved),
                    media_type=_sniff_media_type(head),
                    open=lambda name=resolved: self.files.open(name),  # type: ignore[misc]
                    location=resolved,
                )
            )
        plat = config_platform(config)
        return ResolvedImage(
            names=self._names(i, entry),
            config_bytes=config_bytes,
            config_digest=config_digest,
            config=config,
            manifest_bytes=None,
            manifest_digest=None,
            diff_ids=diff_ids,
            layers=layers,
            platform=str(plat) if plat else None,
        )
