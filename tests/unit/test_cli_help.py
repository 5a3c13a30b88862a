"""Every command and every option of the ``layerfs`` click tree (the plugins ``bench`` and
``snapshotter`` included) says what it does in ``--help``; ``LAYERFS_ROOT`` is shown."""

from __future__ import annotations

from collections.abc import Iterator

import click
from click.testing import CliRunner

from layerfs.cli import _plugins, cli


def _walk(cmd: click.Command, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _walk(sub, (*path, name))


def _commands() -> list[tuple[tuple[str, ...], click.Command]]:
    _plugins()
    return list(_walk(cli, ("layerfs",)))


def test_the_tree_has_the_commands_the_issue_names() -> None:
    names = {" ".join(p) for p, _c in _commands()}
    for expected in ("layerfs df", "layerfs diff", "layerfs history", "layerfs ps", "layerfs mounts",
                     "layerfs fsck", "layerfs commit", "layerfs pull", "layerfs push", "layerfs snapshotter serve",
                     "layerfs gc", "layerfs info", "layerfs man"):
        assert expected in names


def test_every_command_and_option_has_help() -> None:
    missing = []
    for path, cmd in _commands():
        if not (cmd.help or cmd.short_help):
            missing.append(" ".join(path))
        missing += [f"{' '.join(path)} {'/'.join(p.opts)}" for p in cmd.params
                    if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert not missing, "without help text:\n" + "\n".join(missing)


def test_help_renders_for_every_command_and_names_each_option() -> None:
    runner = CliRunner()
    for path, cmd in _commands():
        r = runner.invoke(cli, [*path[1:], "--help"], prog_name="layerfs")
        assert r.exit_code == 0, (path, r.output)
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                assert p.opts[-1] in r.output, (path, p.opts)


def test_root_help_shows_layerfs_root() -> None:
    r = CliRunner().invoke(cli, ["--help"], prog_name="layerfs")
    assert "$LAYERFS_ROOT" in r.output and "--root" in r.output
