"""What the store holds, gathered into the plain records ``layerfs.cli.render`` renders.

Reads image configs (history, created) from the content store and layer rows from the
metadata; computes per-layer changes and image-to-image tree diffs with
``layerfs.layer.changes``. Read-only: nothing here changes the store.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from layerfs.digest import Digest
from layerfs.errors import InvalidArgument, NotFound
from layerfs.image.ref import canonical_ref, canonical_reference, normalize_ref, split_tag
from layerfs.layer import changes
from layerfs.store import Image, Store
from layerfs.text import parse_rfc3339, parse_rfc3339_ns, utc
from layerfs.union.view import LayerStack


@dataclass(frozen=True)
class LayerInfo:
    """One committed layer as an image sees it."""

    chain_id: str  # "sha256:<64hex>"
    diff_id: str
    parent: str | None  # chain id of the layer below, None for a base layer
    size: int  # bytes of this layer's own content
    created_by: str = ""  # from the config history (non-empty-layer entries)
    created: datetime | None = None
    comment: str = ""


@dataclass(frozen=True)
class HistoryStep:
    """One entry of the config's history, config-only steps (``empty_layer``: ENV, CMD,
    LABEL ...) included, as ``docker history`` lists them."""

    created_by: str
    created: datetime | None
    created_ns: int | None  # the same time with all its nanoseconds
    comment: str = ""
    author: str = ""
    empty_layer: bool = False
    layer: LayerInfo | None = None  # the layer the step made; None for a config-only step


@dataclass(frozen=True)
class ImageInfo:
    """One image name and what it points at."""

    name: str  # "repo/path:tag", or "repo@sha256:..." (then its TAG is "<none>")
    image_id: str  # config digest
    created: datetime | None
    layers: tuple[LayerInfo, ...]  # bottom first
    manifest_digest: str | None = None
    # every history step, bottom first; empty when the config's history does not match its
    # layers (then only ``layers`` can be shown)
    history: tuple[HistoryStep, ...] = ()
    labels: dict[str, str] = field(default_factory=dict, compare=False)  # the config's Labels
    created_ns: int | None = field(default=None, compare=False)  # ``created`` with all nine digits

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True)
class DfRow:
    """One line of ``layerfs df``; ``kind`` is "Images", "Layers", "Containers" or "Blobs"."""

    kind: str
    total: int  # how many objects of this kind
    active: int  # how many are in use (by an image, a container, a mount)
    size: int  # bytes
    reclaimable: int  # bytes that removing the unused ones would free


def read_config(store: Store, img: Image) -> dict[str, Any]:
    data = json.loads(store.content.read(img.config_digest))
    return data if isinstance(data, dict) else {}


def image_info(store: Store, img: Image) -> ImageInfo:
    config = read_config(store, img)
    history = [h for h in config.get("history", []) or [] if isinstance(h, dict) and not h.get("empty_layer")]
    chain = list(reversed(store.chain(img.top_chain_id))) if img.top_chain_id else []
    layers = []
    for i, snap in enumerate(chain):
        h = history[i] if i < len(history) and len(history) == len(chain) else {}
        layers.append(LayerInfo(
            chain_id=snap.key,
            diff_id=snap.diff_id or "",
            parent=chain[i - 1].key if i else None,
            size=snap.size,
            created_by=str(h.get("created_by", "")),
            created=parse_rfc3339(h.get("created")),
            comment=str(h.get("comment", "")),
        ))
    return ImageInfo(name=img.name, image_id=img.config_digest, created=parse_rfc3339(config.get("created")),
                     layers=tuple(layers), manifest_digest=img.manifest_digest,
                     history=_history_steps(config, layers), labels=_labels(config),
                     created_ns=parse_rfc3339_ns(config.get("created")))


def _labels(config: dict[str, Any]) -> dict[str, str]:
    run = config.get("config")
    labels = run.get("Labels") if isinstance(run, dict) else None
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def _history_steps(config: dict[str, Any], layers: list[LayerInfo]) -> tuple[HistoryStep, ...]:
    entries = [h for h in config.get("history", []) or [] if isinstance(h, dict)]
    if sum(1 for h in entries if not h.get("empty_layer")) != len(layers):
        return ()
    steps = []
    below = iter(layers)
    for h in entries:
        empty = bool(h.get("empty_layer"))
        steps.append(HistoryStep(
            created_by=str(h.get("created_by", "")),
            created=parse_rfc3339(h.get("created")),
            created_ns=parse_rfc3339_ns(h.get("created")),
            comment=str(h.get("comment", "")),
            author=str(h.get("author", "")),
            empty_layer=empty,
            layer=None if empty else next(below),
        ))
    return tuple(steps)


def all_images(store: Store) -> list[ImageInfo]:
    return [image_info(store, img) for img in store.list_images()]


IMAGE_FILTERS = ("reference", "dangling", "before", "since", "label")


def _glob(pattern: str) -> re.Pattern[str]:
    """docker's ``path.Match`` for reference filters: ``*`` and ``?`` stop at ``/``."""
    out = []
    for ch in pattern:
        out.append("[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch))
    return re.compile("".join(out))


def _find_info(infos: Sequence[ImageInfo], ref: str, what: str) -> ImageInfo:
    for info in infos:
        if info.name == ref or _canonical(info.name) == _canonical(ref) or \
                Digest(info.image_id).hex.startswith(ref.removeprefix("sha256:") or "-"):
            return info
    raise NotFound(f"{what}: image {ref} not found")


def filter_images(infos: Sequence[ImageInfo], filters: Sequence[str] = (),
                  repository: str | None = None) -> list[ImageInfo]:
    """``docker images [REPOSITORY[:TAG]] --filter KEY=VALUE ...``: every filter must hold
    (several of one key: any of them). Keys: ``reference=PATTERN`` (``*`` and ``?`` within a
    path component, against ``repo:tag`` and ``repo``), ``dangling=true|false`` (no tag),
    ``before=REF``/``since=REF`` (created before/after that image), ``label=KEY[=VALUE]``.
    A REPOSITORY matches in docker's normal form (``busybox`` is ``docker.io/library/busybox``)."""
    by_key: dict[str, list[str]] = {}
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep or key not in IMAGE_FILTERS:
            raise InvalidArgument(f"invalid filter {f!r}: expected KEY=VALUE with KEY one of {', '.join(IMAGE_FILTERS)}")
        if key == "dangling" and value.lower() not in ("true", "false", "1", "0"):
            raise InvalidArgument(f"invalid filter {f!r}: dangling is true or false")
        by_key.setdefault(key, []).append(value)
    out = list(infos)
    if repository is not None:
        want = canonical_reference(repository) if repository else None
        has_tag = split_tag(repository.partition("@")[0])[1] is not None
        out = [i for i in out if want is not None and _same_repo(i.name, want.repository, want.tag if has_tag else None)]
    if "reference" in by_key:
        pats = [_glob(p) for p in by_key["reference"]]
        out = [i for i in out if any(p.fullmatch(i.name) or p.fullmatch(split_tag(i.name)[0]) for p in pats)]
    for value in by_key.get("dangling", [])[-1:]:
        dangling = value.lower() in ("true", "1")
        out = [i for i in out if (split_tag(i.name)[1] is None) == dangling]
    for key in ("before", "since"):
        for ref in by_key.get(key, []):
            pivot = _find_info(infos, ref, f"--filter {key}")
            if pivot.created is None:
                out = []
                continue
            created = utc(pivot.created)
            out = [i for i in out if i.created is not None and
                   (utc(i.created) < created if key == "before" else utc(i.created) > created)]
    for spec in by_key.get("label", []):
        k, eq, v = spec.partition("=")
        out = [i for i in out if k in i.labels and (not eq or i.labels[k] == v)]
    return out


def _same_repo(name: str, repository: str, tag: str | None) -> bool:
    try:
        ref = canonical_reference(name)
    except InvalidArgument:
        return False
    return ref.repository == repository and (tag is None or ref.tag == tag)


def layer_diffs(store: Store, img: Image) -> list[tuple[LayerInfo, list[tuple[str, str]]]]:
    """Per layer (bottom first): what it adds, changes and deletes against the layers below."""
    info = image_info(store, img)
    dirs = list(reversed(store.layer_dirs(img.top_chain_id)))  # bottom first
    out = []
    for i, layer in enumerate(info.layers):
        lowers = list(reversed(dirs[:i]))  # top first
        out.append((layer, [(c.kind, c.path) for c in changes.layer_changes(dirs[i], lowers)]))
    return out


def image_tree_diff(store: Store, a: Image, b: Image) -> list[tuple[str, str]]:
    sa = LayerStack(store.layer_dirs(a.top_chain_id))
    sb = LayerStack(store.layer_dirs(b.top_chain_id))
    return [(c.kind, c.path) for c in changes.tree_diff(sa, sb)]


def df_rows(store: Store) -> list[DfRow]:
    images = store.list_images()
    snaps = store.list_snapshots()
    used: set[str] = set()
    for img in images:
        if img.top_chain_id:
            used.update(s.key for s in store.chain(img.top_chain_id))
    layers = [s for s in snaps if s.kind == "committed"]
    unused_layers = [s for s in layers if s.key not in used]
    containers = [s for s in snaps if s.kind != "committed"]
    blob_rows = store.blob_sizes()  # (digest, size, listed by an image)
    image_size = sum(s.size for s in layers if s.key in used)
    distinct_images = {img.config_digest for img in images}
    return [
        DfRow("Images", len(distinct_images), len(distinct_images), image_size, 0),
        DfRow("Layers", len(layers), len(layers) - len(unused_layers), sum(s.size for s in layers),
              sum(s.size for s in unused_layers)),
        DfRow("Containers", len(containers), len(containers), sum(s.size for s in containers), 0),
        DfRow("Blobs", len(blob_rows), sum(1 for _, _, used in blob_rows if used),
              sum(size for _, size, _ in blob_rows), sum(size for _, size, used in blob_rows if not used)),
    ]


def _canonical(name: str) -> str | None:
    try:
        return canonical_ref(name)
    except InvalidArgument:
        return None


def resolve_image(store: Store, ref: str) -> Image:
    """An image by name, by (a prefix of) its image id, or by full config digest.

    Names are tried as written, then with ``:latest`` added, then in docker's normal form
    (``busybox`` finds ``docker.io/library/busybox:latest``, ``docker.io/demo/x:1`` finds
    ``demo/x:1``). A miss names the closest stored names."""
    img = store.find_image(ref)
    if img is not None:
        return img
    images = store.list_images()
    probe = ref.removeprefix("sha256:")
    if 4 <= len(probe) <= 64 and all(c in "0123456789abcdef" for c in probe):
        candidates = [i for i in images if Digest(i.config_digest).hex.startswith(probe)]
        if len({c.config_digest for c in candidates}) == 1:
            return candidates[0]
        if candidates:
            raise InvalidArgument(f"image id {ref} is ambiguous: it starts {len(candidates)} images' ids")
    normal = normalize_ref(ref)
    img = store.find_image(normal)
    if img is not None:
        return img
    wanted = _canonical(normal)
    same = [i for i in images if wanted is not None and _canonical(i.name) == wanted]
    if len({i.config_digest for i in same}) == 1:
        return same[0]
    if same:
        raise InvalidArgument(f"image {ref} is ambiguous: {', '.join(sorted(i.name for i in same))}")
    raise NotFound(f"image {normal} not found{_suggest(normal, [i.name for i in images])}")


def _suggest(name: str, names: list[str]) -> str:
    """`` (did you mean: a, b?)`` with the (at most 3) stored names closest to ``name``,
    compared whole, by repository and by its last path component (``busybx`` is close to
    ``docker.io/library/busybox:latest``)."""
    def forms(n: str) -> list[str]:
        repo, tag = split_tag(n)
        short = repo.rpartition("/")[2]
        return [n, repo, short, f"{short}:{tag}" if tag else short]

    wanted = forms(name)
    scored = []
    for n in set(names):
        score = max(difflib.SequenceMatcher(None, a, b).ratio() for a in wanted for b in forms(n))
        if score >= 0.6:  # ties broken by how close the whole names are
            scored.append((-score, -difflib.SequenceMatcher(None, name, n).ratio(), n))
    close = [n for _, _, n in sorted(scored)[:3]]
    return f" (did you mean: {', '.join(close)}?)" if close else ""


@dataclass(frozen=True)
class LayerBlobInfo:
    """One layer of a manifest: its blob as the manifest describes it."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None


@dataclass(frozen=True)
class ImageDetails:
    """What ``layerfs inspect`` shows: skopeo inspect's fields and the config's run settings."""

    name: str
    image_id: str  # config digest
    manifest_digest: str
    repo_tags: tuple[str, ...]  # every name of this image in the store
    created: str | None  # as the config has it
    author: str
    docker_version: str
    architecture: str
    os: str
    variant: str
    labels: dict[str, str] | None
    env: tuple[str, ...]
    cmd: tuple[str, ...] | None
    entrypoint: tuple[str, ...] | None
    working_dir: str
    user: str
    exposed_ports: tuple[str, ...]
    volumes: tuple[str, ...]
    stop_signal: str
    layers: tuple[LayerBlobInfo, ...]  # bottom first
    diff_ids: tuple[str, ...]
    manifest_media_type: str
    manifest_bytes: bytes  # as stored
    config_bytes: bytes  # as stored


def _strings(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    if isinstance(value, str):  # a shell-form Cmd some tools write
        return (value,)
    return None


def image_details(store: Store, img: Image) -> ImageDetails:
    manifest_bytes = store.content.read(img.manifest_digest)
    config_bytes = store.content.read(img.config_digest)
    manifest = json.loads(manifest_bytes)
    config = json.loads(config_bytes)
    manifest = manifest if isinstance(manifest, dict) else {}
    config = config if isinstance(config, dict) else {}
    run = config.get("config") if isinstance(config.get("config"), dict) else {}
    assert isinstance(run, dict)
    labels = run.get("Labels")
    layers = tuple(
        LayerBlobInfo(str(d.get("mediaType", "")), str(d.get("digest", "")), int(d.get("size", 0)),
                      d.get("annotations") if isinstance(d.get("annotations"), dict) else None)
        for d in manifest.get("layers") or [] if isinstance(d, dict)
    )
    rootfs = config.get("rootfs") if isinstance(config.get("rootfs"), dict) else {}
    assert isinstance(rootfs, dict)
    names = sorted(i.name for i in store.list_images() if i.config_digest == img.config_digest)
    return ImageDetails(
        name=img.name,
        image_id=img.config_digest,
        manifest_digest=img.manifest_digest,
        repo_tags=tuple(names),
        created=str(config["created"]) if config.get("created") else None,
        author=str(config.get("author", "")),
        docker_version=str(config.get("docker_version", "")),
        architecture=str(config.get("architecture", "")),
        os=str(config.get("os", "")),
        variant=str(config.get("variant", "")),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else None,
        env=_strings(run.get("Env")) or (),
        cmd=_strings(run.get("Cmd")),
        entrypoint=_strings(run.get("Entrypoint")),
        working_dir=str(run.get("WorkingDir", "")),
        user=str(run.get("User", "")),
        exposed_ports=tuple(sorted(run.get("ExposedPorts") or {})),
        volumes=tuple(sorted(run.get("Volumes") or {})),
        stop_signal=str(run.get("StopSignal", "")),
        layers=layers,
        diff_ids=tuple(str(d) for d in rootfs.get("diff_ids") or []),
        manifest_media_type=str(manifest.get("mediaType", "")),
        manifest_bytes=manifest_bytes,
        config_bytes=config_bytes,
    )


DIFF_TYPES = ("file", "size", "history", "metadata")


@dataclass(frozen=True)
class ImageComparison:
    """``layerfs diff REF1 REF2 --type ...``, by type as container-diff compares: files
    (A/C/D of the merged trees), sizes, history (created_by lines only in one), metadata
    (config settings only in one: ``-`` in the first image, ``+`` in the second)."""

    first: str
    second: str
    types: tuple[str, ...]
    files: tuple[tuple[str, str], ...] = ()  # (A/C/D, path)
    sizes: tuple[int, int] = (0, 0)
    history: tuple[tuple[str, str], ...] = ()  # ("-" or "+", created_by)
    metadata: tuple[tuple[str, str], ...] = ()  # ("-" or "+", "Env: A=1")

    @property
    def differ(self) -> bool:
        return bool(self.files or self.history or self.metadata
                    or ("size" in self.types and self.sizes[0] != self.sizes[1]))


def _settings(store: Store, img: Image) -> list[str]:
    d = image_details(store, img)
    out = [f"Env: {e}" for e in d.env]
    out += [f"Label: {k}={v}" for k, v in sorted((d.labels or {}).items())]
    out += [f"ExposedPort: {p}" for p in d.exposed_ports] + [f"Volume: {v}" for v in d.volumes]
    out += [f"Cmd: {json.dumps(list(d.cmd))}" if d.cmd is not None else "Cmd: null",
            f"Entrypoint: {json.dumps(list(d.entrypoint))}" if d.entrypoint is not None else "Entrypoint: null",
            f"WorkingDir: {d.working_dir}", f"User: {d.user}", f"StopSignal: {d.stop_signal}",
            f"Platform: {d.os}/{d.architecture}" + (f"/{d.variant}" if d.variant else ""), f"Author: {d.author}"]
    return out


def _only_in(a: Sequence[str], b: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``-`` lines only in ``a``, ``+`` lines only in ``b``, in difflib's order."""
    return tuple((line[0], line[2:]) for line in difflib.ndiff(list(a), list(b)) if line[:1] in "-+")


def compare_images(store: Store, a: Image, b: Image, types: Sequence[str] = ("file",)) -> ImageComparison:
    wanted = tuple(t for t in DIFF_TYPES if t in types)
    unknown = set(types) - set(DIFF_TYPES)
    if unknown or not wanted:
        raise InvalidArgument(f"diff --type: {', '.join(sorted(unknown)) or 'none'}: expected {', '.join(DIFF_TYPES)}")
    ia, ib = image_info(store, a), image_info(store, b)
    history_a = [s.created_by for s in ia.history] or [layer.created_by for layer in ia.layers]
    history_b = [s.created_by for s in ib.history] or [layer.created_by for layer in ib.layers]
    return ImageComparison(
        first=a.name, second=b.name, types=wanted,
        files=tuple(image_tree_diff(store, a, b)) if "file" in wanted else (),
        sizes=(ia.size, ib.size),
        history=_only_in(history_a, history_b) if "history" in wanted else (),
        metadata=_only_in(_settings(store, a), _settings(store, b)) if "metadata" in wanted else (),
    )


@dataclass(frozen=True)
class DfImage:
    """One image in ``layerfs df -v``: its layers' bytes, shared with other images or its own."""

    name: str
    image_id: str
    created: datetime | None
    size: int  # all its layers
    shared: int  # layers another image (another image ID) stands on too
    unique: int  # layers only this image ID has
    containers: int  # containers whose snapshot stands on its top layer


def df_images(store: Store) -> list[DfImage]:
    """``docker system df -v``'s images: per image (one row per name, as ``images``) the size,
    the shared and the unique size. Two names of one image ID share nothing between them."""
    infos = all_images(store)
    users: dict[str, set[str]] = {}  # chain id -> image ids standing on it
    for info in infos:
        for layer in info.layers:
            users.setdefault(layer.chain_id, set()).add(info.image_id)
    by_id = {s.id: s for s in store.list_snapshots()}
    on_top: dict[str, int] = {}  # chain id -> containers (active snapshots) right above it
    for snap in by_id.values():
        if snap.kind == "active" and snap.parent_id in by_id:
            key = by_id[snap.parent_id].key
            on_top[key] = on_top.get(key, 0) + 1
    out = []
    for info in infos:
        shared = sum(layer.size for layer in info.layers if len(users[layer.chain_id]) > 1)
        top = info.layers[-1].chain_id if info.layers else None
        out.append(DfImage(info.name, info.image_id, info.created, info.size, shared, info.size - shared,
                           on_top.get(top, 0) if top else 0))
    return out
