"""Mount and container commands: mount, umount, mounts, create, ps, rm, commit."""

from __future__ import annotations

import contextlib
import os
import secrets
import time

import click

from layerfs.cli import complete
from layerfs.cli.base import Ctx, cli, emit, emit_json, handle_errors, pass_ctx
from layerfs.errors import InUse, NotFound, UsageError
from layerfs.text import human_duration, human_size, rfc3339_nano, table


@cli.command("mount")
@click.argument("name", shell_complete=complete.images_or_containers)
@click.argument("mountpoint", type=click.Path(file_okay=False), required=False)
@click.option("--backend", type=click.Choice(["auto", "kernel", "fuse"]), default="auto", show_default=True,
              help="kernel overlayfs, the FUSE program layerfs-fuse, or auto: kernel when it can mount the store.")
@click.option("--dev", is_flag=True, help="Image views: allow device files (default nodev).")
@click.option("--suid", is_flag=True, help="Image views: honour setuid bits (default nosuid).")
@pass_ctx
@handle_errors
def mount_cmd(ctx: Ctx, name: str, mountpoint: str | None, backend: str, dev: bool, suid: bool) -> None:
    """Mount a container read-write, or an image read-only, on MOUNTPOINT (created if missing).
    Without MOUNTPOINT: on ROOT/mnt/NAME, printed on stdout (as podman mount)."""
    from layerfs import mounting

    log = (lambda m: click.echo(f"layerfs: {m}", err=True)) if ctx.debug else None  # why this backend
    target = mountpoint if mountpoint is not None else os.path.join(ctx.store.root, AUTO_MNT, _safe_name(name))
    created = _make_mountpoint(target)
    try:
        rec = mounting.mount_ref(ctx.store, name, target, backend, dev=dev, suid=suid, log=log)
    except BaseException:
        for d in reversed(created):  # what this command made, and nothing else
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    ctx.log(f"Mounted {name} on {rec.target} ({rec.backend}, {'ro' if rec.readonly else 'rw'})")
    if mountpoint is None:
        click.echo(rec.target)


AUTO_MNT = "mnt"  # ROOT/mnt/NAME: where `layerfs mount NAME` mounts without a mountpoint


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".") or "_"


def _make_mountpoint(path: str) -> list[str]:
    """Create ``path`` and its missing parents; return the directories made, outermost first."""
    made: list[str] = []
    missing = []
    cur = os.path.abspath(path)
    while not os.path.lexists(cur):
        missing.append(cur)
        cur = os.path.dirname(cur)
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        made.append(d)
    return made


@cli.command("umount")
@click.argument("mountpoint", metavar="MOUNTPOINT|NAME", shell_complete=complete.images_or_containers)
@click.option("-l", "--lazy", is_flag=True, help="Detach now, clean up when no longer busy.")
@pass_ctx
@handle_errors
def umount_cmd(ctx: Ctx, mountpoint: str, lazy: bool) -> None:
    """Unmount what layerfs mounted on MOUNTPOINT, or every mount of the container (or image) NAME."""
    from layerfs import mounting

    for target in _targets(ctx, mountpoint):
        rec = mounting.umount(ctx.store, target, detach=lazy)
        ctx.log(f"Unmounted {rec.target}")
        auto = os.path.join(ctx.store.root, AUTO_MNT)
        if os.path.dirname(rec.target) == auto:  # a mountpoint `layerfs mount NAME` made
            with contextlib.suppress(OSError):
                os.rmdir(rec.target)


def _targets(ctx: Ctx, arg: str) -> list[str]:
    """A recorded mountpoint as it is; else the mounts of the container or image named ``arg``."""
    from layerfs import catalog, containers, mounting
    from layerfs.errors import LayerfsError

    if ctx.store.mounts.get(os.path.realpath(arg)) is not None:
        return [arg]
    keys: set[str] = set()
    try:
        c = containers.find(ctx.store, arg)
        if c is not None:
            keys.add(c.key)
        else:
            keys.add(str(catalog.resolve_image(ctx.store, arg).top_chain_id))
    except LayerfsError:
        return [arg]  # not a name either: umount reports the mountpoint
    found = [r.target for r in mounting.records(ctx.store) if r.snapshot_key in keys]
    if not found:
        raise NotFound(f"{arg} is not mounted by layerfs")
    return found


