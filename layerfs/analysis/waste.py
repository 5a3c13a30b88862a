"""What each layer of an image costs, and which of its bytes the image never shows.

The accounting is of file content as the image carries it (the bytes of regular files in
each layer; a layer tar adds only headers around them), and it is exact:

- a layer's bytes are its regular files, each inode once: hardlinked names cost one copy;
- a file is *visible* when the merged tree (``LayerStack``, the one overlay lookup walk)
  shows it; every other byte of every layer is *wasted*: overwritten by a later layer,
  deleted by a whiteout of it or of any directory above it, or hidden by an opaque
  directory. A hardlinked inode is wasted only when none of its names is visible;
- a change of metadata only (chmod, chown, xattrs) costs a full copy in a tar layer: such a
  file is counted with its whole size, as ``metadata_only`` bytes of the layer that re-adds it,
  and the copy below it is wasted;
- a renamed directory is, in an image, the old path deleted and the new one added whole
  (OCI has no rename; ``layerfs commit`` writes it so): the old copies are wasted and
  show up as duplicates of the new ones;
- *duplicates* are distinct inodes with the same content (size, then xxh3-128, as
  ``layer.changes.fingerprint`` hashes), in any layers and at any paths.

Scores: ``efficiency`` = visible bytes / all bytes (1.0 for an empty image);
``user_wasted_ratio`` = wasted bytes / bytes of the layers above the base layer (as dive's
``highestUserWastedPercent``, a ratio between 0 and 1; 0 when there are no such bytes).

CI rules (``Rules``) are dive's: ``lowestEfficiency`` fails when the efficiency is below it,
``highestWastedBytes`` and ``highestUserWastedPercent`` when the value is above; a rule set
reads from a ``.dive-ci`` file (``read_rules``).
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from layerfs import catalog
from layerfs.errors import InvalidArgument
from layerfs.layer import changes
from layerfs.store import Image, Store
from layerfs.text import parse_size
from layerfs.union import whiteout
from layerfs.union.view import LayerStack

# what became of a file of a layer
VISIBLE = "visible"
OVERWRITTEN = "overwritten"
DELETED = "deleted"


@dataclass(frozen=True)
class LayerCost:
    """One layer: what it carries and what of it the image shows. Bytes are file content."""

    index: int  # 1-based, bottom layer = 1 (as ``layerfs diff`` numbers them)
    chain_id: str
    diff_id: str
    created_by: str
    files: int  # regular files (inodes: hardlinked names once)
    bytes: int  # their content
    added_bytes: int  # files at paths new in this layer
    replaced_bytes: int  # files replacing a lower entry with other content
    metadata_only_bytes: int  # files re-added with the same content (chmod, chown): full copies
    wasted_bytes: int  # of ``bytes``, what later layers overwrite or delete
    overwrites_bytes: int  # lower layers' bytes this layer overwrites
    deletes_bytes: int  # lower layers' bytes this layer deletes (whiteouts, opaque dirs)
    deleted_paths: int  # paths it deletes (D in ``layerfs diff``)


@dataclass(frozen=True)
class Occurrence:
    """One copy of a path: in which layer, how big, and what became of it."""

    layer: int  # 1-based
    size: int
    fate: str  # visible, overwritten, deleted
    by_layer: int | None = None  # the layer that overwrote or deleted it
    metadata_only: bool = False  # this copy re-adds the content of the one below


@dataclass(frozen=True)
class Offender:
    """A path some of whose copies are wasted (dive's "Count  Total Space  Path")."""

    path: str  # absolute-style, /usr/share/doc/x
    count: int  # layers that carry a file at this path
    total_bytes: int
    wasted_bytes: int
    occurrences: tuple[Occurrence, ...]  # bottom layer first


@dataclass(frozen=True, order=True)
class Copy:
    layer: int  # 1-based
    path: str  # absolute-style
    visible: bool


@dataclass(frozen=True)
class Duplicate:
    """Distinct files with the same content; ``wasted_bytes``: all copies but one."""

    fingerprint: str  # xxh3-128 hex
    size: int
    copies: tuple[Copy, ...]  # by layer, then path

    @property
    def wasted_bytes(self) -> int:
        return self.size * (len(self.copies) - 1)


@dataclass(frozen=True)
class Analysis:
    name: str
    image_id: str
    layers: tuple[LayerCost, ...]  # bottom first
    visible_bytes: int
    offenders: tuple[Offender, ...]  # most wasted bytes first
    duplicates: tuple[Duplicate, ...]  # most wasted bytes first
    visible_files: int = 0
    paths: int = 0  # entries of the merged tree

    @property
    def total_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def wasted_bytes(self) -> int:
        return self.total_bytes - self.visible_bytes

    @property
    def user_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers[1:])

    @property
    def efficiency(self) -> float:
        total = self.total_bytes
        return 1.0 if total == 0 else self.visible_bytes / total

    @property
    def user_wasted_ratio(self) -> float:
        user = self.user_bytes
        return 0.0 if user == 0 else self.wasted_bytes / user

    @property
    def duplicate_bytes(self) -> int:
        return sum(d.wasted_bytes for d in self.duplicates)

    @property
    def metadata_only_bytes(self) -> int:
        return sum(layer.metadata_only_bytes for layer in self.layers)

    def wasted_by_directory(self, depth: int = 3) -> list[tuple[str, int, int]]:
        """(directory, wasted bytes, wasted copies) for the directories ``depth`` levels down
        (or a file's parent when it is shallower), most wasted first: where the waste lives
        (a layer that re-adds every doc file shows as ``/usr/share/doc``)."""
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for o in self.offenders:
            parts = o.path.split("/")[1:-1]
            where = "/" + "/".join(parts[:depth])
            for x in o.occurrences:
                if x.fate != VISIBLE:
                    totals[where][0] += x.size
                    totals[where][1] += 1
        return sorted(((d, b, n) for d, (b, n) in totals.items()), key=lambda t: (-t[1], t[0]))


