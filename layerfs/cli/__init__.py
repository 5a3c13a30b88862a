"""The ``layerfs`` command line: the click group (``base``), one module per command group.

Commands parse their arguments, call one function of the operations below them
(``layerfs.importer``, ``layerfs.containers``, ``layerfs.mounting``, ...) and render the
result (``render``). Nothing below ``layerfs.cli`` imports it. Commands from outside the
engine (``layerfs bench``, ``layerfs snapshotter``) plug in through the ``layerfs.commands``
entry point group, so the engine never imports its benchmark or its servers.
"""

from __future__ import annotations

import click

from layerfs.cli import containers, docs, images, inspect, registry, schemas
from layerfs.cli.base import PLUGIN_GROUP, cli, interrupt_on_termination, load_plugins

__all__ = ["cli", "main"]

ENTRY_POINT_GROUP = PLUGIN_GROUP

# the command modules register themselves on ``cli`` when imported
_COMMAND_MODULES = (containers, docs, images, inspect, registry, schemas)


def _plugins() -> None:
    """Add every command other distributions (bench, snapshotter) register as entry points
    (``cli`` itself loads one only when it is named or the commands are listed)."""
    assert isinstance(cli, click.Group)
    load_plugins(cli)


def main() -> None:
    interrupt_on_termination()
    cli(prog_name="layerfs")
