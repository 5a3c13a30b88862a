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
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from layerfs.analysis import Analysis, RuleResult, TreeEntry
from layerfs.analysis.waste import FAIL, PASS, SKIP
from layerfs.catalog import (
    DfImage,
    DfRow,
    HistoryStep,
    ImageComparison,
    ImageDetails,
    ImageInfo,
    LayerInfo,
)
from layerfs.errors import InvalidArgument
from layerfs.image.ref import split_tag
from layerfs.text import human_duration, human_size, parse_rfc3339_ns, rfc3339, rfc3339_nano, table, utc

__all__ = [
    "DfRow",
    "ImageInfo",
    "LayerInfo",
    "human_duration",
    "human_size",
    "render_analysis",
    "render_changes",
    "render_comparison",
    "render_df",
    "render_df_images",
    "render_file_tree",
    "render_history",
    "render_images",
    "render_inspect",
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


IMAGE_SORTS = ("created", "id", "repository", "size", "tag")


def _sorted_images(images: Iterable[ImageInfo], sort: str | None) -> list[ImageInfo]:
    ordered = _newest_first(images)
    if sort is None or sort == "created":
        return ordered
    _check_format(sort, IMAGE_SORTS)
    keys = {
        "id": lambda i: (i.image_id,),
        "repository": lambda i: split_reference(i.name),
        "tag": lambda i: (split_reference(i.name)[1], split_reference(i.name)[0]),
        "size": lambda i: (-i.size,),  # biggest first, as podman
    }
    return sorted(ordered, key=keys[sort])  # stable: newest first within a key


def render_images(
    images: Iterable[ImageInfo],
    fmt: str = "table",
    no_trunc: bool = False,
    now: datetime | None = None,
    *,
    quiet: bool = False,
    digests: bool = False,
    sort: str | None = None,
) -> str:
    """``docker images``: REPOSITORY, TAG, IMAGE ID, CREATED, SIZE; newest first, then name.

    One row per name, so an image known under two tags shows twice, as in docker.
    ``quiet``: only the image IDs, each once (``layerfs rmi $(layerfs images -q)``);
    ``digests``: a DIGEST column (the manifest digest) after TAG; ``sort``: ``created``
    (default), ``id``, ``repository``, ``tag`` or ``size`` (biggest first).
    """
    _check_format(fmt, ("table", "json"))
    ordered = _sorted_images(images, sort)
    if quiet:
        ids = dict.fromkeys(_short(image.image_id, no_trunc) for image in ordered)
        return "".join(f"{i}\n" for i in ids)
    if fmt == "json":
        return _json(
            [
                {
                    "name": image.name,
                    "repository": split_reference(image.name)[0],
                    "tag": split_reference(image.name)[1],
                    "id": image.image_id,
                    "manifest_digest": image.manifest_digest,
                    "created": (rfc3339_nano(image.created_ns) if image.created_ns is not None
                                else _rfc3339(image.created)),
                    "size": image.size,
                    "layers": [layer.chain_id for layer in image.layers],
                    "labels": image.labels,
                }
                for image in ordered
            ]
        )
    moment = _now(now)
    rows = [
        (
            *split_reference(image.name),
            *((image.manifest_digest or NONE,) if digests else ()),
            _short(image.image_id, no_trunc),
            _since(image.created, moment),
            human_size(image.size),
        )
        for image in ordered
    ]
    header = ("REPOSITORY", "TAG", *(("DIGEST",) if digests else ()), "IMAGE ID", "CREATED", "SIZE")
    return table(header, rows, minwidth=DOCKER_MINWIDTH)


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

    Each line is ``<prefix><id> Size: <own> Virtual Size: <cumulative>`` (``<id>``: the
    layer's ChainID, since a node is a layer *with everything below it*: the one layer
    identity images share; per-image views name layers by diffID) plus
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


def _steps(image: ImageInfo) -> list[HistoryStep]:
    """The image's history steps, bottom first; from its layers alone when it has none."""
    if image.history:
        return list(image.history)
    return [HistoryStep(layer.created_by, layer.created, None, layer.comment, layer=layer) for layer in image.layers]


def _step_time(step: HistoryStep) -> str | None:
    return rfc3339_nano(step.created_ns) if step.created_ns is not None else _rfc3339(step.created)


def render_history(
    image: ImageInfo,
    fmt: str = "table",
    no_trunc: bool = False,
    now: datetime | None = None,
) -> str:
    """``docker history``: DIFF ID, CREATED, CREATED BY, SIZE, COMMENT; top first.

    Config-only steps (``empty_layer``: ENV, CMD, LABEL ...) are listed too, as docker lists
    them, with DIFF ID ``<none>`` and SIZE 0B (JSON: ``chain_id``/``diff_id`` null,
    ``empty_layer`` true). Sizes use the same 4 significant digits as every other layerfs
    view (docker history alone uses 3).
    """
    _check_format(fmt, ("table", "json"))
    top_first = list(reversed(_steps(image)))
    if fmt == "json":
        return _json(
            [
                {
                    "chain_id": step.layer.chain_id if step.layer else None,
                    "diff_id": step.layer.diff_id if step.layer else None,
                    "created": _step_time(step),
                    "created_by": step.created_by,
                    "size": step.layer.size if step.layer else 0,
                    "comment": step.comment,
                    "empty_layer": step.layer is None,
                }
                for step in top_first
            ]
        )
    moment = _now(now)
    rows = [
        (
            _short(step.layer.diff_id, no_trunc) if step.layer else NONE,
            _since(step.created, moment),
            _created_by(LayerInfo("", "", None, 0, created_by=step.created_by), no_trunc),
            human_size(step.layer.size if step.layer else 0),
            _one_line(step.comment),
        )
        for step in top_first
    ]
    return table(("DIFF ID", "CREATED", "CREATED BY", "SIZE", "COMMENT"), rows, minwidth=DOCKER_MINWIDTH)


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

    Table: per layer a header ``# layer N/M diffID <diff id>  <created by>  (+a ~c -d)`` and its
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
        header = f"# layer {n}/{len(layers)} diffID {_short(layer.diff_id, no_trunc)}"
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


# --- analysis -------------------------------------------------------------------------------

SCHEMA_VERSION = 1  # of every JSON view that carries a "schemaVersion"
ANALYSIS_TOP = 20  # offenders and duplicate groups shown in the table view by default


def _percent(ratio: float) -> str:
    return f"{ratio * 100:.2f}%"


def _rule_line(r: RuleResult) -> str:
    if r.status == SKIP:
        return f"SKIP: {r.rule}: rule disabled"
    if r.rule == "highestWastedBytes":
        detail = f"wasted={human_size(r.value)} ({int(r.value)} bytes), threshold={human_size(r.threshold or 0)}"
    else:
        detail = f"value={r.value:.4f}, threshold={r.threshold:.4f}"
    return f"{r.status.upper()}: {r.rule}: {detail}"


def _analysis_json(a: Analysis, rules: Sequence[RuleResult]) -> dict[str, object]:
    return {
        "schemaVersion": SCHEMA_VERSION,
        "name": a.name,
        "id": a.image_id,
        "efficiency": a.efficiency,
        "total_bytes": a.total_bytes,
        "visible_bytes": a.visible_bytes,
        "wasted_bytes": a.wasted_bytes,
        "user_bytes": a.user_bytes,
        "user_wasted_ratio": a.user_wasted_ratio,
        "duplicate_bytes": a.duplicate_bytes,
        "metadata_only_bytes": a.metadata_only_bytes,
        "paths": a.paths,
        "visible_files": a.visible_files,
        "layers": [
            {
                "index": c.index, "chain_id": c.chain_id, "diff_id": c.diff_id, "created_by": c.created_by,
                "files": c.files, "bytes": c.bytes, "added_bytes": c.added_bytes,
                "replaced_bytes": c.replaced_bytes, "metadata_only_bytes": c.metadata_only_bytes,
                "wasted_bytes": c.wasted_bytes, "overwrites_bytes": c.overwrites_bytes,
                "deletes_bytes": c.deletes_bytes, "deleted_paths": c.deleted_paths,
            }
            for c in a.layers
        ],
        "wasted_by_directory": [
            {"directory": d, "wasted_bytes": b, "copies": n} for d, b, n in a.wasted_by_directory()
        ],
        "offenders": [
            {
                "path": o.path, "count": o.count, "total_bytes": o.total_bytes, "wasted_bytes": o.wasted_bytes,
                "occurrences": [
                    {"layer": x.layer, "size": x.size, "fate": x.fate, "by_layer": x.by_layer,
                     "metadata_only": x.metadata_only}
                    for x in o.occurrences
                ],
            }
            for o in a.offenders
        ],
        "duplicates": [
            {
                "fingerprint": "xxh3-128:" + d.fingerprint, "size": d.size, "wasted_bytes": d.wasted_bytes,
                "copies": [{"layer": c.layer, "path": c.path, "visible": c.visible} for c in d.copies],
            }
            for d in a.duplicates
        ],
        "rules": [
            {"rule": r.rule, "status": r.status, "value": r.value, "threshold": r.threshold} for r in rules
        ],
        "passed": all(r.status != FAIL for r in rules),
    }


def render_analysis(
    a: Analysis,
    rules: Sequence[RuleResult] = (),
    fmt: str = "table",
    no_trunc: bool = False,
    top: int = ANALYSIS_TOP,
) -> str:
    """``layerfs analyze``: a summary, per layer what it carries and wastes, the paths that
    waste most (dive's "Count / Total Space / Path"), duplicated content, then the CI rules.
    ``top`` bounds the two lists in the table view (0: all); JSON always has everything."""
    _check_format(fmt, ("table", "json"))
    if fmt == "json":
        return _json(_analysis_json(a, rules))
    out = [
        f"Image: {a.name} ({_short(a.image_id, no_trunc)})\n" if a.image_id else f"Image: {a.name}\n",
        f"  efficiency:           {_percent(a.efficiency)}\n",
        f"  total size:           {human_size(a.total_bytes)} ({a.total_bytes} bytes of file content)\n",
        f"  wasted:               {human_size(a.wasted_bytes)} ({a.wasted_bytes} bytes)\n",
        f"  user wasted:          {_percent(a.user_wasted_ratio)} (of {human_size(a.user_bytes)} above the base layer)\n",
        f"  duplicated:           {human_size(a.duplicate_bytes)} ({a.duplicate_bytes} bytes)\n",
        f"  metadata-only copies: {human_size(a.metadata_only_bytes)} ({a.metadata_only_bytes} bytes)\n",
        "\n",
    ]
    rows = [
        (str(c.index), _short(c.diff_id, no_trunc) if c.diff_id else NONE, human_size(c.bytes),
         human_size(c.added_bytes), human_size(c.replaced_bytes), human_size(c.metadata_only_bytes),
         human_size(c.wasted_bytes), human_size(c.overwrites_bytes), human_size(c.deletes_bytes),
         _created_by(LayerInfo("", "", None, 0, created_by=c.created_by), no_trunc))
        for c in a.layers
    ]
    out.append(table(("LAYER", "DIFF ID", "SIZE", "ADDED", "REPLACED", "META-ONLY", "WASTED", "OVERWRITES",
                      "DELETES", "CREATED BY"), rows, right=range(2, 9)))
    dirs = a.wasted_by_directory()
    shown_dirs = dirs if top <= 0 else dirs[:top]
    if shown_dirs:
        out.append("\nWasted space by directory:\n")
        out.append(table(("COPIES", "WASTED", "DIRECTORY"), [
            (str(n), human_size(b), _printable_path(d)) for d, b, n in shown_dirs], right=range(0, 2)))
    offenders = list(a.offenders) if top <= 0 else list(a.offenders[:top])
    if offenders:
        out.append("\nWasted space by path:\n")
        out.append(table(("COUNT", "TOTAL SPACE", "WASTED", "PATH"), [
            (str(o.count), human_size(o.total_bytes), human_size(o.wasted_bytes), _printable_path(o.path))
            for o in offenders], right=range(0, 3)))
        if len(offenders) < len(a.offenders):
            out.append(f"... and {len(a.offenders) - len(offenders)} more paths (--top 0 shows all)\n")
    dups = list(a.duplicates) if top <= 0 else list(a.duplicates[:top])
    if dups:
        out.append("\nDuplicated content:\n")
        out.append(table(("COPIES", "SIZE", "WASTED", "PATHS (LAYER:PATH)"), [
            (str(len(d.copies)), human_size(d.size), human_size(d.wasted_bytes),
             " ".join(f"{c.layer}:{_printable_path(c.path)}" for c in d.copies)) for d in dups],
            right=range(0, 3)))
        if len(dups) < len(a.duplicates):
            out.append(f"... and {len(a.duplicates) - len(dups)} more groups (--top 0 shows all)\n")
    if rules:
        out.append("\nRules:\n")
        out.extend(f"  {_rule_line(r)}\n" for r in rules)
        counts = {s: sum(1 for r in rules if r.status == s) for s in (PASS, FAIL, SKIP)}
        verdict = "FAIL" if counts[FAIL] else "PASS"
        out.append(f"Result: {verdict} [Total:{len(rules)}] [Passed:{counts[PASS]}] [Failed:{counts[FAIL]}] "
                   f"[Skipped:{counts[SKIP]}]\n")
    return "".join(out)


def _tree_prefixes(entries: Sequence[TreeEntry]) -> list[str]:
    """``tree(1)``'s drawing for entries in path order: ``├── ``/``└── `` and ``│   `` rails."""
    last_child: dict[str, int] = {}
    for i, t in enumerate(entries):
        last_child[t.path.rpartition("/")[0]] = i
    is_last = [last_child[t.path.rpartition("/")[0]] == i for i, t in enumerate(entries)]
    out = []
    rails: list[bool] = []  # per depth above: whether that ancestor was the last of its siblings
    for i, t in enumerate(entries):
        depth = t.depth - 1
        del rails[depth:]
        out.append("".join("    " if r else "│   " for r in rails) + ("└── " if is_last[i] else "├── "))
        rails.append(is_last[i])
    return out


def render_file_tree(entries: Sequence[TreeEntry], fmt: str = "table", upto: int | None = None) -> str:
    """``layerfs tree``: the merged tree with mode, owner, size, the layer each entry comes
    from and what layer ``upto`` did to it (A added, C changed, M metadata only, D deleted)."""
    _check_format(fmt, ("table", "json"))
    if fmt == "json":
        return _json({
            "schemaVersion": SCHEMA_VERSION,
            "layer": upto,
            "entries": [
                {"path": t.path, "type": stat.filemode(t.mode)[0].replace("-", "f"), "mode": f"{stat.S_IMODE(t.mode):04o}",
                 "uid": t.uid, "gid": t.gid, "size": t.size, "layer": t.layer, "change": t.mark or None,
                 **({"target": t.target} if t.target else {})}
                for t in entries
            ],
        })
    prefixes = _tree_prefixes(entries)
    rows = [
        (t.mark or " ", stat.filemode(t.mode), f"{t.uid}:{t.gid}", human_size(t.size), str(t.layer),
         prefix + _printable_path(t.name) + (f" -> {_printable_path(t.target)}" if t.target else ""))
        for t, prefix in zip(entries, prefixes, strict=True)
    ]
    return table(("CHANGE", "PERMISSIONS", "UID:GID", "SIZE", "LAYER", "PATH"), rows, right=(3,))


def render_inspect(d: ImageDetails, *, raw: bool = False, config: bool = False) -> str:
    """``layerfs inspect``: skopeo inspect's JSON (Name, Digest, RepoTags, Created,
    DockerVersion, Labels, Architecture, Os, Layers, LayersData, Env) plus the config's run
    settings (Author, Cmd, Entrypoint, WorkingDir, User, ExposedPorts, Volumes, StopSignal),
    the image ID and the diffIDs. ``raw``: the manifest as stored, byte for byte; ``config``:
    the image config (pretty, or as stored with ``raw``), as ``skopeo inspect [--raw] --config``."""
    if config:
        if raw:
            return d.config_bytes.decode("utf-8", "surrogateescape")
        return _json(json.loads(d.config_bytes))
    if raw:
        return d.manifest_bytes.decode("utf-8", "surrogateescape")
    repo = split_reference(d.name)[0]
    created = parse_rfc3339_ns(d.created)
    return _json({
        "schemaVersion": SCHEMA_VERSION,
        "Name": repo,
        "Digest": d.manifest_digest,
        "RepoTags": [split_reference(n)[1] for n in d.repo_tags if split_reference(n)[0] == repo],
        "Names": list(d.repo_tags),
        "Id": d.image_id,
        "Created": rfc3339_nano(created) if created is not None else d.created,
        "DockerVersion": d.docker_version,
        "Labels": d.labels,
        "Architecture": d.architecture,
        "Os": d.os,
        **({"Variant": d.variant} if d.variant else {}),
        "Author": d.author,
        "Layers": [layer.digest for layer in d.layers],
        "LayersData": [
            {"MIMEType": layer.media_type, "Digest": layer.digest, "Size": layer.size,
             "Annotations": layer.annotations}
            for layer in d.layers
        ],
        "DiffIDs": list(d.diff_ids),
        "Env": list(d.env),
        "Cmd": list(d.cmd) if d.cmd is not None else None,
        "Entrypoint": list(d.entrypoint) if d.entrypoint is not None else None,
        "WorkingDir": d.working_dir,
        "User": d.user,
        "ExposedPorts": list(d.exposed_ports),
        "Volumes": list(d.volumes),
        "StopSignal": d.stop_signal,
        "ManifestMediaType": d.manifest_media_type,
    })


def render_comparison(c: ImageComparison, fmt: str = "table") -> str:
    """``layerfs diff REF1 REF2 --type ...``: one section per type (``# file``, ``# size``,
    ``# history``, ``# metadata``); JSON: ``{"schemaVersion", "image1", "image2", "differ",
    "diffs": [{"type", ...}]}`` with ``changes`` (file), ``size1``/``size2`` (size) or ``lines``."""
    _check_format(fmt, ("table", "json"))
    if fmt == "json":
        diffs: list[dict[str, object]] = []
        for t in c.types:
            if t == "file":
                diffs.append({"type": t, "changes": [{"kind": k, "path": p} for k, p in _checked(c.files)]})
            elif t == "size":
                diffs.append({"type": t, "size1": c.sizes[0], "size2": c.sizes[1]})
            else:
                lines = c.history if t == "history" else c.metadata
                diffs.append({"type": t, "lines": [{"side": s, "text": x} for s, x in lines]})
        return _json({"schemaVersion": SCHEMA_VERSION, "image1": c.first, "image2": c.second,
                      "differ": c.differ, "diffs": diffs})
    out = []
    for t in c.types:
        out.append(f"# {t}: {c.first} -> {c.second}\n")
        if t == "file":
            out.append(render_changes(c.files))
        elif t == "size":
            out.append(table(("IMAGE", "SIZE"), [(c.first, human_size(c.sizes[0])), (c.second, human_size(c.sizes[1]))]))
        else:
            lines = c.history if t == "history" else c.metadata
            out.extend(f"{s} {_one_line(x)}\n" for s, x in lines)
    return "".join(out)


def render_df_images(images: Iterable[DfImage], fmt: str = "table", no_trunc: bool = False,
                     now: datetime | None = None) -> str:
    """``docker system df -v``'s image table: REPOSITORY, TAG, IMAGE ID, CREATED, SIZE,
    SHARED SIZE, UNIQUE SIZE, CONTAINERS; newest first."""
    _check_format(fmt, ("table", "json"))
    items = list(images)
    rank = {(i.name, i.image_id): n for n, i in enumerate(_newest_first(
        [ImageInfo(d.name, d.image_id, d.created, ()) for d in items]))}
    items.sort(key=lambda d: rank[(d.name, d.image_id)])
    if fmt == "json":
        return _json([{"name": d.name, "id": d.image_id, "created": _rfc3339(d.created), "size": d.size,
                       "shared_size": d.shared, "unique_size": d.unique, "containers": d.containers}
                      for d in items])
    moment = _now(now)
    rows = [(*split_reference(d.name), _short(d.image_id, no_trunc), _since(d.created, moment), human_size(d.size),
             human_size(d.shared), human_size(d.unique), str(d.containers)) for d in items]
    return table(("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE", "SHARED SIZE", "UNIQUE SIZE", "CONTAINERS"),
                 rows, minwidth=DOCKER_MINWIDTH)
