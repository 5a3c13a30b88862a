"""Reading OCI image layouts: descriptors, indexes, manifests, configs, platforms.

Formats owned here (``layerfs.image.source`` is the public face):

- OCI image layout, image-spec v1: ``oci-layout`` (``imageLayoutVersion`` "1.0.0"),
  ``index.json``, ``blobs/sha256/<hex>``; nested image indexes are followed.
- Manifests and configs in both vocabularies: OCI (``application/vnd.oci.image.*``) and
  Docker v2 schema 2 (``application/vnd.docker.distribution.manifest.*``,
  ``application/vnd.docker.container.image.v1+json``, ``...rootfs.diff.tar.gzip``).
- The model every image format is read into: ``ResolvedImage`` and ``LayerBlob``.

Trust: index, manifest and config blobs are small and read whole here, so they are checked
against their descriptor's size and sha256 before they are parsed. Layer blobs are only
checked for presence and size here; the importer streams them through ``VerifyingReader``.
"""

from __future__ import annotations

import json
import platform as _platform
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

from layerfs.digest import Digest
from layerfs.errors import DigestMismatch, InvalidArgument, InvalidImage, NotFound
from layerfs.image.files import ImageFiles
from layerfs.image.ref import is_tag, normalize_ref

# -- media types ---------------------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"  # docker-archive layer.tar
DOCKER_LAYER_GZIP = DOCKER_LAYER + ".gzip"
DOCKER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
# media type -> compression of the blob ("none", "gzip", "zstd")
LAYER_TYPES: dict[str, str] = {
    OCI_LAYER: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_ND: "none",
    OCI_LAYER_ND + "+gzip": "gzip",
    OCI_LAYER_ND + "+zstd": "zstd",
    DOCKER_LAYER: "none",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_FOREIGN_GZIP: "gzip",
}
FOREIGN_LAYER_TYPES = frozenset(t for t in LAYER_TYPES if "nondistributable" in t or "foreign" in t)
# what layerfs writes for a layer blob, by its compression as ``compression.detect`` names it
OCI_LAYER_BY_COMPRESSION = {"plain": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
_REFERENCE_TYPE = "vnd.docker.reference.type"

# Index, manifest and config blobs are read whole; bigger ones are refused, not buffered.
MAX_JSON_BYTES = 16 << 20
_MAX_INDEX_DEPTH = 8


def layer_compression(media_type: str) -> str:
    """``"none"``, ``"gzip"`` or ``"zstd"`` for a layer media type; ``InvalidImage`` if unknown."""
    try:
        return LAYER_TYPES[media_type]
    except KeyError:
        raise InvalidImage(f"unsupported layer media type {media_type!r}") from None


def blob_name(digest: Digest) -> str:
    """The path of a blob inside a layout; ``digest`` is already validated."""
    return f"blobs/sha256/{digest.hex}"


# -- the model -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerBlob:
    """One layer of a resolved image, as the source stores it (possibly compressed).

    ``digest`` is None only when the format does not record it (old docker archives).
    ``open()`` streams the raw blob (a context manager); streams from a source are valid
    while the source is open. ``location`` says where the blob is, for messages.
    """

    digest: Digest | None
    size: int | None
    media_type: str
    open: Callable[[], BinaryIO] = field(repr=False, compare=False)
    location: str = ""


@dataclass
class ResolvedImage:
    """One image of a source: its verified metadata and its layers, ready to import."""

    names: list[str]
    config_bytes: bytes
    config_digest: Digest
    config: dict[str, Any]
    manifest_bytes: bytes | None  # None for docker archives without an OCI manifest
    manifest_digest: Digest | None
    diff_ids: list[Digest]
    layers: list[LayerBlob]
    platform: str | None = None  # "os/arch[/variant]" from the config


class NotAnImage(InvalidImage):
    """A manifest of something else (a signature, an SBOM, a helm chart): skipped beside
    images, an error when a source holds nothing else."""


def parse_manifest(data: bytes, media_type: str, what: str) -> tuple[Descriptor, list[Descriptor]]:
    """An image manifest's config and layer descriptors, checked: schemaVersion 2, its own
    mediaType (when it says one) equal to ``media_type`` (the descriptor's or the registry's),
    a container image config. Raises ``NotAnImage`` for another kind of artifact."""
    manifest = parse_json(data, what)
    if manifest.get("schemaVersion") != 2:
        raise InvalidImage(f"{what}: schemaVersion must be 2")
    own = manifest.get("mediaType")
    if own is not None and own != media_type:
        raise InvalidImage(f"{what}: mediaType {own!r} differs from its descriptor's {media_type!r}")
    config_desc = parse_descriptor(manifest.get("config"), f"{what} config")
    if config_desc.media_type not in CONFIG_TYPES:
        raise NotAnImage(f"{what}: config media type {config_desc.media_type!r} is not a container image")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise InvalidImage(f"{what}: layers is not a list")
    return config_desc, [parse_descriptor(raw, f"{what} layers[{i}]") for i, raw in enumerate(raw_layers)]


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, str]
    platform: dict[str, Any] | None
    urls: list[str]


