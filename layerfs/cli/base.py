"""The click group, its context object and the output helpers every command module uses.

Data on stdout; logs, progress and errors on stderr.

Exit codes: 0 ok, 1 failure, 2 usage error (``LayerfsError.exit_code``).

Errors are one line on stderr, never a traceback: a ``LayerfsError`` says what was wrong
and where; an ``OSError`` that escaped a command (a full disk, a permission denied, a
read-only filesystem) is named with the command, the system's reason and the path; any
other exception is a bug, reported in one line with "re-run with --debug" (``--debug`` or
``LAYERFS_DEBUG=1`` lets the traceback through). SIGTERM and SIGHUP interrupt a command
exactly as SIGINT does, so every cleanup (staging under ``tmp/``, temporary mounts) runs.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from layerfs import __version__
from layerfs.errors import LayerfsError
from layerfs.progress import Progress, ending_bars
from layerfs.store import Store, default_root
from layerfs.text import human_size

F = TypeVar("F", bound=Callable[..., Any])


class Ctx:
    def __init__(self, root: str | None, quiet: bool, debug: bool = False) -> None:
        self.root = root
        self.quiet = quiet
        self.debug = debug
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


def describe_oserror(e: OSError) -> str:
    """One line for an ``OSError``: the system's reason and the path(s) it names."""
    reason = e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or str(e) or type(e).__name__
    # an int "filename" is a file descriptor: no name for the user (the command says what it did)
    paths = [os_path for os_path in (e.filename, e.filename2) if os_path is not None and not isinstance(os_path, int)]
    where = " -> ".join(str(p if not isinstance(p, bytes) else p.decode("utf-8", "replace")) for p in paths)
    return f"{reason}: {where}" if where else reason


def _command_name() -> str:
    ctx = click.get_current_context(silent=True)
    return ctx.command_path.removeprefix("layerfs ").strip() if ctx is not None else "layerfs"


def _existing_dir(path: str) -> str | None:
    """The nearest existing directory at or above ``path`` (where a new file would go)."""
    here = os.path.abspath(path)
    while True:
        if os.path.isdir(here):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def _space_note(e: OSError) -> str:
    """For a full disk (ENOSPC, EDQUOT): " (it needed more than ... free ...)" from the open store
    when the path that failed is on the store's filesystem; for a path elsewhere (an export's
    destination), the room left on that path's filesystem."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return ""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_object(Ctx) if ctx is not None else None
    store = obj._store if obj is not None else None
    name = e.filename if isinstance(e.filename, str) else None
    where = _existing_dir(name) if name else None
    try:
        if where is not None and (store is None or os.stat(where).st_dev != os.stat(store.root).st_dev):
            st = os.statvfs(where)
            return f" ({human_size(st.f_bavail * st.f_frsize)} free now on the filesystem of {where})"
    except OSError:
        return ""
    return f" ({store.space_note()})" if store is not None else ""


def _debugging() -> bool:
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_object(Ctx) if ctx is not None else None
    return bool(obj and obj.debug)


def handle_errors(fn: F) -> F:
    """Turn every failure of a command into one line on stderr and its exit code."""
    fn = ending_bars(fn)  # progress bars a failure left running end before its error line

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> object:
        try:
            return fn(*args, **kwargs)
        except LayerfsError as e:
            click.echo(f"layerfs: error: {e}", err=True)
            sys.exit(e.exit_code)
        except BrokenPipeError:
            sys.exit(1)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as e:
            if _debugging():
                raise
            click.echo(f"layerfs: error: {_command_name()}: {describe_oserror(e)}{_space_note(e)}", err=True)
            sys.exit(1)
        except RecursionError:
            if _debugging():
                raise
            click.echo(f"layerfs: error: {_command_name()}: input nested too deeply to read", err=True)
            sys.exit(1)
        except Exception as e:
            if _debugging():
                raise
            click.echo(f"layerfs: internal error in {_command_name()}: {type(e).__name__}: {e} "
                       "(re-run with --debug for the traceback)", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, delivered as an interrupt so cleanup runs as it does for SIGINT."""


def _interrupt(signum: int, frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


def interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP interrupt the command like SIGINT (servers install their own)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _interrupt)


pass_ctx = click.make_pass_decorator(Ctx)

PLUGIN_GROUP = "layerfs.commands"  # entry points of commands from outside the engine


class LayerfsGroup(click.Group):
    """The ``layerfs`` group: commands from outside the engine (``bench``, ``snapshotter``:
    entry points in ``PLUGIN_GROUP``) are loaded only when named or listed, so that a
    ``layerfs pull`` imports neither the benchmark nor importlib.metadata."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            load_plugins(self, only=cmd_name)
            command = super().get_command(ctx, cmd_name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        load_plugins(self)
        return super().list_commands(ctx)


def load_plugins(group: click.Group, only: str | None = None) -> None:
    """Add the commands other distributions register as entry points (all, or ``only``)."""
    from importlib.metadata import entry_points  # ~50 ms: only when a plugin is wanted

    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name in group.commands or (only is not None and ep.name != only):
            continue
        command = ep.load()
        if isinstance(command, click.Command):
            group.add_command(command, ep.name)


@click.group(cls=LayerfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", envvar="LAYERFS_ROOT", type=click.Path(file_okay=False),
              help=f"Store directory (default: $LAYERFS_ROOT, else {default_root()}).")
@click.option("-q", "--quiet", is_flag=True, help="No progress or log messages on stderr.")
@click.option("--debug", is_flag=True, envvar="LAYERFS_DEBUG",
              help="Show the Python traceback of an unexpected error (also $LAYERFS_DEBUG=1).")
@click.version_option(__version__, prog_name="layerfs")
@click.pass_context
def cli(ctx: click.Context, root: str | None, quiet: bool, debug: bool) -> None:
    """layerfs: a layer store for container images, mounted with overlayfs or FUSE."""
    ctx.obj = Ctx(root, quiet, debug)


def emit(text: str) -> None:
    if text:
        click.echo(text, nl=not text.endswith("\n"))


def emit_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))
