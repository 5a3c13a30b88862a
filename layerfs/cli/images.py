"""Image and store commands: import, import-layer, export, images, history, diff, rmi, gc, df, fsck."""

from __future__ import annotations

import click

from layerfs import importer
from layerfs.cli.base import Ctx, cli, emit, emit_json, handle_errors, pass_ctx
from layerfs.errors import UsageError


@cli.command("import")
@click.argument("path", type=click.Path(exists=True))
@click.option("--name", help="Reference to store the image under (default: the tags in the archive).")
@click.option("--platform", help="os/arch[/variant] to pick from a multi-platform index (default: this host).")
@pass_ctx
@handle_errors
def import_cmd(ctx: Ctx, path: str, name: str | None, platform: str | None) -> None:
    """Import an OCI image layout (dir or tar) or a docker-archive."""
    results = importer.import_path(ctx.store, path, name=name, platform=platform, progress=ctx.progress())
    for r in results:
        ctx.log(f"Imported {', '.join(r.names)} ({len(r.new_layers)} new layers, "
                f"{len(r.reused_layers)} already present)")
        for n in r.names:
            click.echo(f"{n} {r.config_digest}")


@cli.command("import-layer")
@click.argument("tars", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--name", required=True, help="Reference for the new image.")
@click.option("--platform", help="os/arch recorded in the image config (default: this host).")
@pass_ctx
@handle_errors
def import_layer_cmd(ctx: Ctx, tars: tuple[str, ...], name: str, platform: str | None) -> None:
    """Import bare layer tars (plain, gzip or zstd; bottom layer first) as a new image."""
    r = importer.import_layers(ctx.store, list(tars), name, platform=platform, progress=ctx.progress())
    ctx.log(f"Imported {r.names[0]} ({len(r.new_layers)} new layers, {len(r.reused_layers)} already present)")
    click.echo(f"{r.names[0]} {r.config_digest}")


@cli.command("rmi")
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Untag even if a container uses the image.")
@pass_ctx
@handle_errors
def rmi_cmd(ctx: Ctx, refs: tuple[str, ...], force: bool) -> None:
    """Remove images, then the layers and blobs no other image needs."""
    from layerfs.image.source import normalize_ref
    from layerfs.store import garbage

    names = [normalize_ref(r) for r in refs]
    layers, blobs = garbage.remove_images(ctx.store, names, force=force)
    for n in names:
        click.echo(f"Untagged: {n}")
    for layer in layers:
        click.echo(f"Deleted: {layer}")
    ctx.log(f"{len(blobs)} blobs removed")


@cli.command("gc")
@pass_ctx
@handle_errors
def gc_cmd(ctx: Ctx) -> None:
    """Drop layers and blobs that no image needs."""
    from layerfs.store import garbage

    layers, blobs = garbage.collect(ctx.store)
    for layer in layers:
        click.echo(f"Deleted layer: {layer}")
    for b in blobs:
        click.echo(f"Deleted blob: {b}")
    ctx.log(f"gc: {len(layers)} layers and {len(blobs)} blobs removed")


@cli.command("fsck")
@click.option("--repair", is_flag=True, help="Remove garbage left by crashes (orphan dirs, blobs, staging).")
@click.option("--verify-blobs", is_flag=True, help="Re-hash every blob.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_ctx
@handle_errors
def fsck_cmd(ctx: Ctx, repair: bool, verify_blobs: bool, fmt: str) -> None:
    """Check that the store's files agree with its database (exit 1 if damage remains)."""
    from layerfs.store.fsck import fsck

    report = fsck(ctx.store, repair=repair, verify_blobs=verify_blobs)
    if fmt == "json":
        emit_json({"clean": report.clean,
                   "findings": [{"problem": f.problem, "repaired": f.repaired} for f in report.findings]})
    else:
        for f in report.findings:
            click.echo(f"{'repaired' if f.repaired else 'PROBLEM '}  {f.problem}")
        if report.clean:
            click.echo("store is clean")
    if report.unrepaired:
        raise SystemExit(1)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise UsageError(msg)


@cli.command("images")
@click.option("--tree", is_flag=True, help="Draw the layers shared between images as one tree (like dockviz).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "tree", "dot"]), default=None,
              help="table|json, or with --tree: tree|dot|json.")
@click.option("--no-trunc", is_flag=True, help="Full digests.")
@pass_ctx
@handle_errors
def images_cmd(ctx: Ctx, tree: bool, fmt: str | None, no_trunc: bool) -> None:
    """List images (REPOSITORY, TAG, IMAGE ID, CREATED, SIZE)."""
    from layerfs import catalog
    from layerfs.cli import render

    infos = catalog.all_images(ctx.store)
    if tree or fmt in ("tree", "dot"):
        emit(render.render_tree(infos, fmt=fmt or "tree", no_trunc=no_trunc))
    else:
        emit(render.render_images(infos, fmt=fmt or "table", no_trunc=no_trunc))


@cli.command("history")
@click.argument("ref")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--no-trunc", is_flag=True)
@pass_ctx
@handle_errors
def history_cmd(ctx: Ctx, ref: str, fmt: str, no_trunc: bool) -> None:
    """Per layer: created_by from the image config, size and diffID."""
    from layerfs import catalog
    from layerfs.cli import render

    img = catalog.resolve_image(ctx.store, ref)
    emit(render.render_history(catalog.image_info(ctx.store, img), fmt=fmt, no_trunc=no_trunc))


@cli.command("diff")
@click.argument("ref")
@click.argument("other", required=False)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--no-trunc", is_flag=True)
@pass_ctx
@handle_errors
def diff_cmd(ctx: Ctx, ref: str, other: str | None, fmt: str, no_trunc: bool) -> None:
    """REF: what each layer adds (A), changes (C), deletes (D); a container: its changes.
    REF OTHER: compare two images' trees."""
    from layerfs import catalog, containers
    from layerfs.cli import render

    c = containers.find(ctx.store, ref) if other is None else None
    if c is not None:  # a container: its changes, read from its upper, like docker diff
        emit(render.render_changes([(ch.kind, ch.path) for ch in containers.diff(ctx.store, c)], fmt=fmt))
        return
    a = catalog.resolve_image(ctx.store, ref)
    if other is None:
        emit(render.render_layer_diffs(catalog.layer_diffs(ctx.store, a), fmt=fmt, no_trunc=no_trunc))
    else:
        b = catalog.resolve_image(ctx.store, other)
        emit(render.render_changes(catalog.image_tree_diff(ctx.store, a, b), fmt=fmt))


@cli.command("df")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_ctx
@handle_errors
def df_cmd(ctx: Ctx, fmt: str) -> None:
    """Disk usage of images, layers, containers and blobs."""
    from layerfs import catalog
    from layerfs.cli import render

    emit(render.render_df(catalog.df_rows(ctx.store), fmt=fmt))


@cli.command("tag")
@click.argument("source")
@click.argument("target")
@pass_ctx
@handle_errors
def tag_cmd(ctx: Ctx, source: str, target: str) -> None:
    """Give an image another name."""
    from layerfs import catalog
    from layerfs.image.source import normalize_ref

    img = catalog.resolve_image(ctx.store, source)
    ctx.store.tag(img.name, normalize_ref(target))


@cli.command("export")
@click.argument("refs", nargs=-1, required=True)
@click.argument("out")
@click.option("--format", "fmt", type=click.Choice(["oci", "docker-archive"]), default="oci",
              help="OCI image layout (default) or docker-archive.")
@click.option("--rebuild-layers", is_flag=True,
              help="Write every layer from its directory instead of reusing the stored blob.")
@pass_ctx
@handle_errors
def export_cmd(ctx: Ctx, refs: tuple[str, ...], out: str, fmt: str, rebuild_layers: bool) -> None:
    """Export images to OUT (a directory, or a .tar file)."""
    from layerfs import exporter

    imgs = exporter.export(ctx.store, list(refs), out, fmt=fmt, rebuild=rebuild_layers)
    ctx.log(f"Exported {', '.join(i.name for i in imgs)} to {out} ({fmt})")
