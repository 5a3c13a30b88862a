"""Inspection commands: analyze (what layers waste, CI rules), tree (the merged file tree),
inspect (an image as skopeo inspect shows it), explore (the terminal explorer, ``layerfs.tui``)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from layerfs.cli import complete
from layerfs.cli.base import Ctx, cli, emit, handle_errors, pass_ctx
from layerfs.errors import UsageError

if TYPE_CHECKING:
    from layerfs import analysis
    from layerfs.analysis.waste import Rules
    from layerfs.store import Image, Store
    from layerfs.tui import ExplorerModel

# dive's defaults in CI mode
CI_DEFAULTS = ("0.9", None, "0.1")
CI_FILE = ".dive-ci"


def _rules(ci: bool, config: str | None, lowest_efficiency: str | None, highest_wasted_bytes: str | None,
           highest_user_wasted_percent: str | None) -> Rules:
    from layerfs.analysis import waste

    rules = waste.Rules()
    if ci:
        eff, _, user = CI_DEFAULTS
        rules = waste.Rules(waste.ratio(eff, "default"), None, waste.ratio(user, "default"))
        if config is None and os.path.isfile(CI_FILE):
            config = CI_FILE
    if config is not None:
        try:
            with open(config, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"analyze: cannot read the rules file {config}: {e.strerror or e}") from None
        rules = rules.merged(waste.read_rules(text, config))
    return rules.merged(waste.Rules(
        waste.ratio(lowest_efficiency, "--lowest-efficiency") if lowest_efficiency is not None else None,
        waste.size_limit(highest_wasted_bytes, "--highest-wasted-bytes") if highest_wasted_bytes is not None
        else None,
        waste.ratio(highest_user_wasted_percent, "--highest-user-wasted-percent")
        if highest_user_wasted_percent is not None else None,
    ))


@cli.command("analyze")
@click.argument("ref", shell_complete=complete.images_or_containers)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table for people, json for programs (every path, every duplicate group).")
@click.option("--no-trunc", is_flag=True, help="Full digests and CREATED BY.")
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True,
              help="Paths and duplicate groups shown in the table (0: all).")
@click.option("--ci", is_flag=True,
              help=f"Check dive's CI rules: defaults lowestEfficiency=0.9, highestUserWastedPercent=0.1, "
                   f"then ./{CI_FILE} if there is one, then the options below.")
@click.option("--ci-config", type=click.Path(dir_okay=False),
              help=f"A rules file in dive's {CI_FILE} format (implies checking rules).")
@click.option("--lowest-efficiency", metavar="RATIO",
              help="Fail (exit 1) when the efficiency is below RATIO (0..1, or a percentage like 95%).")
@click.option("--highest-wasted-bytes", metavar="SIZE",
              help="Fail (exit 1) when more than SIZE is wasted (bytes, or 20MB, 512KiB).")
@click.option("--highest-user-wasted-percent", metavar="RATIO",
              help="Fail (exit 1) when wasted bytes over the bytes above the base layer exceed RATIO (0..1).")
@click.option("-i", "--interactive", is_flag=True, help="Explore the image in a terminal UI (as 'layerfs explore').")
@pass_ctx
@handle_errors
def analyze_cmd(ctx: Ctx, ref: str, fmt: str, no_trunc: bool, top: int, ci: bool, ci_config: str | None,
                lowest_efficiency: str | None, highest_wasted_bytes: str | None,
                highest_user_wasted_percent: str | None, interactive: bool) -> None:
    """What each layer of an image (or of a container: its upper on top) adds and wastes: bytes overwritten or deleted by later
    layers, duplicated content, metadata-only copies, the efficiency score, the worst paths.

    With rules (--ci, --ci-config or a threshold) exits 1 when one is crossed."""
    from layerfs import analysis, catalog
    from layerfs.analysis import waste
    from layerfs.cli import render

    rules = _rules(ci, ci_config, lowest_efficiency, highest_wasted_bytes, highest_user_wasted_percent)
    store = ctx.store
    if interactive:
        _explore(ctx, store.reading(lambda: catalog.resolve_image(store, ref)))
        return
    # one state of the store, retried past a concurrent rmi/gc (Store.reading)
    result = store.reading(lambda: _analyze_ref(store, ref))
    checked = analysis.check_rules(result, rules) if rules.any or ci or ci_config else []
    emit(render.render_analysis(result, checked, fmt=fmt, no_trunc=no_trunc, top=top))
    if any(r.status == waste.FAIL for r in checked):
        raise SystemExit(1)


def _analyze_ref(store: Store, ref: str) -> analysis.Analysis:
    """An image, or a container: its image's layers and its upper as the top layer (renamed
    directories there, overlay redirects, are followed as the mounted container shows them)."""
    from layerfs import analysis, catalog, containers

    c = containers.find(store, ref)
    if c is None:
        return analysis.analyze(store, catalog.resolve_image(store, ref))
    dirs = [*reversed(containers.lowers(store, c)), containers.upper(store, c)]  # bottom first
    img = store.find_image(c.image)
    infos = list(catalog.image_info(store, img).layers) if img is not None and img.config_digest == c.config_digest \
        else []  # the upper has no record: LAYER N+1, DIFF ID <none>
    return analysis.analyze_dirs(dirs, infos, name=f"container {c.name} (of {c.image})")


@cli.command("tree")
@click.argument("ref", shell_complete=complete.images)
@click.option("--layer", "upto", type=int, metavar="N",
              help="The tree as layer N (1 = the bottom layer) leaves it, marked with what N changed.")
@click.option("--changes-only", is_flag=True, help="Only what the layer added, changed or deleted.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table for people, json for programs.")
@pass_ctx
@handle_errors
def tree_cmd(ctx: Ctx, ref: str, upto: int | None, changes_only: bool, fmt: str) -> None:
    """The merged file tree of an image: mode, owner, size and the layer each entry comes from;
    CHANGE says what the top (or --layer N) layer did: A added, C changed, M metadata only, D deleted."""
    from layerfs import analysis, catalog
    from layerfs.cli import render

    store = ctx.store

    def read() -> tuple[list[analysis.TreeEntry], int]:
        img = catalog.resolve_image(store, ref)
        dirs = list(reversed(store.layer_dirs(img.top_chain_id)))
        if upto is not None and not 1 <= upto <= len(dirs):
            raise UsageError(f"tree: --layer {upto}: {img.name} has layers 1 to {len(dirs)}")
        return analysis.image_tree(dirs, upto, changes_only=changes_only), upto or len(dirs)

    entries, layer = store.reading(read)
    emit(render.render_file_tree(entries, fmt=fmt, upto=layer))


@cli.command("inspect")
@click.argument("ref", shell_complete=complete.images)
@click.option("--raw", is_flag=True, help="The manifest (with --config: the config) byte for byte as stored.")
@click.option("--config", "show_config", is_flag=True, help="The image config instead of the summary.")
@pass_ctx
@handle_errors
def inspect_cmd(ctx: Ctx, ref: str, raw: bool, show_config: bool) -> None:
    """An image as skopeo inspect shows it (JSON): name, digests, tags, created, labels,
    platform, layers, and the run settings (Env, Cmd, Entrypoint, WorkingDir, User, ExposedPorts)."""
    from layerfs import catalog
    from layerfs.cli import render

    store = ctx.store
    details = store.reading(lambda: catalog.image_details(store, catalog.resolve_image(store, ref)))
    if raw:  # byte for byte, no newline added (as skopeo inspect --raw)
        out = sys.stdout.buffer
        out.write(details.config_bytes if show_config else details.manifest_bytes)
        out.flush()
        return
    emit(render.render_inspect(details, config=show_config))


@cli.command("explore")
@click.argument("ref", shell_complete=complete.images)
@pass_ctx
@handle_errors
def explore_cmd(ctx: Ctx, ref: str) -> None:
    """Explore an image in the terminal, like dive: layers and what each wastes on the left,
    the merged tree as of the selected layer on the right (A added, C changed, M metadata
    only, D deleted). Keys: arrows, tab, enter (collapse), c (changes only), / (filter), q."""
    from layerfs import catalog

    store = ctx.store
    _explore(ctx, store.reading(lambda: catalog.resolve_image(store, ref)))


def explorer_model(ctx: Ctx, img: Image) -> ExplorerModel:
    """What the explorer shows of ``img``: its analysis, and its tree per layer on demand."""
    from layerfs import analysis
    from layerfs.tui import ExplorerModel

    store = ctx.store
    result = store.reading(lambda: analysis.analyze(store, img))
    dirs = list(reversed(store.layer_dirs(img.top_chain_id)))
    return ExplorerModel(result, lambda n: analysis.image_tree(dirs, n))


def _explore(ctx: Ctx, img: Image) -> None:
    from layerfs.tui import ExplorerApp

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("explore: needs a terminal (for a report on a pipe: layerfs analyze REF)")
    ExplorerApp(explorer_model(ctx, img)).run()
