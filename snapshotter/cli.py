"""``layerfs snapshotter ...``: serve the store to containerd as a proxy snapshotter.

Registered on the ``layerfs`` click group by ``layerfs.cli.main``. grpc is imported only
when the server starts, so the rest of the command line stays quick to load.
"""

from __future__ import annotations

import logging
import sys

import click

from layerfs.cli.base import Ctx, handle_errors, pass_ctx
from layerfs.store import default_root

DEFAULT_ADDRESS = "/run/layerfs/snapshotter.sock"


@click.group("snapshotter")
def snapshotter_group() -> None:
    """containerd's snapshot API over the layerfs store."""


@snapshotter_group.command("serve")
@click.option("--address", "-a", default=DEFAULT_ADDRESS, show_default=True, type=click.Path(dir_okay=False),
              help="Unix socket to serve on (containerd's [proxy_plugins.NAME] address).")
@click.option("--backend", type=click.Choice(["kernel", "fuse"]), default="kernel", show_default=True,
              help="Mounts handed to containerd: kernel overlayfs, or FUSE (fuse3./path/to/layerfs-fuse).")
@click.option("--root", "serve_root", type=click.Path(file_okay=False), default=None,
              help=f"Store directory (default: layerfs --root, else {default_root()}).")
@click.option("--namespace", default="containerd", show_default=True,
              help="Prefix of this server's snapshot keys in the store.")
@click.option("--workers", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Concurrent requests.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Least severe log messages written to stderr.")
@pass_ctx
@handle_errors
def serve_cmd(ctx: Ctx, address: str, backend: str, serve_root: str | None, namespace: str, workers: int,
              log_level: str) -> None:
    """Serve containerd.services.snapshots.v1.Snapshots on ADDRESS until SIGTERM/SIGINT.

    \b
    containerd's config.toml (version 2):
      [proxy_plugins.layerfs]
        type = "snapshot"
        address = "/run/layerfs/snapshotter.sock"
    then: ctr images pull --snapshotter layerfs ...; ctr run --snapshotter layerfs ...
    """
    from snapshotter.service import Server

    level = logging.ERROR if ctx.quiet and log_level == "info" else getattr(logging, log_level.upper())
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s layerfs-snapshotter %(levelname)s %(message)s")
    Server(address, serve_root or ctx.root or default_root(), namespace=namespace, backend=backend,
           workers=workers).serve()
