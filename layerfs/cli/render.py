"""Inspection views: images, the layer forest, history, per-layer diffs, changes and df.

Pure rendering. ``layerfs.catalog`` gathers what a view needs from the store into plain
records (``LayerInfo``, ``ImageInfo``, ``DfRow``) and every ``render_*`` function turns them
into the text that goes to stdout. Nothing here opens the store, reads the clock (``now`` is
a parameter, defaulting to the current time) or writes anywhere, so every view is tested
against golden files.

Output conventions:

- ``table`` output copies docker's: headers in capitals, columns aligned the way docker's
  ``tabwriter.NewWriter(out, 10, 1, 3, ' ', 0)`` aligns them (each column but the last as
  wide as its widest cell plus 3 spaces, at least 10), except that trailing blanks are
  stripped so a line never ends in spaces.
- Sizes are decimal and human (``human_size``, go-units ``HumanSize``: ``429.9MB``); ages
  are go-units ``HumanDuration`` plus `` ago``; ids are 12 hex digits without ``sha256:``
  unless ``no_trunc``.
- ``json`` output always carries full values: whole digests, sizes as integer bytes, times
  in RFC 3339 (UTC, ``Z``). Naive datetimes are taken to be UTC.
- Every renderer returns text ending in a newline, or ``""`` when there is nothing to show
  and the format has no header (an empty tree, an empty diff).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from layerfs.catalog import DfRow, ImageInfo, LayerInfo
from layerfs.errors import InvalidArgument
from layerfs.image.ref import split_tag
from layerfs.text import human_duration, human_size, rfc3339, table, utc

__all__ = [
    "DfRow",
    "ImageInfo",
    "LayerInfo",
    "human_duration",
    "human_size",
    "render_changes",
    "render_df",
    "render_history",
    "render_images",
    "render_layer_diffs",
    "render_tree",
    "split_reference",
]

CHANGE_KINDS = ("A", "C", "D")
NONE = "<none>"
# docker history truncates CREATED BY to this many characters, ellipsis included.
CREATED_BY_WIDTH = 45
ELLIPSIS = "\u2026"
# docker's tables: tabwriter minwidth 10 (padding 3, text.table's default)
DOCKER_MINWIDTH = 10


# --- times --------------------------------------------------------------------------------


def _rfc3339(moment: datetime | None) -> str | None:
    return None if moment is None else rfc3339(moment)


def _since(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "N/A"
    return human_duration((utc(now) - utc(moment)).total_seconds()) + " ago"


def _now(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else now


# --- shared text helpers -----------------------------------------------------------------


def _short(digest: str, no_trunc: bool) -> str:
    """12 hex digits without the algorithm, or the whole digest with ``no_trunc``."""
    if no_trunc:
        return digest
    return digest.partition(":")[2][:12] if ":" in digest else digest[:12]


_LINE_BREAKS = re.compile(r"[ \t]*[\r\n]+[ \t]*")


def _one_line(text: str) -> str:
    # docker only turns tabs into spaces; a RUN with "\<newline>" continuations would still
    # break the table, so line breaks (and the indentation around them) become one space.
    return _LINE_BREAKS.sub(" ", text).replace("\t", " ").strip()


def _ellipsis(text: str, width: int) -> str:
    """docker's ``Ellipsis``: at most ``width`` characters, the last one "…" if cut."""
    return text if len(text) <= width else text[: width - 1] + ELLIPSIS


def _printable_path(path: str) -> str:
    """A path as one safe line: control characters and undecodable bytes as ``\\xNN``.

    File names may hold newlines (which would forge extra ``KIND PATH`` lines) or bytes that
    are not UTF-8 (``os.fsdecode`` surrogates, which stdout cannot encode). JSON output keeps
    the exact name instead.
    """
    out = []
    for char in path:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(char)
    return "".join(out)


def _json(value: object) -> str:
    return json.dumps(value, indent=2) + "\n"


def _check_format(fmt: str, allowed: tuple[str, ...]) -> None:
    if fmt not in allowed:
        raise InvalidArgument(f"unknown format {fmt!r}: expected one of {', '.join(allowed)}")


# --- images -------------------------------------------------------------------------------


def split_reference(name: str) -> tuple[str, str]:
    """``repo/path:tag`` -> (repository, tag); a digest or missing tag gives ``<none>``.

    The tag is what follows the last ``:`` after the last ``/``, so a registry port
    (``localhost:5000/app``) is not mistaken for one. ``repo@sha256:...`` shows the
    repository with tag ``<none>``, as ``docker images`` does for digest references.
    """
    repo, tag = split_tag(name)
    return repo, NONE if tag is None else tag


