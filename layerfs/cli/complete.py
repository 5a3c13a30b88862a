"""Shell completion of image and container names (click's ``shell_complete`` callbacks).

Completion runs ``layerfs`` with ``_LAYERFS_COMPLETE`` set and the words typed so far; click
parses them without running the group's callback, so the store is found from ``--root`` or
``$LAYERFS_ROOT`` as parsed (the default root otherwise) and read with the store's own
listing functions. A store that does not exist is not created; one that cannot be read
completes nothing: completion never prints an error into the user's command line.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import click
from click.shell_completion import CompletionItem

from layerfs.store import Store, default_root

DOCKER_PREFIXES = ("docker.io/library/", "docker.io/")  # docker's short forms (busybox:latest)


def _store(ctx: click.Context) -> Store | None:
    root = ctx.find_root().params.get("root") or default_root()
    if not os.path.isfile(os.path.join(root, "meta.db")):
        return None
    return Store(root)


def _names(ctx: click.Context, read: Callable[[Store], list[tuple[str, str]]]) -> list[tuple[str, str]]:
    try:
        store = _store(ctx)
        if store is None:
            return []
        try:
            return read(store)
        finally:
            store.close()
    except Exception:  # a store this user cannot read, a damaged one: no completions
        return []


def _image_names(store: Store) -> list[tuple[str, str]]:
    out = []
    for img in store.list_images():
        out.append((img.name, "image"))
        for prefix in DOCKER_PREFIXES:
            if img.name.startswith(prefix):  # busybox:latest finds docker.io/library/busybox:latest
                out.append((img.name.removeprefix(prefix), "image"))
                break
    return out


def _container_names(store: Store) -> list[tuple[str, str]]:
    from layerfs import containers

    return [(c.name, f"container of {c.image}") for c in containers.list_containers(store)]


def _items(ctx: click.Context, incomplete: str, *reads: Callable[[Store], list[tuple[str, str]]]
           ) -> list[CompletionItem]:
    seen: dict[str, str] = {}
    for read in reads:
        for name, what in _names(ctx, read):
            if name.startswith(incomplete):
                seen.setdefault(name, what)
    return [CompletionItem(name, help=what) for name, what in sorted(seen.items())]


def images(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Image names in the store (as stored, and docker's short form of docker.io names)."""
    return _items(ctx, incomplete, _image_names)


def containers(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Container names in the store."""
    return _items(ctx, incomplete, _container_names)


def images_or_containers(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Both (mount, umount, diff, bundle take either)."""
    return _items(ctx, incomplete, _container_names, _image_names)
