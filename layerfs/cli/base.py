"""The click group, its context object and the output helpers every command module uses.

Data on stdout; logs, progress and errors on stderr.

Exit codes: 0 ok, 1 failure, 2 usage error (``LayerfsError.exit_code``).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from layerfs import __version__
from layerfs.errors import LayerfsError
from layerfs.progress import Progress
from layerfs.store import Store, default_root

F = TypeVar("F", bound=Callable[..., Any])


class Ctx:
    def __init__(self, root: str | None, quiet: bool) -> None:
        self.root = root
        self.quiet = quiet
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.root)
        return self._store

    def progress(self) -> Progress:
        return Progress(enabled=False) if self.quiet else Progress()

    def log(self, msg: str) -> None:
        if not self.quiet:
            click.echo(msg, err=True)


def handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> object:
        try:
            return fn(*args, **kwargs)
        except LayerfsError as e:
            click.echo(f"layerfs: error: {e}", err=True)
            sys.exit(e.exit_code)
        except BrokenPipeError:
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", envvar="LAYERFS_ROOT", type=click.Path(file_okay=False),
              help=f"Store directory (default: {default_root()}).")
@click.option("-q", "--quiet", is_flag=True, help="No progress or log messages on stderr.")
@click.version_option(__version__, prog_name="layerfs")
@click.pass_context
def cli(ctx: click.Context, root: str | None, quiet: bool) -> None:
    """layerfs: a layer store for container images, mounted with overlayfs or FUSE."""
    ctx.obj = Ctx(root, quiet)


def emit(text: str) -> None:
    if text:
        click.echo(text, nl=not text.endswith("\n"))


def emit_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))