def _newest_first(images: Iterable[ImageInfo]) -> list[ImageInfo]:
    def key(image: ImageInfo) -> tuple[bool, float, str]:
        # Unknown creation times sort last: they are most likely the oldest.
        stamp = -utc(image.created).timestamp() if image.created is not None else 0.0
        return (image.created is None, stamp, image.name)

    return sorted(images, key=key)


def render_images(
    images: Iterable[ImageInfo],
    fmt: str = "table",
    no_trunc: bool = False,
    now: datetime | None = None,
) -> str:
    """``docker images``: REPOSITORY, TAG, IMAGE ID, CREATED, SIZE; newest first, then name.

    One row per name, so an image known under two tags shows twice, as in docker.
    """
    _check_format(fmt, ("table", "json"))
    ordered = _newest_first(images)
    if fmt == "json":
        return _json(
            [
                {
                    "name": image.name,
                    "repository": split_reference(image.name)[0],
                    "tag": split_reference(image.name)[1],
                    "id": image.image_id,
                    "manifest_digest": image.manifest_digest,
                    "created": _rfc3339(image.created),
                    "size": image.size,
                    "layers": [layer.chain_id for layer in image.layers],
                }
                for image in ordered
            ]
        )
    moment = _now(now)
    rows = [
        (
            *split_reference(image.name),
            _short(image.image_id, no_trunc),
            _since(image.created, moment),
            human_size(image.size),
        )
        for image in ordered
    ]
    return table(("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"), rows, minwidth=DOCKER_MINWIDTH)


# --- the layer forest ----------------------------------------------------------------------


@dataclass
class _Node:
    """A layer in the merged forest; ``chain_id`` None is the shared empty chain."""

    chain_id: str | None
    size: int
    virtual_size: int
    tags: set[str] = field(default_factory=set)
    children: list[_Node] = field(default_factory=list)

    def sort_key(self) -> str:
        # By hex digits: the order of the 12-hex short ids, with full ids breaking ties.
        return "" if self.chain_id is None else self.chain_id.partition(":")[2]


def _forest(images: Iterable[ImageInfo]) -> list[_Node]:
    """Merge every image's chain into one forest keyed by chain id, children sorted.

    A chain id commits to every layer below it, so its parent is the same in every image:
    a node is linked to its parent once, when first seen. That also keeps inconsistent
    input (the same chain id under two parents) from producing a cycle.

    Images with no layers (``FROM scratch`` with only a config) all share the empty chain;
    they become one ``<none>`` node with size 0, placed after the real roots.
    """
    nodes: dict[str, _Node] = {}
    roots: list[_Node] = []
    empty = _Node(None, 0, 0)
    for image in images:
        parent: _Node | None = None
        virtual = 0
        for layer in image.layers:
            virtual += layer.size
            node = nodes.get(layer.chain_id)
            if node is None:
                node = nodes[layer.chain_id] = _Node(layer.chain_id, layer.size, virtual)
                (roots if parent is None else parent.children).append(node)
            parent = node
        (parent if parent is not None else empty).tags.add(image.name)
    for node in nodes.values():
        node.children.sort(key=_Node.sort_key)
    roots.sort(key=_Node.sort_key)
    return roots + ([empty] if empty.tags else [])


def _preorder(roots: list[_Node]) -> Iterable[tuple[_Node, str, bool]]:
    """Depth-first (node, prefix, is_last); iterative, since chains can be 500 layers deep."""
    stack = [(node, "", i == len(roots) - 1) for i, node in reversed(list(enumerate(roots)))]
    while stack:
        node, prefix, last = stack.pop()
        yield node, prefix, last
        below = prefix + ("  " if last else "│ ")
        kids = node.children
        stack.extend((kid, below, i == len(kids) - 1) for i, kid in reversed(list(enumerate(kids))))


def _node_id(node: _Node, no_trunc: bool) -> str:
    return NONE if node.chain_id is None else _short(node.chain_id, no_trunc)


