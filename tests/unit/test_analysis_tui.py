"""The explorer (layerfs.tui), driven headless with textual's own test pilot
(``App.run_test``) over the image with known waste (tests/support/wasteimage.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, Static, Tree

from layerfs import analysis, importer
from layerfs.store import Store
from layerfs.tui import ExplorerApp, ExplorerModel
from layerfs.tui.explorer import visible_entries
from tests.support import wasteimage


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExplorerModel]:
    tmp = tmp_path_factory.mktemp("tui")
    store = Store(str(tmp / "store"))
    importer.import_path(store, str(wasteimage.build_layout(tmp / "layout")), name=wasteimage.NAME)
    img = store.get_image(wasteimage.NAME)
    dirs = list(reversed(store.layer_dirs(img.top_chain_id)))
    try:
        yield ExplorerModel(analysis.analyze(store, img), lambda n: analysis.image_tree(dirs, n))
    finally:
        store.close()


def _paths(app: ExplorerApp) -> list[str]:
    return [t.path for t in app.shown]


def _top_names(app: ExplorerApp) -> list[str]:
    tree = app.query_one("#tree", Tree)
    return [str(node.label).split()[-3] for node in tree.root.children]


def test_explorer_layers_tree_changes_filter_collapse(model: ExplorerModel) -> None:
    async def drive() -> None:
        app = ExplorerApp(model)
        async with app.run_test(size=(160, 50)) as pilot:
            # starts on the top layer: the whole image, and the image's scores
            assert app.layer == 3
            assert "efficiency 40.77%" in str(app.query_one("#summary", Static).render())
            assert _top_names(app) == ["bin/", "data/", "etc/", "new/", "old/", "usr/", "var/"]
            labels = {t.path: t.mark for t in app.shown}
            assert labels["/bin/tool"] == "M" and labels["/old"] == "D" and labels["/var/cache/z"] == "A"
            # changes only
            await pilot.press("c")
            assert app.changes_only
            assert _paths(app) == ["/bin", "/bin/tool", "/new", "/new/f1", "/old", "/var", "/var/cache",
                                   "/var/cache/x", "/var/cache/y", "/var/cache/z"]
            # another layer, from the layer list
            app.query_one("#layers", DataTable).focus()
            await pilot.press("up")
            assert app.layer == 2
            assert _paths(app) == ["/data", "/data/big", "/etc", "/etc/conf", "/usr", "/usr/share",
                                   "/usr/share/doc", "/usr/share/doc/a.txt", "/usr/share/doc/b.txt"]
            assert "layer 2: COPY docs" in str(app.query_one("#details", Static).render())
            await pilot.press("c")
            assert not app.changes_only and "/usr/share/doc/a.txt" in _paths(app)
            # a filter: typed keys go to the box, not to the bindings ('c' stays text)
            await pilot.press("slash")
            assert isinstance(app.focused, Input)
            await pilot.press(*"conf")
            assert app.pattern == "conf" and not app.changes_only
            assert _paths(app) == ["/etc", "/etc/conf"]
            await pilot.press("escape")
            assert app.pattern == "" and len(_paths(app)) > 5
            # collapse and expand a directory with enter
            tree = app.query_one("#tree", Tree)
            tree.focus()
            tree.move_cursor(tree.root.children[0])  # bin/
            node = tree.cursor_node
            assert node is not None and str(node.label).split()[-3] == "bin/"
            was = node.is_expanded
            await pilot.press("enter")
            assert node.is_expanded != was
            await pilot.press("e")
            assert all(n.is_expanded for n in tree.root.children if n.allow_expand)
            await pilot.press("x")
            assert not any(n.is_expanded for n in tree.root.children)
            await pilot.press("q")
        assert app.return_code in (0, None)

    asyncio.run(drive())


def test_visible_entries_keeps_the_way_to_each_match(model: ExplorerModel) -> None:
    entries = model.tree(3)
    assert visible_entries(entries, changes_only=False, pattern="") == list(entries)
    assert [t.path for t in visible_entries(entries, changes_only=False, pattern="B.TXT")] == [
        "/usr", "/usr/share", "/usr/share/doc", "/usr/share/doc/b.txt"]
    assert [t.path for t in visible_entries(entries, changes_only=True, pattern="cache/")] == [
        "/var", "/var/cache", "/var/cache/x", "/var/cache/y", "/var/cache/z"]


def test_explore_refuses_without_a_terminal(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = tmp_path / "store"
    subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", "import",
                    str(wasteimage.build_layout(tmp_path / "layout")), "--name", wasteimage.NAME], check=True,
                   capture_output=True)
    for args in (["explore", wasteimage.NAME], ["analyze", "-i", wasteimage.NAME]):
        r = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), *args], capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=120)
        assert r.returncode == 2 and "needs a terminal" in r.stderr and r.stderr.count("\n") == 1
