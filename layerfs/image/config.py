"""Building OCI image configs: a base image's config (or none) plus new layers.

Used for the images layerfs makes itself: ``import-layer`` (bare tars, no base) and
``commit`` (a container's upper over its image). The config keeps everything of the base
and appends: each new layer's diffID to ``rootfs.diff_ids`` and one ``history`` entry per
new layer. ``created`` (of the image and of each new entry) is Go's RFC 3339 with
nanoseconds in UTC, as docker and buildah write it. The bytes are canonical JSON (sorted
keys, no blanks, ASCII), so the same config always has the same digest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from layerfs.image.oci import Platform, canonical_json
from layerfs.text import rfc3339_nano


def build_config(
    base: Mapping[str, Any] | None,
    diff_ids: Sequence[str],
    history: Sequence[Mapping[str, Any]],
    *,
    created_ns: int | None,
    platform: Platform | None = None,
    author: str | None = None,
) -> tuple[dict[str, Any], bytes]:
    """The config of ``base`` plus layers ``diff_ids`` (bottom first), and its bytes.

    ``history`` holds the new entries (``created_by``, optionally ``comment``), appended to
    the base's; each gets ``created`` and, when given, ``author``, which also becomes the
    image's author. ``created_ns`` (nanoseconds since the epoch) is the image's and the
    new entries' creation time; None writes no ``created`` at all. ``platform`` sets
    ``os``, ``architecture`` and ``variant`` (if it has one); otherwise the base's stay.
    Without a base the image has an empty run config (``"config": {}``).
    """
    config: dict[str, Any] = dict(base) if base is not None else {"config": {}}
    stamp = {"created": rfc3339_nano(created_ns)} if created_ns is not None else {}
    config.update(stamp)
    if platform is not None:
        config["architecture"] = platform.architecture
        config["os"] = platform.os
        if platform.variant:
            config["variant"] = platform.variant
    rootfs = dict(config.get("rootfs") or {"type": "layers"})
    rootfs["diff_ids"] = [*(rootfs.get("diff_ids") or []), *diff_ids]
    config["rootfs"] = rootfs
    entries = [{**stamp, **entry, **({"author": author} if author else {})} for entry in history]
    if author:
        config["author"] = author
    config["history"] = [*(config.get("history") or []), *entries]
    return config, canonical_json(config, ensure_ascii=True)
