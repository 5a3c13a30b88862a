"""The explorer app: ``ExplorerModel`` (what to show) and ``ExplorerApp`` (how).

Keys: up/down (or j/k) in the layer list choose the layer the tree shows; tab moves between
the panes; enter or space collapses and expands a directory; ``c`` shows only what the
selected layer changed; ``/`` filters paths (substring, escape clears); ``e``/``x`` expand or
collapse the whole tree; ``q`` quits.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Input, Static, Tree
from textual.widgets.tree import TreeNode

from layerfs.analysis import Analysis, TreeEntry
from layerfs.text import human_size

MARK_STYLES = {"A": "green", "C": "yellow", "M": "cyan", "D": "red"}
MARK_WORDS = {"A": "added", "C": "changed", "M": "metadata only", "D": "deleted"}


@dataclass
class ExplorerModel:
    """An image's analysis and a way to get its tree as of layer N (1-based), marked with
    what N changed (``layerfs.analysis.image_tree``). Trees are computed once per layer."""

    analysis: Analysis
    tree_of: Callable[[int], Sequence[TreeEntry]]
    _trees: dict[int, Sequence[TreeEntry]] = field(default_factory=dict, repr=False)

    def tree(self, layer: int) -> Sequence[TreeEntry]:
        if layer not in self._trees:
            self._trees[layer] = self.tree_of(layer)
        return self._trees[layer]


def visible_entries(entries: Sequence[TreeEntry], *, changes_only: bool, pattern: str) -> list[TreeEntry]:
    """The entries to show: with ``changes_only`` those the layer marked, with ``pattern``
    those whose path contains it (case-insensitive); and the directories on their way."""
    if not changes_only and not pattern:
        return list(entries)
    needle = pattern.lower()
    keep: set[str] = set()
    for t in entries:
        if (changes_only and not t.mark) or (needle and needle not in t.path.lower()):
            continue
        p = t.path
        while p and p not in keep:
            keep.add(p)
            p = p.rpartition("/")[0]
    return [t for t in entries if t.path in keep]


def entry_label(t: TreeEntry) -> Text:
    """``M tool  5kB  L3``: the mark, the name (and a symlink's target), size, source layer."""
    text = Text()
    text.append(f"{t.mark or ' '} ", style=MARK_STYLES.get(t.mark, ""))
    name = t.name + ("/" if t.is_dir else "")
    text.append(name, style=("bold " if t.is_dir else "") + MARK_STYLES.get(t.mark, ""))
    if stat.S_ISLNK(t.mode):
        text.append(f" -> {t.target}", style="dim")
    text.append(f"  {human_size(t.size)}  L{t.layer}", style="dim")
    return text


class ExplorerApp(App[None]):
    """dive's two panes: layers (and the image's scores) left, the merged tree right."""

    TITLE = "layerfs explore"
    CSS = """
    #left { width: 45%; }
    #layers { height: 1fr; }
    #summary { height: auto; padding: 0 1; border: round $accent; }
    #details { height: auto; padding: 0 1; }
    #filter { display: none; }
    #filter.shown { display: block; }
    #files { width: 55%; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("c", "toggle_changes", "Changes only"),
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("e", "expand_all", "Expand all"),
        Binding("x", "collapse_all", "Collapse all"),
        Binding("j", "cursor_down", show=False),
        Binding("k", "cursor_up", show=False),
    ]

    def __init__(self, model: ExplorerModel) -> None:
        super().__init__()
        self.model = model
        self.layer = len(model.analysis.layers)  # the top layer: the whole image
        self.changes_only = False
        self.pattern = ""
        self.shown: list[TreeEntry] = []

    # --- layout -----------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="left"):
                yield DataTable(id="layers", cursor_type="row", zebra_stripes=True)
                yield Static(self._summary(), id="summary")
                yield Static("", id="details")
            with Vertical(id="files"):
                yield Input(placeholder="filter paths (escape clears)", id="filter")
                yield Tree("/", id="tree")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#layers", DataTable)
        table.add_columns("#", "SIZE", "WASTED", "CREATED BY")
        for c in self.model.analysis.layers:
            table.add_row(str(c.index), human_size(c.bytes), human_size(c.wasted_bytes),
                          (c.created_by or c.diff_id[7:19])[:60], key=str(c.index))
        if self.model.analysis.layers:
            table.move_cursor(row=self.layer - 1)
        self.refresh_tree()

    def _summary(self) -> str:
        a = self.model.analysis
        return (f"{a.name}\n"
                f"efficiency {a.efficiency * 100:.2f}%   wasted {human_size(a.wasted_bytes)}   "
                f"user wasted {a.user_wasted_ratio * 100:.2f}%\n"
                f"duplicated {human_size(a.duplicate_bytes)}   metadata-only copies "
                f"{human_size(a.metadata_only_bytes)}")

    # --- the tree -----------------------------------------------------------------------

    def refresh_tree(self) -> None:
        tree: Tree[TreeEntry] = self.query_one("#tree", Tree)
        tree.clear()
        layers = self.model.analysis.layers
        if not layers:
            tree.root.set_label("/ (no layers)")
            self.shown = []
            return
        entries = self.model.tree(self.layer)
        self.shown = visible_entries(entries, changes_only=self.changes_only, pattern=self.pattern)
        what = "changes of" if self.changes_only else "tree as of"
        tree.root.set_label(f"/  ({what} layer {self.layer}/{len(layers)}"
                            + (f", filter {self.pattern!r}" if self.pattern else "") + ")")
        nodes: dict[str, TreeNode[TreeEntry]] = {"": tree.root}
        expand = self.changes_only or bool(self.pattern)
        for t in self.shown:
            parent = nodes.get(t.path.rpartition("/")[0], tree.root)
            if t.is_dir and t.mark != "D":
                nodes[t.path] = parent.add(entry_label(t), data=t, expand=expand)
            else:
                parent.add_leaf(entry_label(t), data=t)
        tree.root.expand()
        cost = layers[self.layer - 1]
        counts = {k: sum(1 for t in entries if t.mark == k) for k in MARK_STYLES}
        self.query_one("#details", Static).update(
            f"layer {cost.index}: {cost.created_by or cost.diff_id}\n"
            f"adds {human_size(cost.bytes)}, wastes {human_size(cost.wasted_bytes)}, overwrites "
            f"{human_size(cost.overwrites_bytes)}, deletes {human_size(cost.deletes_bytes)}\n"
            + "  ".join(f"{k} {MARK_WORDS[k]}: {counts[k]}" for k in MARK_STYLES))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        layer = event.cursor_row + 1
        if layer != self.layer:
            self.layer = layer
            self.refresh_tree()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.pattern = event.value
        self.refresh_tree()

    # --- actions ------------------------------------------------------------------------

    def action_toggle_changes(self) -> None:
        self.changes_only = not self.changes_only
        self.refresh_tree()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.remove_class("shown")
        self.pattern = ""
        self.refresh_tree()
        self.query_one("#tree", Tree).focus()

    def action_expand_all(self) -> None:
        self.query_one("#tree", Tree).root.expand_all()

    def action_collapse_all(self) -> None:
        root = self.query_one("#tree", Tree).root
        for child in root.children:
            child.collapse_all()

    def action_cursor_down(self) -> None:
        focused = self.focused
        if isinstance(focused, DataTable | Tree):
            focused.action_cursor_down()

    def action_cursor_up(self) -> None:
        focused = self.focused
        if isinstance(focused, DataTable | Tree):
            focused.action_cursor_up()