def _tree_text(roots: list[_Node], no_trunc: bool) -> str:
    lines = []
    for node, prefix, last in _preorder(roots):
        line = (
            f"{prefix}{'└─' if last else '├─'}{_node_id(node, no_trunc)}"
            f" Size: {human_size(node.size)} Virtual Size: {human_size(node.virtual_size)}"
        )
        if node.tags:
            line += " Tags: " + ", ".join(sorted(node.tags))
        lines.append(line)
    return "".join(line + "\n" for line in lines)


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tree_dot(roots: list[_Node], no_trunc: bool) -> str:
    """Graphviz: node ids are full chain ids (unique); labels are short; tips filled."""
    out = ["digraph layers {", '  node [shape=box, fontname="monospace"];']
    edges: list[str] = []
    for node, _prefix, _last in _preorder(roots):
        name = _dot_quote(node.chain_id or NONE)
        label = [
            _node_id(node, no_trunc),
            f"Size: {human_size(node.size)}",
            f"Virtual Size: {human_size(node.virtual_size)}",
            *sorted(node.tags),
        ]
        # "\n" inside a DOT label is Graphviz's own line-break escape, so join after quoting.
        attrs = "label=" + '"' + "\\n".join(_dot_quote(part)[1:-1] for part in label) + '"'
        if node.tags:
            attrs += ', style="filled,rounded", fillcolor="paleturquoise"'
        out.append(f"  {name} [{attrs}];")
        edges.extend(f"  {name} -> {_dot_quote(kid.chain_id or NONE)};" for kid in node.children)
    return "\n".join([*out, *edges, "}"]) + "\n"


def _tree_json(roots: list[_Node]) -> str:
    """Nested JSON, laid out exactly as ``json.dumps(indent=2)`` would lay it out.

    Written without recursion: the json module recurses once per nesting level and fails
    below ~500 layers, which is the kernel overlayfs stacking limit our chains can reach.
    """
    if not roots:
        return "[]\n"
    out = ["["]
    # (node, indent, trailing comma); node None closes the children list opened at indent.
    stack: list[tuple[_Node | None, int, bool]] = [
        (node, 2, i < len(roots) - 1) for i, node in reversed(list(enumerate(roots)))
    ]
    while stack:
        node, pad, comma = stack.pop()
        end = " " * pad + "}" + ("," if comma else "")
        if node is None:
            out += [" " * (pad + 2) + "]", end]
            continue
        fields = {
            "id": node.chain_id,
            "size": node.size,
            "virtual_size": node.virtual_size,
            "tags": sorted(node.tags),
        }
        lines = json.dumps(fields, indent=2).splitlines()[:-1]  # without the closing brace
        lines[-1] += ","
        out += [" " * pad + line for line in lines]
        if not node.children:
            out += [" " * (pad + 2) + '"children": []', end]
            continue
        out.append(" " * (pad + 2) + '"children": [')
        stack.append((None, pad, comma))
        kids = node.children
        stack.extend((kid, pad + 4, i < len(kids) - 1) for i, kid in reversed(list(enumerate(kids))))
    out.append("]")
    return "\n".join(out) + "\n"


def render_tree(images: Iterable[ImageInfo], fmt: str = "tree", no_trunc: bool = False) -> str:
    """dockviz ``images --tree``: every image's layers merged into one forest.

    Each line is ``<prefix><id> Size: <own> Virtual Size: <cumulative>`` plus
    `` Tags: a:1, b:2`` where the layer is the top of one or more images; siblings are
    ordered by id. Images without layers share one last top-level line,
    ``<none> Size: 0B Virtual Size: 0B Tags: ...``, so every line has the same fields. ``dot`` draws the same forest for Graphviz; ``json`` nests
    ``{"id", "size", "virtual_size", "tags", "children"}`` objects (``id`` null for the
    ``<none>`` node of images without layers).
    """
    _check_format(fmt, ("tree", "dot", "json"))
    roots = _forest(images)
    if fmt == "dot":
        return _tree_dot(roots, no_trunc)
    if fmt == "json":
        return _tree_json(roots)
    return _tree_text(roots, no_trunc)


# --- history and diffs ---------------------------------------------------------------------


def _created_by(layer: LayerInfo, no_trunc: bool) -> str:
    text = _one_line(layer.created_by)
    return text if no_trunc else _ellipsis(text, CREATED_BY_WIDTH)