# --- reading one layer ----------------------------------------------------------------------


@dataclass
class _Inode:
    layer: int  # 0-based, bottom first
    key: tuple[int, int]  # (st_dev, st_ino)
    size: int
    names: list[str] = field(default_factory=list)  # union paths without the leading '/', sorted

    @property
    def path(self) -> str:
        return self.names[0]


@dataclass
class _Layer:
    inodes: dict[tuple[int, int], _Inode] = field(default_factory=dict)
    is_dir: dict[str, bool] = field(default_factory=dict)  # every entry but markers -> is a directory
    changes: dict[str, str] = field(default_factory=dict)  # path -> A/C/D against the layers below


def _read_layer(layer: int, layer_dir: str) -> _Layer:
    """The entries of one layer directory (whiteouts and markers are not entries)."""
    out = _Layer()
    todo = [("", layer_dir)]
    while todo:
        rel, real = todo.pop()
        with os.scandir(real) as it:
            items = list(it)
        for item in items:
            st = item.stat(follow_symlinks=False)
            name = item.name
            if whiteout.whiteout_target(name, st) is not None or whiteout.is_marker_name(name):
                continue
            path = f"{rel}/{name}" if rel else name
            is_dir = stat.S_ISDIR(st.st_mode)
            out.is_dir[path] = is_dir
            if is_dir:
                todo.append((path, item.path))
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                inode = out.inodes.get(key)
                if inode is None:
                    inode = out.inodes[key] = _Inode(layer, key, st.st_size)
                inode.names.append(path)
    for inode in out.inodes.values():
        inode.names.sort()
    return out


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _hidden_by(layers: Sequence[_Layer], inode: _Inode) -> tuple[int, str] | None:
    """The lowest layer above ``inode``'s that hides its first name, and how (A/C/D logic of
    ``layer_changes``: the path itself changed or deleted, or a directory above it deleted or
    replaced by a non-directory)."""
    path = inode.path
    for k in range(inode.layer + 1, len(layers)):
        ch = layers[k].changes
        kind = ch.get("/" + path)
        if kind in (changes.CHANGED, changes.DELETED):
            return k, OVERWRITTEN if kind == changes.CHANGED else DELETED
        for a in _ancestors(path):
            akind = ch.get("/" + a)
            if akind == changes.DELETED:
                return k, DELETED
            if akind == changes.CHANGED and layers[k].is_dir.get(a) is False:
                return k, DELETED
    return None


