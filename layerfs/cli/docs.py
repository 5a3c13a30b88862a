"""Documentation made from the click commands themselves: man pages (``layerfs man``) and
shell completion scripts (``layerfs completion SHELL``), so neither can drift from ``--help``.

Man pages: one per command, named as git names its own (``layerfs.1``, ``layerfs-images.1``,
``layerfs-snapshotter-serve.1``): NAME, SYNOPSIS, DESCRIPTION, OPTIONS (each option's help),
COMMANDS for a group, ENVIRONMENT, EXIT STATUS and SEE ALSO, written in man(7) macros.
``layerfs man --output DIR`` writes them all (``scripts/bootstrap`` installs them into the
virtualenv's ``share/man/man1``, where man(1) finds them through ``PATH``); ``layerfs man
images`` prints one page's source (``layerfs man images | man -l -``).

Completion is click's own (bash, zsh, fish): the script ``layerfs completion SHELL`` prints
calls ``layerfs`` back with ``_LAYERFS_COMPLETE`` set; image and container names come from
the store through ``layerfs.cli.complete``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from datetime import UTC, datetime

import click
from click.shell_completion import get_completion_class

from layerfs import __version__
from layerfs.cli.base import cli, handle_errors, load_plugins
from layerfs.errors import UsageError

COMPLETE_VAR = "_LAYERFS_COMPLETE"
PROG = "layerfs"
SHELLS = ("bash", "zsh", "fish")
# what the environment changes (documented on the root page)
ENVIRONMENT = (
    ("LAYERFS_ROOT", "The store directory, as --root (default: /var/lib/layerfs as root, "
                     "$XDG_DATA_HOME/layerfs otherwise)."),
    ("LAYERFS_DEBUG", "1: show the Python traceback of an unexpected error, as --debug."),
    ("LAYERFS_RESERVE_BYTES", "Room the store keeps for the commands that free space on a full disk "
                              "(default 8 MiB)."),
    (COMPLETE_VAR, "Set by the completion scripts of layerfs completion SHELL; not for people."),
)
EXIT_STATUS = (("0", "success"), ("1", "failure (or, for diff REF OTHER, the images differ; for analyze, "
                                        "a rule was crossed)"), ("2", "usage error"))


def walk(cmd: click.Command, path: tuple[str, ...] = (PROG,)) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command below ``cmd`` (itself first), with the words that call it."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            if not sub.hidden:
                yield from walk(sub, (*path, name))


def page_name(path: tuple[str, ...]) -> str:
    return "-".join(path)


def _esc(text: str) -> str:
    """Text for roff: backslashes escaped, hyphens as minus signs (so options copy and paste),
    a leading dot or quote made harmless."""
    out = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _paragraphs(text: str) -> list[str]:
    """click's help text as paragraphs, each joined into one line (``\\b`` blocks kept)."""
    paras = []
    for block in inspect.cleandoc(text).split("\n\n"):
        lines = [line.strip() for line in block.splitlines() if line.strip() != "\b"]
        if lines:
            paras.append(" ".join(lines).replace("``", ""))
    return paras


def _summary(text: str) -> str:
    """The first sentence of a help text (for NAME), without a leading "layerfs: "."""
    para = _paragraphs(text)[0] if text.strip() else ""
    sentence = para.split(". ")[0].rstrip(".")
    return sentence.removeprefix(f"{PROG}: ")


def _option_head(ctx: click.Context, p: click.Parameter) -> str:
    record = p.get_help_record(ctx)
    return record[0] if record else "/".join(p.opts)


