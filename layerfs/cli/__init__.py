"""The ``layerfs`` command line: the click group (``base``), one module per command group.

Commands parse their arguments, call one function of the operations below them
(``layerfs.importer``, ``layerfs.containers``, ``layerfs.mounting``, ...) and render the
result (``render``). Nothing below ``layerfs.cli`` imports it. Commands from outside the
engine (``layerfs bench``, ``layerfs snapshotter``) plug in through the ``layerfs.commands``
entry point group, so the engine never imports its benchmark or its servers.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import click

from layerfs.cli import containers, docs, images, inspect, registry, schemas
from layerfs.cli.base import cli, interrupt_on_termination

__all__ = ["cli", "main"]

ENTRY_POINT_GROUP = "layerfs.commands"

# the command modules register themselves on ``cli`` when imported
_COMMAND_MODULES = (containers, docs, images, inspect, registry, schemas)


def _plugins() -> None:
    """Add the commands other distributions (bench, snapshotter) register as entry points."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in cli.commands:
            continue
        command = ep.load()
        if isinstance(command, click.Command):
            cli.add_command(command, ep.name)


def main() -> None:
    interrupt_on_termination()
    _plugins()
    cli(prog_name="layerfs")