# --- the analysis ---------------------------------------------------------------------------


def analyze(store: Store, img: Image) -> Analysis:
    """The analysis of a stored image."""
    info = catalog.image_info(store, img)
    dirs = list(reversed(store.layer_dirs(img.top_chain_id)))  # bottom first
    return analyze_dirs(dirs, info.layers, name=img.name, image_id=img.config_digest)


def analyze_dirs(dirs: Sequence[str], infos: Sequence[catalog.LayerInfo] = (), *, name: str = "",
                 image_id: str = "") -> Analysis:
    """The analysis of layer directories ``dirs`` (bottom first, the store's on-disk format);
    ``infos``: the layers' records (ids, created_by), when known."""
    layers = [_read_layer(i, d) for i, d in enumerate(dirs)]
    for i, layer in enumerate(layers):
        lowers = list(reversed(dirs[:i]))
        layer.changes = {c.path: c.kind for c in changes.layer_changes(dirs[i], lowers)}

    visible: set[tuple[int, int]] = set()
    paths = 0
    with LayerStack(list(reversed(dirs))) as merged:
        for entry in merged.walk():
            paths += 1
            if stat.S_ISREG(entry.st.st_mode):
                visible.add((entry.st.st_dev, entry.st.st_ino))

    hashes: dict[tuple[int, int], str] = {}

    def fingerprint(real: str, key: tuple[int, int]) -> str:
        if key not in hashes:
            hashes[key] = changes.fingerprint(real)
        return hashes[key]

    # metadata-only re-adds: a changed file whose content is the one below it
    metadata_only: set[tuple[int, int]] = set()
    for i, layer in enumerate(layers):
        candidates = [n for n in layer.inodes.values() if layer.changes.get("/" + n.path) == changes.CHANGED]
        if not candidates or i == 0:
            continue
        with LayerStack(list(reversed(dirs[:i]))) as below:
            for inode in candidates:
                lower = below.lookup(inode.path)
                if lower is None or not stat.S_ISREG(lower.st.st_mode) or lower.st.st_size != inode.size:
                    continue
                mine = fingerprint(os.path.join(dirs[i], inode.path), inode.key)
                if fingerprint(below.real_path(lower), (lower.st.st_dev, lower.st.st_ino)) == mine:
                    metadata_only.add(inode.key)

    # the fate of every inode
    fates: dict[tuple[int, int], tuple[str, int | None]] = {}
    overwrites = [0] * len(layers)
    deletes = [0] * len(layers)
    for layer in layers:
        for inode in layer.inodes.values():
            if inode.key in visible:
                fates[inode.key] = (VISIBLE, None)
                continue
            hit = _hidden_by(layers, inode)
            by, how = (None, DELETED) if hit is None else hit
            fates[inode.key] = (how, by)
            if by is not None:
                (overwrites if how == OVERWRITTEN else deletes)[by] += inode.size

    costs = []
    for i, layer in enumerate(layers):
        rec = infos[i] if i < len(infos) else None
        added = replaced = meta = wasted = 0
        for inode in layer.inodes.values():
            if inode.key in metadata_only:
                meta += inode.size
            elif layer.changes.get("/" + inode.path) == changes.CHANGED:
                replaced += inode.size
            else:
                added += inode.size
            if fates[inode.key][0] != VISIBLE:
                wasted += inode.size
        costs.append(LayerCost(
            index=i + 1,
            chain_id=rec.chain_id if rec else "",
            diff_id=rec.diff_id if rec else "",
            created_by=rec.created_by if rec else "",
            files=len(layer.inodes),
            bytes=sum(n.size for n in layer.inodes.values()),
            added_bytes=added,
            replaced_bytes=replaced,
            metadata_only_bytes=meta,
            wasted_bytes=wasted,
            overwrites_bytes=overwrites[i],
            deletes_bytes=deletes[i],
            deleted_paths=sum(1 for k in layer.changes.values() if k == changes.DELETED),
        ))

    offenders = _offenders(layers, fates, metadata_only)
    duplicates = _duplicates(layers, dirs, visible, fingerprint)
    visible_inodes = [n for layer in layers for n in layer.inodes.values() if n.key in visible]
    return Analysis(
        name=name,
        image_id=image_id,
        layers=tuple(costs),
        visible_bytes=sum(n.size for n in visible_inodes),
        offenders=offenders,
        duplicates=duplicates,
        visible_files=len(visible_inodes),
        paths=paths,
    )


