"""What the store holds, gathered into the plain records ``layerfs.cli.render`` renders.

Reads image configs (history, created) from the content store and layer rows from the
metadata; computes per-layer changes and image-to-image tree diffs with
``layerfs.layer.changes``. Read-only: nothing here changes the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from layerfs.digest import Digest
from layerfs.layer import changes
from layerfs.store import Image, Store
from layerfs.text import parse_rfc3339
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
class ImageInfo:
    """One image name and what it points at."""

    name: str  # "repo/path:tag", or "repo@sha256:..." (then its TAG is "<none>")
    image_id: str  # config digest
    created: datetime | None
    layers: tuple[LayerInfo, ...]  # bottom first
    manifest_digest: str | None = None

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
                     layers=tuple(layers), manifest_digest=img.manifest_digest)


def all_images(store: Store) -> list[ImageInfo]:
    return [image_info(store, img) for img in store.list_images()]


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


def resolve_image(store: Store, ref: str) -> Image:
    """An image by name, by (a prefix of) its image id, or by full config digest."""
    from layerfs.image.source import normalize_ref

    img = store.find_image(ref)
    if img is not None:
        return img
    candidates = []
    probe = ref.removeprefix("sha256:")
    if 4 <= len(probe) <= 64 and all(c in "0123456789abcdef" for c in probe):
        candidates = [i for i in store.list_images() if Digest(i.config_digest).hex.startswith(probe)]
        if len({c.config_digest for c in candidates}) == 1:
            return candidates[0]
    return store.get_image(normalize_ref(ref))
