"""Mount and container commands: mount, umount, mounts, create, ps, rm, commit."""

from __future__ import annotations

import datetime as _dt
import time

import click

from layerfs.cli.base import Ctx, cli, emit, emit_json, handle_errors, pass_ctx
from layerfs.text import human_duration, human_size, table


@cli.command("mount")
@click.argument("name")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--backend", type=click.Choice(["auto", "kernel", "fuse"]), default="auto", show_default=True)
@click.option("--dev", is_flag=True, help="Image views: allow device files (default nodev).")
@click.option("--suid", is_flag=True, help="Image views: honour setuid bits (default nosuid).")
@pass_ctx
@handle_errors
def mount_cmd(ctx: Ctx, name: str, mountpoint: str, backend: str, dev: bool, suid: bool) -> None:
    """Mount a container read-write, or an image read-only, on MOUNTPOINT."""
    from layerfs import mounting

    rec = mounting.mount_ref(ctx.store, name, mountpoint, backend, dev=dev, suid=suid)
    ctx.log(f"Mounted {name} on {rec.target} ({rec.backend}, {'ro' if rec.readonly else 'rw'})")


@cli.command("umount")
@click.argument("mountpoint")
@click.option("-l", "--lazy", is_flag=True, help="Detach now, clean up when no longer busy.")
@pass_ctx
@handle_errors
def umount_cmd(ctx: Ctx, mountpoint: str, lazy: bool) -> None:
    """Unmount what layerfs mounted on MOUNTPOINT."""
    from layerfs import mounting

    rec = mounting.umount(ctx.store, mountpoint, detach=lazy)
    ctx.log(f"Unmounted {rec.target}")


@cli.command("mounts")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_ctx
@handle_errors
def mounts_cmd(ctx: Ctx, fmt: str) -> None:
    """What layerfs has mounted (stale records from an earlier boot are dropped)."""
    from layerfs import mounting

    recs = mounting.records(ctx.store)
    if fmt == "json":
        emit_json([{"target": r.target, "snapshot": r.snapshot_key, "backend": r.backend,
                    "readonly": r.readonly, "pid": r.pid} for r in recs])
        return
    rows: list[tuple[str, ...]] = [("MOUNTPOINT", "BACKEND", "PID", "MODE", "SNAPSHOT")]
    rows += [(r.target, r.backend, str(r.pid) if r.pid is not None else "-", "ro" if r.readonly else "rw",
              r.snapshot_key) for r in recs]
    emit(table(rows[0], rows[1:]))


@cli.command("create")
@click.argument("name")
@click.option("--from", "ref", required=True, help="The image the container starts from.")
@pass_ctx
@handle_errors
def create_cmd(ctx: Ctx, name: str, ref: str) -> None:
    """Create a writable container NAME over an image."""
    from layerfs import catalog, containers

    c = containers.create(ctx.store, name, catalog.resolve_image(ctx.store, ref))
    click.echo(c.name)


@cli.command("ps")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("-s", "--size", is_flag=True, help="Measure each container's upper.")
@pass_ctx
@handle_errors
def ps_cmd(ctx: Ctx, fmt: str, size: bool) -> None:
    """List containers."""
    from layerfs import containers, mounting

    mounted: dict[str, list[str]] = {}
    for r in mounting.records(ctx.store):
        mounted.setdefault(r.snapshot_key, []).append(r.target)
    items = []
    for c in containers.list_containers(ctx.store):
        used = containers.usage(ctx.store, c)[0] if size else None
        items.append((c, mounted.get(c.key, []), used))
    if fmt == "json":
        emit_json([{"name": c.name, "image": c.image, "image_id": c.config_digest,
                    "created": _dt.datetime.fromtimestamp(c.created_ns / 1e9, _dt.UTC).isoformat(),
                    "mounts": m, **({"size": u} if u is not None else {})} for c, m, u in items])
        return
    rows = [("NAME", "IMAGE", "CREATED", "MOUNTED AT", *(("SIZE",) if size else ()))]
    for c, m, u in items:
        ago = human_duration(time.time() - c.created_ns / 1e9) + " ago"
        rows.append((c.name, c.image, ago, ",".join(m) or "-",
                     *((human_size(u or 0),) if size else ())))
    emit(table(rows[0], rows[1:]))


@cli.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Unmount a mounted container first.")
@pass_ctx
@handle_errors
def rm_cmd(ctx: Ctx, names: tuple[str, ...], force: bool) -> None:
    """Remove containers and their changes."""
    from layerfs import mounting

    for name in names:
        mounting.remove_container(ctx.store, name, force=force)
        click.echo(name)


@cli.command("commit")
@click.argument("name")
@click.argument("newref")
@click.option("-m", "--message", help="Recorded as the history entry's created_by and comment.")
@click.option("-a", "--author")
@pass_ctx
@handle_errors
def commit_cmd(ctx: Ctx, name: str, newref: str, message: str | None, author: str | None) -> None:
    """Make a new image from a container's changes."""
    from layerfs import containers

    r = containers.commit(ctx.store, containers.get(ctx.store, name), newref, message, author)
    ctx.log(f"Committed {name} as {r.names[0]}")
    click.echo(f"{r.names[0]} {r.config_digest}")


@cli.command("bundle")
@click.argument("ref")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("args", nargs=-1)
@click.option("--name", help="Name of the container to create (default: the directory's name).")
@click.option("--backend", type=click.Choice(["auto", "kernel", "fuse"]), default="auto", show_default=True)
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
@pass_ctx
@handle_errors
def info_cmd(ctx: Ctx) -> None:
    """What this kernel and the store's filesystem offer the mount backends, and why."""
    from layerfs.mount.probe import backing_fs, probe

    info = probe()
    click.echo(f"kernel {info.kernel_release}")
    click.echo(info.explain())
    fs = backing_fs(ctx.store.root)
    click.echo(f"store {ctx.store.root} on {fs.fs_type}: d_type={fs.d_type} trusted_xattrs={fs.trusted_xattrs} "
               f"user_xattrs={fs.user_xattrs}")
    problem = fs.overlay_problem(info.privileged)
    if problem:
        click.echo(f"kernel overlayfs cannot use this store: {problem}")