def _offenders(layers: Sequence[_Layer], fates: dict[tuple[int, int], tuple[str, int | None]],
               metadata_only: set[tuple[int, int]]) -> tuple[Offender, ...]:
    by_path: dict[str, list[Occurrence]] = defaultdict(list)
    for layer in layers:
        for inode in layer.inodes.values():
            fate, by = fates[inode.key]
            by_path[inode.path].append(Occurrence(
                layer=inode.layer + 1, size=inode.size, fate=fate, by_layer=None if by is None else by + 1,
                metadata_only=inode.key in metadata_only))
    out = []
    for path, occ in by_path.items():
        wasted = sum(o.size for o in occ if o.fate != VISIBLE)
        if wasted == 0:
            continue
        occ.sort(key=lambda o: o.layer)
        out.append(Offender("/" + path, len(occ), sum(o.size for o in occ), wasted, tuple(occ)))
    out.sort(key=lambda o: (-o.wasted_bytes, o.path))
    return tuple(out)


def _duplicates(layers: Sequence[_Layer], dirs: Sequence[str], visible: set[tuple[int, int]],
                fingerprint: Callable[[str, tuple[int, int]], str]) -> tuple[Duplicate, ...]:
    by_size: dict[int, list[_Inode]] = defaultdict(list)
    for layer in layers:
        for inode in layer.inodes.values():
            if inode.size > 0:
                by_size[inode.size].append(inode)
    out = []
    for size, inodes in by_size.items():
        if len(inodes) < 2:
            continue
        groups: dict[str, list[_Inode]] = defaultdict(list)
        for inode in inodes:
            groups[fingerprint(os.path.join(dirs[inode.layer], inode.path), inode.key)].append(inode)
        for digest, same in groups.items():
            if len(same) < 2:
                continue
            copies = sorted(Copy(n.layer + 1, "/" + n.path, n.key in visible) for n in same)
            out.append(Duplicate(digest, size, tuple(copies)))
    out.sort(key=lambda d: (-d.wasted_bytes, d.copies[0].path))
    return tuple(out)


# --- CI rules -------------------------------------------------------------------------------

PASS = "pass"
FAIL = "fail"
SKIP = "skip"


@dataclass(frozen=True)
class Rules:
    """dive's CI rules; None disables one."""

    lowest_efficiency: float | None = None  # ratio 0..1
    highest_wasted_bytes: int | None = None
    highest_user_wasted_ratio: float | None = None  # ratio 0..1 (dive: highestUserWastedPercent)
    disabled: frozenset[str] = frozenset()  # attributes turned off explicitly ("disabled" in a file)

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.lowest_efficiency, self.highest_wasted_bytes,
                                           self.highest_user_wasted_ratio))

    def merged(self, other: Rules) -> Rules:
        """These rules, with ``other``'s where it sets or disables one (a file over the
        defaults, the command line over a file)."""
        def pick(attr: str) -> object:
            if attr in other.disabled:
                return None
            mine, theirs = getattr(self, attr), getattr(other, attr)
            return theirs if theirs is not None else mine

        return Rules(pick("lowest_efficiency"), pick("highest_wasted_bytes"),  # type: ignore[arg-type]
                     pick("highest_user_wasted_ratio"),  # type: ignore[arg-type]
                     (self.disabled | other.disabled))


