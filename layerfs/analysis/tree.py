"""The merged file tree of an image up to one of its layers: sizes, the layer each entry comes
from, and what that layer did to it.

``image_tree(dirs, upto)`` walks the union of the layers ``1..upto`` (``LayerStack``, the one
overlay lookup walk) in path order and marks each entry with what layer ``upto`` did,
from ``layer.changes.layer_changes``:

- ``A`` added, ``C`` changed (content, type or target; a directory: made opaque, or its mode,
  owner, mtime or xattrs changed), ``M`` a file or symlink re-added with the content it had
  below (chmod, chown, xattrs, or an identical copy: still a full copy in a tar layer),
- ``D`` deleted: the entry as the layers below showed it, which is no longer in the tree;
- ``""`` for an entry that layer did not touch.

A directory's size is the content of the regular files below it, each inode once (for a
deleted directory: what it held).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from layerfs.layer import changes
from layerfs.union.view import Entry, LayerStack

ADDED, CHANGED, METADATA, DELETED = "A", "C", "M", "D"


@dataclass(frozen=True)
class TreeEntry:
    path: str  # absolute-style: /etc/passwd
    mode: int  # st_mode (type and permission bits)
    uid: int
    gid: int
    size: int  # a file's size; a directory's: the files below it (inodes once)
    layer: int  # 1-based index of the layer that provides it (bottom = 1)
    mark: str = ""  # A, C, M, D or "" (see the module docstring)
    target: str = ""  # a symlink's target
    inode: tuple[int, int] = field(default=(0, 0), compare=False, repr=False)  # (st_dev, st_ino)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def depth(self) -> int:
        return self.path.count("/")

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


def _entry(stack: LayerStack, e: Entry, nlayers: int, mark: str) -> TreeEntry:
    target = os.readlink(stack.real_path(e)) if stat.S_ISLNK(e.st.st_mode) else ""
    size = e.st.st_size if stat.S_ISREG(e.st.st_mode) else 0
    return TreeEntry("/" + e.path, e.st.st_mode, e.st.st_uid, e.st.st_gid, size, nlayers - e.layer, mark, target,
                     (e.st.st_dev, e.st.st_ino))


def _same_content(a: LayerStack, ea: Entry, b: LayerStack, eb: Entry) -> bool:
    if not (stat.S_ISREG(ea.st.st_mode) and stat.S_ISREG(eb.st.st_mode)):
        if stat.S_ISLNK(ea.st.st_mode) and stat.S_ISLNK(eb.st.st_mode):
            return os.readlink(a.real_path(ea)) == os.readlink(b.real_path(eb))
        return False
    if ea.st.st_size != eb.st.st_size:
        return False
    return changes.fingerprint(a.real_path(ea)) == changes.fingerprint(b.real_path(eb))


def image_tree(dirs: Sequence[str], upto: int | None = None, *, changes_only: bool = False) -> list[TreeEntry]:
    """The tree of layers ``dirs[:upto]`` (``dirs`` bottom first, ``upto`` 1-based, default
    all) in path order, with the marks of layer ``upto``. ``changes_only``: only the entries it
    marked, and the directories on their way."""
    n = len(dirs) if upto is None else upto
    if not 0 <= n <= len(dirs):
        raise ValueError(f"layer {upto} out of range 1..{len(dirs)}")
    if n == 0:
        return []
    top, lowers = dirs[n - 1], list(reversed(dirs[: n - 1]))
    marks = {c.path: c.kind for c in changes.layer_changes(top, lowers)}
    out: list[TreeEntry] = []
    with LayerStack([top, *lowers]) as merged, LayerStack(lowers) as below:
        for e in merged.walk():
            mark = marks.pop("/" + e.path, "")
            if mark == changes.CHANGED:
                lower = below.lookup(e.path)
                if lower is not None and not e.is_dir and stat.S_IFMT(lower.st.st_mode) == stat.S_IFMT(e.st.st_mode) \
                        and _same_content(merged, e, below, lower):
                    mark = METADATA
            out.append(_entry(merged, e, n, mark))
        # what is left is deleted: show it as it was below
        for path, kind in marks.items():
            if kind != changes.DELETED:
                continue
            lower = below.lookup(path.lstrip("/"))
            if lower is not None:
                gone = replace(_entry(below, lower, n - 1, DELETED), path=path)
                if lower.is_dir:  # what it held: files below it, each inode once
                    files = {(e.st.st_dev, e.st.st_ino): e.st.st_size for e in below.walk(lower)
                             if stat.S_ISREG(e.st.st_mode)}
                    gone = replace(gone, size=sum(files.values()))
                out.append(gone)
    out.sort(key=lambda t: t.path.split("/"))
    out = _with_dir_sizes(out)
    if changes_only:
        keep: set[str] = set()
        for t in out:
            if t.mark:
                p = t.path
                while p and p not in keep:
                    keep.add(p)
                    p = p.rpartition("/")[0]
        out = [t for t in out if t.path in keep]
    return out


def _with_dir_sizes(entries: list[TreeEntry]) -> list[TreeEntry]:
    """Directory sizes: the files below each, a hardlinked inode once (deleted ones do not count)."""
    totals: dict[str, int] = {}
    seen: dict[tuple[int, int], set[str]] = {}  # inode -> directories it was counted in
    for t in entries:
        if t.is_dir or t.mark == DELETED or t.size == 0:
            continue
        counted = seen.setdefault(t.inode, set())
        p = t.path.rpartition("/")[0]
        while True:
            if p not in counted:
                counted.add(p)
                totals[p] = totals.get(p, 0) + t.size
            if not p:
                break
            p = p.rpartition("/")[0]
    return [replace(t, size=totals.get(t.path, 0)) if t.is_dir and t.mark != DELETED else t for t in entries]
