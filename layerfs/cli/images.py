"""Image and store commands: import, import-layer, export, images, history, diff, rmi, gc, df, fsck."""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

import click

from layerfs import importer
from layerfs.cli import complete
from layerfs.cli.base import Ctx, cli, emit, emit_json, handle_errors, pass_ctx
from layerfs.errors import UsageError


@cli.command("import")
@click.argument("path", type=click.Path(exists=True, allow_dash=True))
@click.option("--name", "names", multiple=True, metavar="REF",
              help="Reference to store the image under (default: the tags in the archive); repeat it for "
                   "several names, stored all or none.")
@click.option("--platform", help="os/arch[/variant] to pick from a multi-platform index (default: this host).")
@pass_ctx
@handle_errors
def import_cmd(ctx: Ctx, path: str, names: tuple[str, ...], platform: str | None) -> None:
    """Import an OCI image layout (dir or tar) or a docker-archive; PATH ``-`` reads a tar from stdin."""
    if path == "-":
        with ctx.store.shared_lock(), _stdin_spooled(ctx) as spooled:  # (its tmp/ file: see export -)
            results = importer.import_path(ctx.store, spooled, name=list(names), platform=platform,
                                           progress=ctx.progress())
    else:
        results = importer.import_path(ctx.store, path, name=list(names), platform=platform,
                                       progress=ctx.progress())
    for r in results:
        ctx.log(f"Imported {', '.join(r.names)} ({len(r.new_layers)} new layers, "
                f"{len(r.reused_layers)} already present)")
        for n in r.names:
            click.echo(f"{n} {r.config_digest}")