@cli.command("mounts")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table for people, json for programs.")
@pass_ctx
@handle_errors
def mounts_cmd(ctx: Ctx, fmt: str) -> None:
    """What layerfs has mounted (stale records from an earlier boot are dropped)."""
    from layerfs import mounting

    recs = mounting.records(ctx.store)
    names = _mounted_names(ctx, [r.snapshot_key for r in recs])
    if fmt == "json":
        emit_json([{"target": r.target, "name": names[r.snapshot_key], "snapshot": r.snapshot_key,
                    "backend": r.backend, "readonly": r.readonly, "pid": r.pid} for r in recs])
        return
    rows: list[tuple[str, ...]] = [("MOUNTPOINT", "NAME", "BACKEND", "PID", "MODE", "SNAPSHOT")]
    rows += [(r.target, names[r.snapshot_key] or "-", r.backend, str(r.pid) if r.pid is not None else "-",
              "ro" if r.readonly else "rw", r.snapshot_key) for r in recs]
    emit(table(rows[0], rows[1:]))


def _mounted_names(ctx: Ctx, keys: list[str]) -> dict[str, str]:
    """What each mounted snapshot is to a user: the container's name, or the names of the
    images whose top layer it is (comma-separated); "" for a snapshot of another client."""
    from layerfs.containers import KEY_PREFIX

    images: dict[str, list[str]] = {}
    for img in ctx.store.list_images():
        images.setdefault(str(img.top_chain_id), []).append(img.name)
    return {k: k.removeprefix(KEY_PREFIX) if k.startswith(KEY_PREFIX) else ", ".join(sorted(images.get(k, [])))
            for k in keys}


@cli.command("create")
@click.argument("args", nargs=-1, required=True, metavar="IMAGE [NAME]", shell_complete=complete.images)
@click.option("--from", "ref", help="The image the container starts from (then the argument is NAME).")
@click.option("--name", "name_opt", help="The container's name (default: made from the image's).")
@pass_ctx
@handle_errors
def create_cmd(ctx: Ctx, args: tuple[str, ...], ref: str | None, name_opt: str | None) -> None:
    """Create a writable container over IMAGE (``create IMAGE [NAME]``, as docker, or
    ``create NAME --from IMAGE``); prints its name."""
    from layerfs import catalog, containers

    name: str | None
    if ref is not None:
        if len(args) != 1 or name_opt is not None:
            raise UsageError("create NAME --from IMAGE takes one NAME")
        name = args[0]
    else:
        if len(args) > 2 or (len(args) == 2 and name_opt is not None):
            raise UsageError("create IMAGE [NAME]: at most one NAME")
        ref = args[0]
        name = args[1] if len(args) == 2 else name_opt
    img = catalog.resolve_image(ctx.store, ref)
    if name is None:  # docker makes up a name too: the image's, and a few random hex digits
        base = _safe_name(img.name.partition("@")[0].rpartition(":")[0].rpartition("/")[2] or "container")
        name = f"{base}-{secrets.token_hex(3)}"
    c = containers.create(ctx.store, name, img)
    click.echo(c.name)


@cli.command("ps")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              help="table for people, json for programs.")
@click.option("-s", "--size", is_flag=True, help="Measure each container's upper.")
@click.option("-q", "--quiet", is_flag=True, help="Only container names.")
@pass_ctx
@handle_errors
def ps_cmd(ctx: Ctx, fmt: str, size: bool, quiet: bool) -> None:
    """List containers."""
    from layerfs import mounting

    items = mounting.container_listing(ctx.store, size)
    if quiet:
        emit("".join(f"{c.name}\n" for c, _m, _u in items))
        return
    if fmt == "json":
        emit_json([{"name": c.name, "image": c.image, "image_id": c.config_digest,
                    "created": rfc3339_nano(c.created_ns),
                    "mounts": m, **({"size": u} if u is not None else {})} for c, m, u in items])
        return
    rows = [("NAME", "IMAGE", "CREATED", "MOUNTED AT", *(("SIZE",) if size else ()))]
    for c, m, u in items:
        ago = human_duration(time.time() - c.created_ns / 1e9) + " ago"
        rows.append((c.name, c.image, ago, ",".join(m) or "-",
                     *((human_size(u or 0),) if size else ())))
    emit(table(rows[0], rows[1:]))