@dataclass(frozen=True)
class RuleResult:
    rule: str  # dive's name: lowestEfficiency, highestWastedBytes, highestUserWastedPercent
    status: str  # pass, fail, skip
    value: float
    threshold: float | None


def check_rules(analysis: Analysis, rules: Rules) -> list[RuleResult]:
    out = []

    def one(rule: str, value: float, threshold: float | None, failed: bool) -> None:
        status = SKIP if threshold is None else FAIL if failed else PASS
        out.append(RuleResult(rule, status, value, threshold))

    eff, wasted, user = analysis.efficiency, analysis.wasted_bytes, analysis.user_wasted_ratio
    one("lowestEfficiency", eff, rules.lowest_efficiency,
        rules.lowest_efficiency is not None and eff < rules.lowest_efficiency)
    one("highestWastedBytes", wasted, rules.highest_wasted_bytes,
        rules.highest_wasted_bytes is not None and wasted > rules.highest_wasted_bytes)
    one("highestUserWastedPercent", user, rules.highest_user_wasted_ratio,
        rules.highest_user_wasted_ratio is not None and user > rules.highest_user_wasted_ratio)
    return out


def ratio(value: str, what: str) -> float:
    """A ratio between 0 and 1 (``0.95``; ``95%`` is read as 0.95 too)."""
    text = value.strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise InvalidArgument(f"{what}: {value!r} is not a ratio between 0 and 1") from None
    if not 0 <= number <= 1:
        raise InvalidArgument(f"{what}: {value!r} is not a ratio between 0 and 1")
    return number


def size_limit(value: str, what: str) -> int:
    try:
        return parse_size(value)
    except ValueError:
        raise InvalidArgument(f"{what}: {value!r} is not a size (like 20MB, 512KiB or 1000)") from None


_RULE_KEYS = {"lowestefficiency": "lowest_efficiency", "highestwastedbytes": "highest_wasted_bytes",
              "highestuserwastedpercent": "highest_user_wasted_ratio"}


def read_rules(text: str, where: str) -> Rules:
    """dive's ``.dive-ci`` (a YAML mapping ``rules:`` of the three keys; a value ``disabled``
    turns a rule off). Only that shape is read: anything else names the line it is on."""
    values: dict[str, float | int | None] = {}
    disabled: set[str] = set()
    in_rules = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        key, sep, value = line.strip().partition(":")
        value = value.strip().strip("'\"")
        if not sep:
            raise InvalidArgument(f"{where}:{lineno}: expected 'key: value', got {raw.strip()!r}")
        if not line.startswith((" ", "\t")):
            if key != "rules" or value:
                raise InvalidArgument(f"{where}:{lineno}: expected 'rules:', got {raw.strip()!r}")
            in_rules = True
            continue
        attr = _RULE_KEYS.get(key.lower())
        if not in_rules or attr is None:
            raise InvalidArgument(f"{where}:{lineno}: unknown rule {key!r} (known: lowestEfficiency, "
                                  "highestWastedBytes, highestUserWastedPercent)")
        what = f"{where}:{lineno}: {key}"
        if value.lower() in ("disabled", ""):
            values[attr] = None
            disabled.add(attr)
        elif attr == "highest_wasted_bytes":
            values[attr] = size_limit(value, what)
        else:
            values[attr] = ratio(value, what)
    return Rules(**values, disabled=frozenset(disabled))  # type: ignore[arg-type]