@contextlib.contextmanager
def _stdin_spooled(ctx: Ctx) -> Iterator[str]:
    """stdin copied to a file in the store's staging (tmp/ingest-stdin-*: garbage to fsck
    after a crash), removed afterwards: archives are read with seeks."""
    stdin = sys.stdin.buffer
    if stdin.isatty():
        raise UsageError("import -: stdin is a terminal; pipe an archive into it (layerfs import - < image.tar)")
    fd, path = tempfile.mkstemp(prefix="ingest-stdin-", suffix=".tar", dir=ctx.store.tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(stdin, f, 1 << 20)
        yield path
    finally:
        os.unlink(path)


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
@click.argument("refs", nargs=-1, required=True, shell_complete=complete.images)
@click.option("-f", "--force", is_flag=True,
              help="Untag even if a container uses the image; by image ID, untag all its names.")
@pass_ctx
@handle_errors
def rmi_cmd(ctx: Ctx, refs: tuple[str, ...], force: bool) -> None:
    """Remove images (by name, or by image ID, short or full), then the layers and blobs no
    other image needs. Like docker, removes those that exist and exits 1 if any could not be."""
    from layerfs import catalog
    from layerfs.digest import Digest
    from layerfs.errors import FailedPrecondition, LayerfsError
    from layerfs.store import garbage

    failed = 0
    blobs_removed = 0
    for ref in refs:
        try:
            img = catalog.resolve_image(ctx.store, ref)
            by_id = ref.removeprefix("sha256:") and Digest(img.config_digest).hex.startswith(ref.removeprefix("sha256:")) \
                and ctx.store.find_image(ref) is None and img.name != ref
            names = [img.name]
            if by_id:
                names = sorted(i.name for i in ctx.store.list_images() if i.config_digest == img.config_digest)
                if len(names) > 1 and not force:
                    raise FailedPrecondition(f"image {ref} has several names ({', '.join(names)}): "
                                             "remove them by name, or use -f to remove all")
            layers, blobs = garbage.remove_images(ctx.store, names, force=force)
        except LayerfsError as e:
            click.echo(f"layerfs: error: {e}", err=True)
            failed += 1
            continue
        for n in names:
            click.echo(f"Untagged: {n}")
        for layer in layers:
            click.echo(f"Deleted: {layer}")
        blobs_removed += len(blobs)
    ctx.log(f"{blobs_removed} blobs removed")
    if failed:
        raise SystemExit(1)


@cli.command("gc")
@click.option("-n", "--dry-run", is_flag=True,
              help="Only show what would be removed (layers with their directories, blobs, bytes); change nothing.")
@pass_ctx
@handle_errors
def gc_cmd(ctx: Ctx, dry_run: bool) -> None:
    """Drop layers and blobs that no image needs."""
    from layerfs.store import garbage
    from layerfs.text import human_size

    if dry_run:
        plan = garbage.plan(ctx.store)
        for chain_id, directory, size in plan.layers:
            click.echo(f"Would delete layer: {chain_id} {os.path.relpath(directory, ctx.store.root)} "
                       f"({human_size(size)})")
        for digest, size in plan.blobs:
            click.echo(f"Would delete blob: {digest} ({human_size(size)})")
        click.echo(f"Would free {human_size(plan.bytes)} ({plan.bytes} bytes): {len(plan.layers)} layers, "
                   f"{len(plan.blobs)} blobs")
        return
    layers, blobs = garbage.collect(ctx.store)
    for layer in layers:
        click.echo(f"Deleted layer: {layer}")
    for b in blobs:
        click.echo(f"Deleted blob: {b}")
    ctx.log(f"gc: {len(layers)} layers and {len(blobs)} blobs removed")


@cli.command("fsck")
@click.option("--repair", is_flag=True, help="Remove garbage left by crashes (orphan dirs, blobs, staging).")
@click.option("--verify-blobs", is_flag=True, help="Re-hash every blob.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table for people, json for programs.")
@pass_ctx
@handle_errors
def fsck_cmd(ctx: Ctx, repair: bool, verify_blobs: bool, fmt: str) -> None:
    """Check that the store's files agree with its database (exit 1 if damage remains)."""
    from layerfs.store.fsck import fsck

    report = fsck(ctx.store, repair=repair, verify_blobs=verify_blobs)
    if fmt == "json":
        emit_json({"schemaVersion": 1, "clean": report.clean,
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
@click.argument("repository", required=False, shell_complete=complete.images)
@click.option("--tree", is_flag=True,
              help="Draw the layers shared between images as one tree (like dockviz; nodes are ChainIDs); "
                   "with REPOSITORY, that image's ancestry (podman image tree).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "tree", "dot"]), default=None,
              help="table|json, or with --tree: tree|dot|json.")
@click.option("--no-trunc", is_flag=True, help="Full digests.")
@click.option("-q", "--quiet", is_flag=True, help="Only image IDs, each once.")
@click.option("-a", "--all", "all_", is_flag=True,
              help="Accepted for docker's sake: layerfs keeps no intermediate images, so every image is listed anyway.")
@click.option("--digests", is_flag=True, help="Show the manifest digest (DIGEST column).")
@click.option("-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="reference=PATTERN, dangling=true|false, before=REF, since=REF, label=KEY[=VALUE]; repeatable.")
@click.option("--sort", type=click.Choice(["created", "id", "repository", "size", "tag"]), default=None,
              help="Order of the rows (default: created, newest first).")
@pass_ctx
@handle_errors
def images_cmd(ctx: Ctx, repository: str | None, tree: bool, fmt: str | None, no_trunc: bool, quiet: bool,
               all_: bool, digests: bool, filters: tuple[str, ...], sort: str | None) -> None:
    """List images (REPOSITORY, TAG, IMAGE ID, CREATED, SIZE), or those of REPOSITORY[:TAG]
    (``busybox`` matches docker.io/library/busybox)."""
    from layerfs import catalog
    from layerfs.cli import render

    infos = ctx.store.reading(lambda: catalog.all_images(ctx.store))  # one state, retried past a concurrent rmi
    infos = catalog.filter_images(infos, filters, repository)
    if tree or fmt in ("tree", "dot"):
        emit(render.render_tree(infos, fmt=fmt or "tree", no_trunc=no_trunc))
    else:
        emit(render.render_images(infos, fmt=fmt or "table", no_trunc=no_trunc, quiet=quiet, digests=digests,
                                  sort=sort))


@cli.command("history")
@click.argument("ref", shell_complete=complete.images)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table for people, json for programs.")
@click.option("--no-trunc", is_flag=True, help="Full digests and CREATED BY.")
@pass_ctx
@handle_errors
def history_cmd(ctx: Ctx, ref: str, fmt: str, no_trunc: bool) -> None:
    """Per step of the image config's history: its layer's diffID (<none> for a config-only
    step), created, created_by, size and comment; top first."""
    from layerfs import catalog
    from layerfs.cli import render

    info = ctx.store.reading(lambda: catalog.image_info(ctx.store, catalog.resolve_image(ctx.store, ref)))
    emit(render.render_history(info, fmt=fmt, no_trunc=no_trunc))


@cli.command("diff")
@click.argument("ref", shell_complete=complete.images_or_containers)
@click.argument("other", required=False, shell_complete=complete.images)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table for people, json for programs.")
@click.option("--no-trunc", is_flag=True, help="Full digests and CREATED BY.")
@click.option("--type", "types", multiple=True, type=click.Choice(["file", "size", "history", "metadata"]),
              help="REF OTHER: what to compare, repeatable (as container-diff; default: file).")
@pass_ctx
@handle_errors
def diff_cmd(ctx: Ctx, ref: str, other: str | None, fmt: str, no_trunc: bool, types: tuple[str, ...]) -> None:
    """REF: what each layer adds (A), changes (C), deletes (D); a container: its changes.
    REF OTHER: compare two images (their trees; --type for sizes, history, metadata); like
    diff(1), exits 1 when they differ and 0 when they are the same."""
    from layerfs import catalog, containers
    from layerfs.cli import render

    store = ctx.store  # each read in one state, retried past a concurrent rmi/gc (Store.reading)
    if types and other is None:
        raise UsageError("diff --type compares two images: diff REF OTHER --type ...")
    c = containers.find(store, ref) if other is None else None
    if c is not None:  # a container: its changes, read from its upper, like docker diff
        emit(render.render_changes([(ch.kind, ch.path) for ch in store.reading(lambda: containers.diff(store, c))],
                                   fmt=fmt))
        return
    if other is None:
        diffs = store.reading(lambda: catalog.layer_diffs(store, catalog.resolve_image(store, ref)))
        emit(render.render_layer_diffs(diffs, fmt=fmt, no_trunc=no_trunc))
    else:
        cmp = store.reading(lambda: catalog.compare_images(
            store, catalog.resolve_image(store, ref), catalog.resolve_image(store, other), types or ("file",)))
        # without --type: the file list, as before (JSON: a list of changes)
        emit(render.render_comparison(cmp, fmt=fmt) if types else render.render_changes(cmp.files, fmt=fmt))
        if cmp.differ:
            raise SystemExit(1)


@cli.command("df")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table for people, json for programs.")
@click.option("-v", "--verbose", is_flag=True,
              help="Per image: size, shared size (layers other images use too) and unique size.")
@click.option("--no-trunc", is_flag=True, help="With -v: full image IDs.")
@pass_ctx
@handle_errors
def df_cmd(ctx: Ctx, fmt: str, verbose: bool, no_trunc: bool) -> None:
    """Disk usage of images, layers, containers and blobs; -v: per image, as docker system df -v."""
    from layerfs import catalog
    from layerfs.cli import render

    if verbose:
        emit(render.render_df_images(ctx.store.reading(lambda: catalog.df_images(ctx.store)), fmt=fmt,
                                     no_trunc=no_trunc))
        return
    emit(render.render_df(ctx.store.reading(lambda: catalog.df_rows(ctx.store)), fmt=fmt))


@cli.command("tag")
@click.argument("source", shell_complete=complete.images)
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
@click.argument("refs", nargs=-1, required=True, shell_complete=complete.images)
@click.argument("out")
@click.option("--format", "fmt", type=click.Choice(["oci", "docker-archive"]), default="oci",
              help="OCI image layout (default) or docker-archive.")
@click.option("--rebuild-layers", is_flag=True,
              help="Write every layer from its directory instead of reusing the stored blob.")
@pass_ctx
@handle_errors
def export_cmd(ctx: Ctx, refs: tuple[str, ...], out: str, fmt: str, rebuild_layers: bool) -> None:
    """Export images to OUT: a directory, a .tar file, a gzipped .tar.gz/.tgz file, or ``-``
    for a tar on stdout."""
    from layerfs import exporter

    gzipped = out.endswith((".tar.gz", ".tgz"))
    if out == "-" or gzipped:
        if out == "-" and sys.stdout.isatty():
            raise UsageError("export -: stdout is a terminal; redirect it (layerfs export REF - > image.tar)")
        # under the store lock: fsck takes tmp/ entries made while nobody holds it for garbage
        with ctx.store.shared_lock(), tempfile.TemporaryDirectory(prefix="export-", dir=ctx.store.tmp_dir) as tmp:
            tar = os.path.join(tmp, "image.tar")
            imgs = exporter.export(ctx.store, list(refs), tar, fmt=fmt, rebuild=rebuild_layers, progress=ctx.progress())
            with open(tar, "rb") as src:
                if out == "-":
                    shutil.copyfileobj(src, sys.stdout.buffer, 1 << 20)
                    sys.stdout.buffer.flush()
                else:
                    with _naming_destination(ctx, out):
                        _write_gzip(src, out)
        ctx.log(f"Exported {', '.join(i.name for i in imgs)} to {'stdout' if out == '-' else out} ({fmt})")
        return
    with _naming_destination(ctx, out):
        imgs = exporter.export(ctx.store, list(refs), out, fmt=fmt, rebuild=rebuild_layers, progress=ctx.progress())
    ctx.log(f"Exported {', '.join(i.name for i in imgs)} to {out} ({fmt})")


@contextlib.contextmanager
def _naming_destination(ctx: Ctx, out: str) -> Iterator[None]:
    """Errors name ``out``, the user's path: one about the hidden temp file beside it (written,
    then renamed to ``out``), and a full disk met while writing (a write(2) error names no
    file) when ``out`` is on another filesystem than the store: that is the one being written."""
    import errno

    try:
        yield
    except OSError as e:
        partial = f".{os.path.basename(os.path.abspath(out))}."
        if (isinstance(e.filename, str) and e.filename2 is None
                and os.path.dirname(os.path.abspath(e.filename)) == os.path.dirname(os.path.abspath(out))
                and os.path.basename(e.filename).startswith(partial) and e.filename.endswith(".tmp")):
            raise OSError(e.errno, e.strerror, out) from e
        if e.filename is not None or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = os.path.dirname(os.path.abspath(out))
        try:
            elsewhere = os.stat(where).st_dev != os.stat(ctx.store.root).st_dev
        except OSError:
            raise e from None
        if not elsewhere:
            raise
        raise OSError(e.errno, e.strerror, out) from e


def _write_gzip(src: BinaryIO, out: str) -> None:
    """``src`` gzipped into ``out``, which appears whole or not at all."""
    out = os.path.abspath(out)
    if os.path.isdir(out):
        raise UsageError(f"export: cannot write {out}: it is a directory")
    fd, partial = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=os.path.dirname(out))
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            shutil.copyfileobj(src, gz, 1 << 20)
        os.chmod(partial, 0o644)
        os.rename(partial, out)
    except BaseException:
        os.unlink(partial)
        raise