@cli.command("rm")
@click.argument("names", nargs=-1, required=True, shell_complete=complete.containers)
@click.option("-f", "--force", is_flag=True, help="Unmount a mounted container first.")
@pass_ctx
@handle_errors
def rm_cmd(ctx: Ctx, names: tuple[str, ...], force: bool) -> None:
    """Remove containers and their changes."""
    from layerfs import mounting

    for name in names:
        try:
            mounting.remove_container(ctx.store, name, force=force)
        except InUse as e:
            raise InUse(f"{e}; or 'layerfs rm -f {name}' unmounts and removes it") from e
        click.echo(name)


@cli.command("commit")
@click.argument("name", shell_complete=complete.containers)
@click.argument("newref")
@click.option("-m", "--message", help="Recorded as the history entry's created_by and comment.")
@click.option("-a", "--author", help="Recorded as the image config's author (\"Name <email>\").")
@pass_ctx
@handle_errors
def commit_cmd(ctx: Ctx, name: str, newref: str, message: str | None, author: str | None) -> None:
    """Make a new image from a container's changes."""
    from layerfs import containers

    r = containers.commit(ctx.store, containers.get(ctx.store, name), newref, message, author)
    ctx.log(f"Committed {name} as {r.names[0]}")
    click.echo(f"{r.names[0]} {r.config_digest}")


@cli.command("bundle")
@click.argument("ref", shell_complete=complete.images_or_containers)
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("args", nargs=-1)
@click.option("--name", help="Name of the container to create (default: the directory's name).")
@click.option("--backend", type=click.Choice(["auto", "kernel", "fuse"]), default="auto", show_default=True,
              help="kernel overlayfs, the FUSE program layerfs-fuse, or auto: kernel when it can mount the store.")
@pass_ctx
@handle_errors
def bundle_cmd(ctx: Ctx, ref: str, directory: str, args: tuple[str, ...], name: str | None, backend: str) -> None:
    """Make DIRECTORY an OCI runtime bundle (config.json + rootfs) for runc/crun.

    REF is a container, or an image (a container is then created for it). ARGS replace the
    image's Entrypoint and Cmd. Tear down with `layerfs umount DIR/rootfs` and `layerfs rm NAME`.
    """
    from layerfs import bundle

    b = bundle.make_bundle(ctx.store, ref, directory, name=name, args=list(args) or None, backend=backend)
    ctx.log(f"Bundle {b.path} ready (container {b.container}): runc run -b {b.path} <id>")
    click.echo(b.path)


@cli.command("info")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table for people, json for programs.")
@pass_ctx
@handle_errors
def info_cmd(ctx: Ctx, fmt: str) -> None:
    """What this kernel and the store offer the mount backends: the store's layer format,
    which backends can mount it and why."""
    from layerfs.mount.backend import store_backends
    from layerfs.mount.probe import backing_fs, probe

    info = probe()
    store = ctx.store
    fs = backing_fs(store.root)
    backends = store_backends(store.fmt, store.root)
    auto = "kernel" if backends["kernel"][0] else "fuse" if backends["fuse"][0] else None
    if fmt == "json":
        emit_json({
            "schemaVersion": 1,  # layerfs schema info
            "kernel": {"release": info.kernel_release,
                       **{k: {"value": getattr(info, k), "why": v} for k, v in info.why.items()}},
            "store": {"root": store.root, "fs_type": fs.fs_type, "d_type": fs.d_type,
                      "trusted_xattrs": fs.trusted_xattrs, "user_xattrs": fs.user_xattrs,
                      "format": store.fmt.name, "format_description": store.fmt.describe()},
            "backends": {k: {"can_mount": ok, "why": why} for k, (ok, why) in backends.items()},
            "auto": auto,
        })
        return
    click.echo(f"kernel {info.kernel_release}")
    click.echo(info.explain())
    click.echo(f"store {store.root} on {fs.fs_type}: d_type={fs.d_type} trusted_xattrs={fs.trusted_xattrs} "
               f"user_xattrs={fs.user_xattrs}")
    click.echo(f"store format: {store.fmt.name} ({store.fmt.describe()})")
    for name, (ok, why) in backends.items():
        click.echo(f"backend {name}: {'can mount this store' if ok else 'cannot mount this store'}: {why}")
    click.echo(f"backend auto: {auto or 'none'}")