# -- parsing and verification ----------------------------------------------------------------


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidImage(f"{what}: not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise InvalidImage(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_descriptor(obj: object, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise InvalidImage(f"{what}: descriptor is not a JSON object")
    media_type, size = obj.get("mediaType"), obj.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise InvalidImage(f"{what}: descriptor has no mediaType")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidImage(f"{what}: descriptor has no valid size")
    try:
        digest = Digest.parse(obj.get("digest"))  # type: ignore[arg-type]
    except InvalidArgument as e:
        raise InvalidImage(f"{what}: {e}") from e
    annotations = obj.get("annotations") or {}
    plat = obj.get("platform")
    urls = obj.get("urls") or []
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        raise InvalidImage(f"{what} {digest}: annotations must map strings to strings")
    if plat is not None and not isinstance(plat, dict):
        raise InvalidImage(f"{what} {digest}: platform is not a JSON object")
    if not isinstance(urls, list):
        raise InvalidImage(f"{what} {digest}: urls is not a list")
    return Descriptor(media_type, digest, size, annotations, plat, urls)


def check_blob_size(files: ImageFiles, digest: Digest, size: int, what: str) -> str:
    """The blob's file name after checking it is present with the promised size."""
    name = blob_name(digest)
    if not files.exists(name):
        raise InvalidImage(f"{files.path}: {what} {digest} is missing ({name})")
    actual = files.size(name)
    if actual != size:
        raise DigestMismatch(f"{what} {digest}: size mismatch: expected {size} bytes, got {actual}")
    return name


def read_blob(files: ImageFiles, desc: Descriptor, what: str) -> bytes:
    """A metadata blob, verified against ``desc`` (size, then sha256)."""
    if desc.size > MAX_JSON_BYTES:
        raise InvalidImage(f"{what} {desc.digest}: {desc.size} bytes is too large for a {what}")
    data = files.read(check_blob_size(files, desc.digest, desc.size, what), MAX_JSON_BYTES)
    check_bytes(data, desc.digest, desc.size, what)
    return data


def check_bytes(data: bytes, digest: Digest, size: int | None, what: str) -> None:
    if size is not None and len(data) != size:
        raise DigestMismatch(f"{what} {digest}: size mismatch: expected {size} bytes, got {len(data)}")
    actual = Digest.of(data)
    if actual != digest:
        raise DigestMismatch(f"{what} {digest}: digest mismatch: content hashes to {actual}")


def parse_config(data: bytes, digest: Digest, n_layers: int) -> tuple[dict[str, Any], list[Digest]]:
    """The config as a dict and its ``rootfs.diff_ids``, one per layer."""
    what = f"config {digest}"
    config = parse_json(data, what)
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise InvalidImage(f'{what}: rootfs.type must be "layers"')
    raw = rootfs.get("diff_ids")
    if not isinstance(raw, list):
        raise InvalidImage(f"{what}: rootfs.diff_ids is not a list")
    try:
        diff_ids = [Digest.parse(d) for d in raw]
    except InvalidArgument as e:
        raise InvalidImage(f"{what}: rootfs.diff_ids: {e}") from e
    if len(diff_ids) != n_layers:
        raise InvalidImage(f"{what}: {len(diff_ids)} diff_ids for {n_layers} layers")
    return config, diff_ids


def config_platform(config: dict[str, Any]) -> Platform | None:
    os_, arch = config.get("os"), config.get("architecture")
    if not isinstance(os_, str) or not isinstance(arch, str) or not os_ or not arch:
        return None
    variant = config.get("variant")
    return Platform.normalized(os_, arch, variant if isinstance(variant, str) else "")


# -- platforms -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """``os/arch[/variant]`` with containerd's normalization (aarch64 -> arm64, arm64/v8 -> arm64)."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def normalized(cls, os_: str, arch: str, variant: str = "") -> Platform:
        os_, arch, variant = os_.lower(), arch.lower(), variant.lower()
        if variant and variant[0].isdigit():
            variant = "v" + variant
        if arch in ("x86_64", "x86-64", "amd64"):
            arch, variant = "amd64", "" if variant == "v1" else variant
        elif arch in ("aarch64", "arm64"):
            arch, variant = "arm64", "" if variant in ("v8", "v8.0") else variant
        elif arch in ("armhf", "armel", "arm") or arch.startswith("armv"):
            if arch.startswith("armv"):  # uname -m style: armv7l, armv6l
                variant = "v" + arch[4:].rstrip("lb")
            elif arch != "arm":
                variant = "v7" if arch == "armhf" else "v6"
            arch, variant = "arm", variant or "v7"
        elif arch in ("i386", "i486", "i586", "i686", "x86"):
            arch = "386"
        return cls(os_, arch, variant)

    @classmethod
    def parse(cls, spec: str) -> Platform:
        parts = spec.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise InvalidArgument(f"invalid platform {spec!r}: expected os/arch[/variant], e.g. linux/arm64")
        return cls.normalized(*parts)

    @classmethod
    def host(cls) -> Platform:
        return cls.normalized("linux", _platform.machine())

    @classmethod
    def from_descriptor(cls, plat: dict[str, Any]) -> Platform:
        os_, arch, variant = plat.get("os"), plat.get("architecture"), plat.get("variant") or ""
        if not isinstance(os_, str) or not isinstance(arch, str) or not isinstance(variant, str):
            raise InvalidImage(f"descriptor platform {plat!r} needs string os and architecture")
        return cls.normalized(os_, arch, variant)

    def acceptable(self) -> list[Platform]:
        """What a machine of this platform runs, best first (arm/v7 also runs v6 and v5)."""
        out = [self]
        if self.architecture in ("arm", "amd64") and self.variant[1:].isdigit():
            floor = 5 if self.architecture == "arm" else 2
            out += [
                Platform(self.os, self.architecture, f"v{n}")
                for n in range(int(self.variant[1:]) - 1, floor - 1, -1)
            ]
            if self.architecture == "amd64":
                out.append(Platform(self.os, "amd64"))
        return out

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


# -- OCI layout ----------------------------------------------------------------------------


def entry_name(annotations: dict[str, str], repo_base: str) -> str | None:
    """The image name an index entry carries, or None.

    containerd's full name wins. ``ref.name`` is a full reference when it has a '/', ':' or
    '@'; a bare tag (what skopeo and umoci write) is qualified with ``repo_base``, the
    layout's own name, since the layout does not say which repository it belongs to.
    """
    full = annotations.get(ANNOTATION_CONTAINERD_NAME)
    ref = annotations.get(ANNOTATION_REF_NAME)
    try:
        if full:
            return normalize_ref(full)
        if not ref:
            return None
        if any(c in ref for c in "/:@"):
            return normalize_ref(ref)
        if is_tag(ref):
            return normalize_ref(f"{repo_base}:{ref}")
    except InvalidArgument as e:
        raise InvalidImage(f"index entry names an invalid reference: {e}") from e
    raise InvalidImage(f"annotation {ANNOTATION_REF_NAME}={ref!r} is neither a tag nor a reference")


class OciLayout:
    """An OCI image layout read through ``ImageFiles``; ``repo_base`` names bare tags."""

    def __init__(self, files: ImageFiles, repo_base: str) -> None:
        self.files = files
        self.repo_base = repo_base
        layout = parse_json(files.read("oci-layout", MAX_JSON_BYTES), f"{files.path}: oci-layout")
        version = layout.get("imageLayoutVersion")
        if version != "1.0.0":
            raise InvalidImage(f"{files.path}: unsupported imageLayoutVersion {version!r} (expected 1.0.0)")
        self.index = parse_json(files.read("index.json", MAX_JSON_BYTES), f"{files.path}: index.json")
        self._check_index(self.index, f"{files.path}: index.json", None)
        self._images: dict[Digest, ResolvedImage] = {}

    @staticmethod
    def _check_index(index: dict[str, Any], what: str, media_type: str | None) -> list[Any]:
        if index.get("schemaVersion") != 2:
            raise InvalidImage(f"{what}: schemaVersion must be 2")
        own = index.get("mediaType")
        if own is not None and own not in INDEX_TYPES:
            raise InvalidImage(f"{what}: mediaType {own!r} is not an image index")
        if own is not None and media_type is not None and own != media_type:
            raise InvalidImage(f"{what}: mediaType {own!r} differs from its descriptor's {media_type!r}")
        manifests = index.get("manifests")
        if not isinstance(manifests, list):
            raise InvalidImage(f"{what}: manifests is not a list")
        return manifests

    def images(self, platform: str | None = None) -> list[ResolvedImage]:
        """One image per distinct selected manifest, with every name that points at it."""
        wanted = Platform.parse(platform) if platform else None
        groups: dict[str | None, list[Descriptor]] = {}
        for i, raw in enumerate(self.index["manifests"]):
            desc = parse_descriptor(raw, f"{self.files.path}: index.json manifests[{i}]")
            groups.setdefault(entry_name(desc.annotations, self.repo_base), []).append(desc)
        if len(groups) > 1:
            # Untagged entries beside tagged ones are unreachable by name; skopeo and umoci
            # ignore them too, so importing them would only make nameless duplicates.
            groups.pop(None, None)
        out: dict[Digest, ResolvedImage] = {}
        skipped: list[NotAnImage] = []
        for name, descs in groups.items():
            candidates: list[Descriptor] = []
            for desc in descs:
                self._expand(desc, candidates, 0)
            what = f"{self.files.path}" + (f" ({name})" if name else "")
            if not candidates:
                skipped.append(NotAnImage(f"{what}: no image manifest in the index"))
                continue
            try:
                img = self._select(candidates, wanted, what)
            except NotAnImage as e:  # e.g. a cosign signature tagged beside the image
                skipped.append(e)
                continue
            # A fresh copy per call: the cached image must not collect names across calls.
            merged = out.setdefault(img.manifest_digest, replace(img, names=[]))  # type: ignore[arg-type]
            if name and name not in merged.names:
                merged.names.append(name)
        if not out and skipped:
            raise skipped[0]
        return list(out.values())

    def _expand(self, desc: Descriptor, out: list[Descriptor], depth: int) -> None:
        if desc.annotations.get(_REFERENCE_TYPE) == "attestation-manifest":
            return  # buildkit's provenance/SBOM manifests (platform unknown/unknown): not images
        if desc.media_type in MANIFEST_TYPES:
            out.append(desc)
        elif desc.media_type in INDEX_TYPES:
            if depth >= _MAX_INDEX_DEPTH:
                raise InvalidImage(f"index {desc.digest}: image indexes nested too deep")
            what = f"index {desc.digest}"
            nested = parse_json(read_blob(self.files, desc, "index"), what)
            for i, raw in enumerate(self._check_index(nested, what, desc.media_type)):
                self._expand(parse_descriptor(raw, f"{what} manifests[{i}]"), out, depth + 1)
        # Anything else (artifact manifests, signatures) is not an image: skipped.

    def _select(self, candidates: list[Descriptor], wanted: Platform | None, what: str) -> ResolvedImage:
        if wanted is None and len(candidates) == 1:
            # A lone image is taken whatever its platform, as `docker load` does; only a
            # real choice (or an explicit platform) needs the host's platform.
            return self.image(candidates[0])
        target = wanted or Platform.host()
        seen: list[tuple[Platform | None, Descriptor]] = []
        for desc in candidates:
            if desc.platform is not None:
                seen.append((Platform.from_descriptor(desc.platform), desc))
                continue
            try:  # containerd does the same: no platform in the index -> ask the config
                img = self.image(desc)
            except NotAnImage:
                continue
            seen.append((Platform.parse(img.platform) if img.platform else None, desc))
        if not seen:
            raise NotAnImage(f"{what}: no container image among {len(candidates)} manifests")
        for acceptable in target.acceptable():
            for plat, desc in seen:
                if plat == acceptable:
                    return self.image(desc)
        available = ", ".join(sorted({str(p) if p else "unknown" for p, _ in seen}))
        raise NotFound(f"{what}: no image for platform {target}; available: {available}")

    def image(self, desc: Descriptor) -> ResolvedImage:
        """The image a manifest descriptor points at (names are filled in by the caller)."""
        cached = self._images.get(desc.digest)
        if cached is not None:
            return cached
        what = f"manifest {desc.digest}"
        data = read_blob(self.files, desc, "manifest")
        config_desc, layer_descs = parse_manifest(data, desc.media_type, what)
        layers = [self._layer(d, what) for d in layer_descs]
        config_bytes = read_blob(self.files, config_desc, "config")
        config, diff_ids = parse_config(config_bytes, config_desc.digest, len(layers))
        plat = config_platform(config)
        img = ResolvedImage(
            names=[],
            config_bytes=config_bytes,
            config_digest=config_desc.digest,
            config=config,
            manifest_bytes=data,
            manifest_digest=desc.digest,
            diff_ids=diff_ids,
            layers=layers,
            platform=str(plat) if plat else None,
        )
        self._images[desc.digest] = img
        return img

    def _layer(self, desc: Descriptor, what: str) -> LayerBlob:
        if desc.media_type not in LAYER_TYPES:
            raise InvalidImage(f"{what}: layer {desc.digest} has unsupported media type {desc.media_type!r}")
        if desc.media_type in FOREIGN_LAYER_TYPES and not self.files.exists(blob_name(desc.digest)):
            where = f" (it lives at {', '.join(desc.urls)})" if desc.urls else ""
            raise InvalidImage(
                f"{what}: layer {desc.digest} is a foreign (non-distributable) layer whose blob "
                f"is not in {self.files.path}{where}; copy the image with its foreign layers included"
            )
        name = check_blob_size(self.files, desc.digest, desc.size, "layer")
        return LayerBlob(desc.digest, desc.size, desc.media_type, lambda: self.files.open(name), name)


# -- writing -------------------------------------------------------------------------------

# Docker layer types have OCI equivalents; an OCI manifest should not mix vocabularies.
_TO_OCI_LAYER = {
    DOCKER_LAYER: OCI_LAYER,
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_FOREIGN_GZIP: OCI_LAYER_ND + "+gzip",
}


def canonical_json(obj: object, *, ensure_ascii: bool = False) -> bytes:
    """Compact JSON with sorted keys: the same object always gives the same bytes (and digest).

    Non-ASCII text is written as UTF-8, or as ``\\uXXXX`` escapes with ``ensure_ascii``:
    the image configs layerfs builds and the configs and manifests export rewrites are
    written that way, so their digests stay what they were.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=ensure_ascii).encode()


def synthesize_manifest(config_bytes: bytes, layers: list[tuple[Digest, int, str]]) -> bytes:
    """An OCI image manifest for a config and its layers' ``(digest, size, media_type)``.

    Used for images that arrived without one (old docker archives). Docker layer media
    types are mapped to their OCI names so the manifest is pure OCI.
    """
    config_digest = Digest.of(config_bytes)
    parse_config(config_bytes, config_digest, len(layers))  # a manifest must match its config
    descs = []
    for digest, size, media_type in layers:
        if media_type not in LAYER_TYPES:
            raise InvalidArgument(f"layer {digest}: unsupported media type {media_type!r}")
        if size < 0:
            raise InvalidArgument(f"layer {digest}: negative size {size}")
        descs.append(
            {
                "mediaType": _TO_OCI_LAYER.get(media_type, media_type),
                "digest": Digest.parse(digest),
                "size": size,
            }
        )
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": descs,
        }
    )