def man_page(path: tuple[str, ...], cmd: click.Command, date: str | None = None) -> str:
    """The man(7) source of one command's page."""
    name = page_name(path)
    with click.Context(cmd, info_name=" ".join(path), help_option_names=["-h", "--help"]) as ctx:
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        helptext = cmd.help or cmd.short_help or ""
        first = _summary(helptext)
        when = date or datetime.fromtimestamp(int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or
                                              datetime.now(UTC).timestamp(), UTC).strftime("%Y-%m-%d")
        out = [f'.TH "{name.upper()}" "1" "{when}" "{PROG} {__version__}" "layerfs manual"',
               ".SH NAME", f"{_esc(name)} \\- {_esc(first.rstrip('.'))}",
               ".SH SYNOPSIS", f".B {_esc(' '.join(path))}", _esc(usage),
               ".SH DESCRIPTION"]
        for para in _paragraphs(helptext) or [first]:  # click's help, paragraph by paragraph
            out += [_esc(para), ".PP"]
        out.pop()
        options = [p for p in cmd.get_params(ctx) if isinstance(p, click.Option) and not p.hidden]
        if options:
            out.append(".SH OPTIONS")
            for p in options:
                head, _sep, _rest = _option_head(ctx, p).partition("  ")
                record = p.get_help_record(ctx)
                # a long list of choices may break after each "|" (roff's \: break point)
                head = _esc(head).replace("|", "|\\:")
                out += [".TP", f"\\fB{head}\\fR", _esc(record[1] if record else "")]
        if isinstance(cmd, click.Group):
            out.append(".SH COMMANDS")
            for sub_name, sub in sorted(cmd.commands.items()):
                if sub.hidden:
                    continue
                out += [".TP", f"\\fB{_esc(sub_name)}\\fR",
                        _esc(sub.get_short_help_str(limit=300)) + f" See \\fB{_esc(page_name((*path, sub_name)))}\\fR(1)."]
        if len(path) == 1:
            out.append(".SH ENVIRONMENT")
            for var, what in ENVIRONMENT:
                out += [".TP", f"\\fB{_esc(var)}\\fR", _esc(what)]
        out.append(".SH EXIT STATUS")
        for code, what in EXIT_STATUS:
            out += [".TP", f"\\fB{code}\\fR", _esc(what)]
        see = [page_name(path[:-1])] if len(path) > 1 else []
        out += [".SH SEE ALSO", ", ".join(f"\\fB{_esc(s)}\\fR(1)" for s in see) or f"\\fB{PROG}\\-images\\fR(1)"]
    return "\n".join(out) + "\n"


def man_pages(root: click.Command) -> dict[str, str]:
    """``{"layerfs-images.1": source, ...}`` for every command below ``root``."""
    return {page_name(path) + ".1": man_page(path, cmd) for path, cmd in walk(root)}


def _find(root: click.Command, words: tuple[str, ...]) -> tuple[tuple[str, ...], click.Command]:
    path: tuple[str, ...] = (PROG,)
    cmd = root
    for w in words:
        sub = cmd.commands.get(w) if isinstance(cmd, click.Group) else None
        if sub is None:
            raise UsageError(f"man: no command {' '.join((*path[1:], w))!r} (layerfs --help lists them)")
        path, cmd = (*path, w), sub
    return path, cmd


@cli.command("man")
@click.argument("command", nargs=-1)
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="Write every command's page into this directory (e.g. ~/.local/share/man/man1) "
                   "instead of printing one page.")
@click.pass_context
@handle_errors
def man_cmd(ctx: click.Context, command: tuple[str, ...], output: str | None) -> None:
    """Man pages made from the commands' help: the page of COMMAND (default: layerfs) as man(7)
    source on stdout (layerfs man images | man -l -), or with --output every page as a file."""
    root = ctx.find_root().command
    if isinstance(root, click.Group):
        load_plugins(root)  # every page, the plugins' (bench, snapshotter) too
    if output is None:
        path, cmd = _find(root, command)
        click.echo(man_page(path, cmd), nl=False)
        return
    if command:
        raise UsageError("man --output writes every page: give no COMMAND")
    os.makedirs(output, exist_ok=True)
    pages = man_pages(root)
    for name, text in pages.items():
        with open(os.path.join(output, name), "w", encoding="utf-8") as f:
            f.write(text)
    click.echo(f"{len(pages)} pages written to {output}", err=True)


@cli.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
@handle_errors
def completion_cmd(shell: str) -> None:
    """The completion script for SHELL (click's), completing commands, options, and image and
    container names from the store. bash: eval "$(layerfs completion bash)" in ~/.bashrc;
    zsh: the same in ~/.zshrc; fish: layerfs completion fish > ~/.config/fish/completions/layerfs.fish."""
    cls = get_completion_class(shell)
    assert cls is not None  # the Choice above lists only shells click has
    click.echo(cls(cli, {}, PROG, COMPLETE_VAR).source(), nl=False)
