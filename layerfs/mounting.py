"""Mounting images and containers from the store, and recording what is mounted.

An image or a container is described (``layerfs.mount.spec.snapshot_spec`` over the
store's layer directories); this module has ``layerfs.mount.backend`` choose a backend, has
that backend mount the description and records each mount (``Store.mounts``), so that
``rmi``/``gc``/``rm`` refuse to remove what is in use.

Record lifecycle: the record is committed *before* the mount syscall (carrying the pid of
the process mounting) and deleted if the mount fails, so a crash can leave a record without
a mount but never a layerfs mount without a record. Stale records (see
``layerfs.store.records`` for the rule) are dropped whenever records are listed, and by the store
before rmi, gc and rm check what is in use.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from layerfs import containers
from layerfs.errors import InUse, InvalidArgument, LayerfsError, NotFound, Unsupported
from layerfs.linux.mountinfo import mount_table
from layerfs.linux.proc import boot_id
from layerfs.mount.backend import decide, for_format
from layerfs.mount.spec import BIND, MountSpec, snapshot_spec
from layerfs.mount.users import check_upper_free
from layerfs.store import Image, MountRecord, Store
from layerfs.store.schema import now_ns


def records(store: Store, prune: bool = True) -> list[MountRecord]:
    """Live mount records; stale ones are dropped (with ``prune``)."""
    return store.mounts.live(prune=prune)


def image_spec(store: Store, img: Image, *, dev: bool = False, suid: bool = False) -> MountSpec:
    """A read-only view of an image: nodev,nosuid unless asked (it is for inspection)."""
    lowers = store.layer_dirs(img.top_chain_id)
    if not lowers:
        raise InvalidArgument(f"image {img.name} has no layers: nothing to mount")
    extra = [o for o, keep in (("nodev", not dev), ("nosuid", not suid)) if keep]
    return for_format(snapshot_spec(lowers, readonly=True, extra=extra), store.fmt)


def container_spec(store: Store, c: containers.Container) -> MountSpec:
    """A container read-write: its upper over its image's layers (without layers, the upper alone)."""
    spec = snapshot_spec(containers.lowers(store, c), containers.upper(store, c), store.work_dir(c.snapshot.id))
    return for_format(spec, store.fmt)


def _with_reason(e: LayerfsError, reason: str | None) -> LayerfsError:
    """``e`` again (same class, so the same exit code) with why the kernel was not used."""
    if reason is None:
        return e
    try:
        return type(e)(f"{e} (kernel overlayfs was not used: {reason})")
    except TypeError:
        return LayerfsError(f"{e} (kernel overlayfs was not used: {reason})")


def check_single_writer(spec: MountSpec, what: str) -> None:
    """Refuse a read-write ``spec`` whose upper a live mount already writes into (the
    kernel warns "upperdir is in-use ... undefined behavior" and mounts anyway; FUSE does not
    notice at all). The store's own records are checked atomically by ``Store.mounts.add``."""
    upper = spec.upper if spec.type != BIND else (spec.source if not spec.readonly else None)
    if spec.readonly or upper is None:
        return
    check_upper_free(upper, what, "layerfs umount")