def render_history(
    image: ImageInfo,
    fmt: str = "table",
    no_trunc: bool = False,
    now: datetime | None = None,
) -> str:
    """``docker history``: LAYER (diff id), CREATED, CREATED BY, SIZE, COMMENT; top first.

    Only layers are listed: config history entries with ``empty_layer`` have no contents
    to show. Sizes use the same 4 significant digits as every other layerfs view (docker
    history alone uses 3).
    """
    _check_format(fmt, ("table", "json"))
    top_first = list(reversed(image.layers))
    if fmt == "json":
        return _json(
            [
                {
                    "chain_id": layer.chain_id,
                    "diff_id": layer.diff_id,
                    "created": _rfc3339(layer.created),
                    "created_by": layer.created_by,
                    "size": layer.size,
                    "comment": layer.comment,
                }
                for layer in top_first
            ]
        )
    moment = _now(now)
    rows = [
        (
            _short(layer.diff_id, no_trunc),
            _since(layer.created, moment),
            _created_by(layer, no_trunc),
            human_size(layer.size),
            _one_line(layer.comment),
        )
        for layer in top_first
    ]
    return table(("LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT"), rows, minwidth=DOCKER_MINWIDTH)


def _checked(changes: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    out = list(changes)
    for kind, path in out:
        if kind not in CHANGE_KINDS:
            raise InvalidArgument(f"change kind {kind!r} for {path!r} is not one of A, C, D")
    return out


def render_changes(changes: Iterable[tuple[str, str]], fmt: str = "table") -> str:
    """``docker diff``: ``KIND PATH`` lines, in the order given (the producer sorts)."""
    _check_format(fmt, ("table", "json"))
    checked = _checked(changes)
    if fmt == "json":
        return _json([{"kind": kind, "path": path} for kind, path in checked])
    return "".join(f"{kind} {_printable_path(path)}\n" for kind, path in checked)


def render_layer_diffs(
    per_layer: Sequence[tuple[LayerInfo, Iterable[tuple[str, str]]]],
    fmt: str = "table",
    no_trunc: bool = False,
) -> str:
    """What each layer adds, changes and deletes, bottom layer first.

    Table: per layer a header ``# layer N/M <diff id>  <created by>  (+a ~c -d)`` and its
    ``KIND PATH`` lines. Headers start with ``#`` and no blank lines are added, so
    ``grep -v '^#'`` leaves plain docker-diff lines. JSON: one object per layer with
    ``index`` (1-based, bottom = 1, as in the header), full ids and its ``changes``.
    """
    _check_format(fmt, ("table", "json"))
    layers = [(layer, _checked(changes)) for layer, changes in per_layer]
    if fmt == "json":
        return _json(
            [
                {
                    "index": n,
                    "chain_id": layer.chain_id,
                    "diff_id": layer.diff_id,
                    "created_by": layer.created_by,
                    "size": layer.size,
                    "changes": [{"kind": kind, "path": path} for kind, path in changes],
                }
                for n, (layer, changes) in enumerate(layers, start=1)
            ]
        )
    out = []
    for n, (layer, changes) in enumerate(layers, start=1):
        counts = {kind: 0 for kind in CHANGE_KINDS}
        for kind, _path in changes:
            counts[kind] += 1
        header = f"# layer {n}/{len(layers)} {_short(layer.diff_id, no_trunc)}"
        if layer.created_by:
            header += "  " + _created_by(layer, no_trunc)
        header += f"  (+{counts['A']} ~{counts['C']} -{counts['D']})"
        out.append(header + "\n")
        out.extend(f"{kind} {_printable_path(path)}\n" for kind, path in changes)
    return "".join(out)


# --- df -------------------------------------------------------------------------------------


def _reclaimable(row: DfRow) -> str:
    # docker: integer percentage of the kind's total size, omitted when that size is 0.
    if row.size > 0:
        return f"{human_size(row.reclaimable)} ({row.reclaimable * 100 // row.size}%)"
    return human_size(row.reclaimable)


def render_df(rows: Iterable[DfRow], fmt: str = "table") -> str:
    """``docker system df``: TYPE, TOTAL, ACTIVE, SIZE, RECLAIMABLE, rows in the order given."""
    _check_format(fmt, ("table", "json"))
    items = list(rows)
    if fmt == "json":
        return _json(
            [
                {
                    "type": row.kind,
                    "total": row.total,
                    "active": row.active,
                    "size": row.size,
                    "reclaimable": row.reclaimable,
                }
                for row in items
            ]
        )
    lines = [
        (row.kind, str(row.total), str(row.active), human_size(row.size), _reclaimable(row)) for row in items
    ]
    return table(("TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"), lines, minwidth=DOCKER_MINWIDTH)
