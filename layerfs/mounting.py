"""Mounting images and containers from the store, and the records of what is mounted.

The store and containers *describe* mounts (``MountSpec``); this module asks the backend in
``layerfs/mount/`` to execute them and records each one in the ``mounts`` table, so that
``rmi``/``gc``/``rm`` refuse to remove what is in use.

Record lifecycle: the record is committed *before* the mount syscall (carrying the pid of
the process mounting) and deleted if the mount fails, so a crash can leave a record without
a mount but never a layerfs mount without a record. A record is *stale* when it was made in
another boot (``/proc/sys/kernel/random/boot_id`` differs), or when its target is not a
mount point and its pid (the mounting process while pending, the daemon for FUSE) is gone;
stale records are dropped whenever records are listed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from layerfs import containers
from layerfs.errors import AlreadyExists, InvalidArgument, LayerfsError, NotFound, Unsupported
from layerfs.linux.proc import boot_id, pid_alive
from layerfs.mount.spec import BIND, OVERLAY, WRITABLE_OVERLAY_OPTIONS, MountSpec
from layerfs.store import Image, Store
from layerfs.store.schema import now_ns

BACKENDS = ("auto", "kernel", "fuse")


@dataclass(frozen=True)
class MountRecord:
    target: str
    snapshot_key: str
    backend: str
    readonly: bool
    pid: int | None
    boot_id: str
    created_ns: int


def _mount_points() -> set[str]:
    from layerfs.linux.mountinfo import mount_table

    return {m.mount_point for m in mount_table()}


def records(store: Store, prune: bool = True) -> list[MountRecord]:
    """Live mount records; stale ones are dropped (with ``prune``)."""
    rows = store.meta.db.execute("SELECT * FROM mounts ORDER BY target").fetchall()
    live: list[MountRecord] = []
    stale: list[MountRecord] = []
    if rows:
        points, boot = _mount_points(), boot_id()
        for r in rows:
            rec = MountRecord(r["target"], r["snapshot_key"], r["backend"], bool(r["readonly"]), r["pid"],
                              r["boot_id"], r["created_ns"])
            # A record is made before its mount exists (see the module docstring) and carries
            # the pid of the process making it until then: while that lives, it is pending,
            # not stale. A FUSE record keeps its daemon's pid.
            alive = rec.boot_id == boot and (rec.target in points or pid_alive(rec.pid))
            (live if alive else stale).append(rec)
    if prune and stale:
        with store.meta.transaction() as db:
            db.executemany("DELETE FROM mounts WHERE target=?", [(r.target,) for r in stale])
    return live


def image_spec(store: Store, img: Image, *, dev: bool = False, suid: bool = False) -> MountSpec:
    """A read-only view of an image: nodev,nosuid unless asked (it is for inspection)."""
    lowers = store.layer_dirs(img.top_chain_id)
    if not lowers:
        raise InvalidArgument(f"image {img.name} has no layers: nothing to mount")
    extra = [o for o, keep in (("nodev", not dev), ("nosuid", not suid)) if keep]
    spec = MountSpec.overlay(lowers, readonly=True)
    return MountSpec(spec.type, spec.source, (*spec.options, *extra))


def container_spec(store: Store, c: containers.Container) -> MountSpec:
    lowers = containers.lowers(store, c)
    upper = containers.upper(store, c)
    if not lowers:  # an image with no layers: the upper is the whole tree
        return MountSpec.bind(upper, readonly=False)
    return MountSpec.overlay(lowers, upper, store.work_dir(c.snapshot.id), extra=WRITABLE_OVERLAY_OPTIONS)


def _choose_backend(backend: str, spec: MountSpec, store_root: str | None = None) -> tuple[str, str | None]:
    """The backend to try first, and (for ``auto`` choosing FUSE) why not the kernel.

    ``auto`` takes kernel overlayfs when the kernel has it, the spec fits its 500-layer
    limit and the store's filesystem can hold overlay layers; FUSE otherwise. ``fuse`` serves
    every union over FUSE; a writable bind (a container without image layers) needs no
    union and is always the kernel's.
    """
    from layerfs.mount.probe import OVL_MAX_STACK, backing_fs, probe

    if backend not in BACKENDS:
        raise InvalidArgument(f"unknown backend {backend!r} (auto, kernel or fuse)")
    if spec.type == BIND and not spec.readonly:
        return "kernel", None
    if backend == "fuse":
        return "fuse", None
    info = probe()
    if backend == "kernel" or spec.type == BIND:
        if spec.type == OVERLAY and not info.overlay_available:
            raise Unsupported(f"kernel overlayfs is not available here ({info.why.get('overlay_available', '')})")
        return "kernel", None
    why: str | None = None
    if spec.type == OVERLAY and not info.overlay_available:
        why = f"not available here ({info.why.get('overlay_available', '')})"
    elif len(spec.lowers) > OVL_MAX_STACK:
        why = f"{len(spec.lowers)} layers exceed its limit of {OVL_MAX_STACK}"
    elif store_root is not None:
        why = backing_fs(store_root).overlay_problem(info.privileged)
    return ("fuse", why) if why else ("kernel", None)


def _with_reason(e: LayerfsError, reason: str | None) -> LayerfsError:
    """``e`` again (same class, so the same exit code) with why the kernel was not used."""
    if reason is None:
        return e
    try:
        return type(e)(f"{e} (kernel overlayfs was not used: {reason})")
    except TypeError:
        return LayerfsError(f"{e} (kernel overlayfs was not used: {reason})")


def mount(store: Store, spec: MountSpec, snapshot_key: str, target: str, backend: str = "auto") -> MountRecord:
    """Mount ``spec`` on ``target`` and record it under ``snapshot_key``.

    ``auto`` falls back to FUSE when the kernel refuses the mount (``Unsupported``, which
    includes EPERM). A FUSE record carries the pid of the daemon serving it.
    """
    from layerfs.mount import fuse, kernel

    target = os.path.realpath(target)
    if not os.path.isdir(target):
        raise NotFound(f"mount point {target} does not exist or is not a directory")
    chosen, why_not_kernel = _choose_backend(backend, spec, store.root)
    records(store)  # drop stale records first, so a stale one does not block this target
    rec = MountRecord(target, snapshot_key, chosen, spec.readonly, os.getpid(), boot_id(), now_ns())
    with store.meta.transaction() as db:
        if db.execute("SELECT 1 FROM mounts WHERE target=?", (target,)).fetchone():
            raise AlreadyExists(f"{target} already has a layerfs mount")
        db.execute("INSERT INTO mounts VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (rec.target, rec.snapshot_key, rec.backend, int(rec.readonly), rec.pid, rec.boot_id,
                    rec.created_ns))
    try:
        if chosen == "kernel":
            try:
                kernel.mount(spec, target)
            except Unsupported as e:
                if backend != "auto" or (spec.type == BIND and not spec.readonly):
                    raise
                chosen, why_not_kernel = "fuse", str(e)
            else:
                rec = MountRecord(target, snapshot_key, "kernel", spec.readonly, None, rec.boot_id, rec.created_ns)
                with store.meta.transaction() as db:  # live now: no longer pending on this process
                    db.execute("UPDATE mounts SET pid=NULL WHERE target=?", (target,))
        if chosen == "fuse":
            try:
                pid = fuse.mount(spec, target)
            except LayerfsError as e:
                raise _with_reason(e, why_not_kernel) from e
            rec = MountRecord(target, snapshot_key, "fuse", spec.readonly, pid, rec.boot_id, rec.created_ns)
            with store.meta.transaction() as db:
                db.execute("UPDATE mounts SET backend=?, pid=? WHERE target=?", (rec.backend, rec.pid, target))
    except BaseException:
        with store.meta.transaction() as db:
            db.execute("DELETE FROM mounts WHERE target=?", (target,))
        raise
    return rec


def mount_ref(store: Store, name: str, target: str, backend: str = "auto", *, dev: bool = False,
              suid: bool = False) -> MountRecord:
    """``layerfs mount NAME``: a container read-write, or an image read-only."""
    from layerfs.catalog import resolve_image

    c = containers.find(store, name)
    if c is not None:
        return mount(store, container_spec(store, c), c.key, target, backend)
    img = resolve_image(store, name)
    return mount(store, image_spec(store, img, dev=dev, suid=suid), str(img.top_chain_id), target, backend)


def umount(store: Store, target: str, detach: bool = False) -> MountRecord:
    """Unmount what layerfs mounted on ``target`` and drop its record.

    A FUSE mount's daemon is waited for (SIGTERM/SIGKILL if it lingers); with ``detach``
    it keeps serving files still open and exits when the last one closes.
    """
    from layerfs.mount import fuse, kernel

    path = os.path.realpath(target)
    row = store.meta.db.execute("SELECT * FROM mounts WHERE target=?", (path,)).fetchone()
    if row is None:
        raise NotFound(f"{target} is not mounted by layerfs")
    rec = MountRecord(row["target"], row["snapshot_key"], row["backend"], bool(row["readonly"]), row["pid"],
                      row["boot_id"], row["created_ns"])
    mounted = path in _mount_points()
    if rec.backend == "fuse":
        if mounted:
            fuse.unmount(path, rec.pid, detach=detach)
        elif rec.pid is not None and not detach and rec.boot_id == boot_id():
            fuse.stop(rec.pid, path)  # the mount went some other way: the daemon goes too
    elif mounted:
        kernel.unmount(path, detach=detach)
    with store.meta.transaction() as db:
        db.execute("DELETE FROM mounts WHERE target=?", (path,))
    return rec