def mount(store: Store, spec: MountSpec, snapshot_key: str, target: str, backend: str = "auto",
          log: Callable[[str], None] | None = None) -> MountRecord:
    """Mount ``spec`` on ``target`` and record it under ``snapshot_key``.

    ``auto`` falls back to FUSE when the kernel refuses the mount (``Unsupported``, which
    includes EPERM). A FUSE record carries the pid of the daemon serving it.

    A writable snapshot has one read-write mount at a time: a second is refused
    (``InUse``, naming the first mount's target, backend and pid) whether the first was
    recorded by layerfs (checked in the transaction that records this one) or made by
    another program (``layerfs.mount.users``). ``log`` is told which backend was chosen and why.
    """
    from layerfs.mount import fuse, kernel

    target = os.path.realpath(target)
    if not os.path.isdir(target):
        raise NotFound(f"mount point {target} does not exist or is not a directory")
    chosen, why_not_kernel, because = decide(backend, spec, store.root, store.fmt)
    if log is not None:
        log(f"backend {backend}: {because}")
    store.mounts.prune()  # drop stale records first, so a stale one does not block this target
    what = ("container " + snapshot_key.removeprefix(containers.KEY_PREFIX)
            if snapshot_key.startswith(containers.KEY_PREFIX) else f"snapshot {snapshot_key}")
    check_single_writer(spec, what)
    rec = MountRecord(target, snapshot_key, chosen, spec.readonly, os.getpid(), boot_id(), now_ns())
    store.mounts.add(rec, what)  # AlreadyExists when the target has a record; InUse for a second writer
    try:
        if chosen == "kernel":
            try:
                kernel.mount(spec, target)
            except Unsupported as e:
                if backend != "auto" or (spec.type == BIND and not spec.readonly):
                    raise
                chosen, why_not_kernel = "fuse", str(e)
                if log is not None:
                    log(f"backend auto: FUSE, as the kernel refused: {e}")
            else:
                rec = MountRecord(target, snapshot_key, "kernel", spec.readonly, None, rec.boot_id, rec.created_ns)
                store.mounts.update(target, rec.backend, None)  # live now: no longer pending on this process
        if chosen == "fuse":
            try:
                pid = fuse.mount(spec, target, layer_format=store.fmt.name)
            except LayerfsError as e:
                raise _with_reason(e, why_not_kernel) from e
            rec = MountRecord(target, snapshot_key, "fuse", spec.readonly, pid, rec.boot_id, rec.created_ns)
            store.mounts.update(target, rec.backend, rec.pid)
    except BaseException:
        store.mounts.remove(target)
        raise
    return rec


def mount_ref(store: Store, name: str, target: str, backend: str = "auto", *, dev: bool = False,
              suid: bool = False, log: Callable[[str], None] | None = None) -> MountRecord:
    """``layerfs mount NAME``: a container read-write, or an image read-only."""
    from layerfs.catalog import resolve_image

    c = containers.find(store, name)
    if c is not None:
        return mount(store, container_spec(store, c), c.key, target, backend, log)
    img = resolve_image(store, name)
    return mount(store, image_spec(store, img, dev=dev, suid=suid), str(img.top_chain_id), target, backend, log)


def umount(store: Store, target: str, detach: bool = False) -> MountRecord:
    """Unmount what layerfs mounted on ``target`` and drop its record.

    A FUSE mount's daemon is waited for (SIGTERM/SIGKILL if it lingers); with ``detach``
    it keeps serving files still open and exits when the last one closes.
    """
    from layerfs.mount import fuse, kernel

    path = os.path.realpath(target)
    store.make_room()  # the record must go even on a full disk (a container may have filled it)
    rec = store.mounts.get(path)
    if rec is None:
        raise NotFound(f"{target} is not mounted by layerfs")
    mounted = any(m.mount_point == path for m in mount_table())
    try:
        if rec.backend == "fuse":
            if mounted:
                fuse.unmount(path, rec.pid, detach=detach)
            elif rec.pid is not None and not detach and rec.boot_id == boot_id():
                fuse.stop(rec.pid, path)  # the mount went some other way: the daemon goes too
        elif mounted:
            kernel.unmount(path, detach=detach)
    except InUse as e:
        # the backends' hints name their Python API; the user's is the CLI's --lazy
        raise InUse(f"cannot unmount {path}: it is busy (open files, a working directory or mounts inside); "
                    f"'layerfs umount --lazy {path}' detaches it now and lets it go once it is idle") from e
    store.mounts.remove(path)
    return rec


def container_listing(store: Store, size: bool = False) -> list[tuple[containers.Container, list[str], int | None]]:
    """``layerfs ps``: every container with where it is mounted and (``size``) the bytes
    of its upper, read in one state of the store (retried past a concurrent ``rm``)."""
    store.mounts.prune()

    def read() -> list[tuple[containers.Container, list[str], int | None]]:
        mounted: dict[str, list[str]] = {}
        for r in records(store):
            mounted.setdefault(r.snapshot_key, []).append(r.target)
        return [(c, mounted.get(c.key, []), containers.usage(store, c)[0] if size else None)
                for c in containers.list_containers(store)]

    return store.reading(read)


def remove_container(store: Store, name: str, force: bool = False) -> None:
    """``layerfs rm NAME``: remove a container and its changes. Refused while it is
    mounted, unless ``force``: then every layerfs mount of it is unmounted first."""
    c = containers.get(store, name)
    if force:
        for r in records(store):
            if r.snapshot_key == c.key:
                umount(store, r.target)
    containers.remove(store, name)
