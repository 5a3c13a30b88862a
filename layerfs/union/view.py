"""A read-only union of layer directories (``LayerStack``): the lookup walk of
``layerfs.union.dirindex``, seen through path strings.

For the store's readers: the changes of a layer against its lowers, the layer tar of an
upper with redirected directories, tree diffs, bundles, and the extraction of a layer over
its lowers. ``layers`` are given top first (like overlayfs' ``lowerdir=``), each a directory
in the on-disk format of ``layerfs.union.whiteout`` (a layer whose root is not a directory
contributes nothing). The rules are kernel overlayfs' (Documentation/filesystems/
overlayfs.rst, fs/overlayfs/namei.c) and are implemented once, in ``dirindex``:

- a name is looked up from the top layer down; the first layer that has it decides;
- a whiteout (0/0 char device, a ``.wh.<name>`` file, an xwhiteout) hides the name in all
  lower layers;
- a directory merges with same-named directories below it until one is opaque or a lower
  layer has a non-directory (or a whiteout) of that name; layer roots are never opaque;
- a directory with a ``redirect`` xattr (written by overlayfs' ``redirect_dir=on`` when a
  merged directory is renamed) continues the lookup in the lower layers at the path it names:
  relative (a sibling name in the same parent) or absolute (from the layer roots);
- a non-directory hides everything below it.

Each layer is only entered through directory fds opened one component at a time with
``O_NOFOLLOW``, so no symlink inside a layer is ever followed.

What this module adds to ``dirindex``: str paths, ``Entry`` records (where a visible entry
comes from, and its ``lstat``), a walk in path order, and the life of what is read:

- **fds**: a view holds its layer roots and an LRU of at most ``FD_CACHE`` directory fds (a
  directory out of it is reopened from its nearest open ancestor). They are opened at the
  first query and closed by ``close()``, at the end of a ``with`` block, or when the view is
  garbage collected.
- **caching**: a view reads each directory once and keeps what it read, as if its layers did
  not change: after changing a layer, make a new view. Except with ``top_changes=True``, for
  a top layer written while the view is consulted (``layerfs.layer.apply`` checks the layer
  it extracts into against its lowers): what was read from the top layer is dropped each
  time a query starts from the root again (``root``, ``lookup``, ``lookup_parents``,
  ``walk()``); the lower layers stay cached. ``child``, ``listdir`` and ``walk(entry)``
  continue the reading that produced their entry.
- **memory**: ``walk`` forgets a directory once it has yielded everything below it, so a
  walk of a big tree holds the directories on its current path, not the tree.

A view is for one thread at a time.
"""

from __future__ import annotations

import os
import stat
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from layerfs.union import whiteout
from layerfs.union.dirindex import FdCache, LowerDir, LowerHit, LowerIndex

FD_CACHE = 64  # directory fds a view keeps open besides its layer roots


@dataclass(frozen=True)
class Entry:
    """A visible entry: where it comes from and what it is."""

    path: str  # relative path in the union, '' for the root
    layer: int  # index into the stack (0 = top) of the layer that provides it
    lpath: str  # its path inside that layer (differs from ``path`` below a redirect)
    st: os.stat_result
    # for directories: (layer index, path inside that layer) of every layer that
    # contributes children, top first
    dir_layers: tuple[tuple[int, str], ...] = field(default=())
    # for directories: those layers' real directories, as ``dirindex`` knows them
    chain: tuple[LowerDir, ...] = field(default=(), repr=False, compare=False)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


def split_path(relpath: str) -> list[str]:
    parts = [p for p in relpath.split("/") if p and p != "."]
    if any(p == ".." for p in parts):
        raise ValueError(f"path escapes the union root: {relpath!r}")
    return parts


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def _lpath(d: LowerDir) -> str:
    """The path of the real directory ``d`` inside its layer ('' for the root)."""
    names: list[bytes] = []
    cur: LowerDir | None = d
    while cur is not None and cur.parent is not None:
        names.append(cur.name)
        cur = cur.parent
    return os.fsdecode(b"/".join(reversed(names)))


def _close(index: LowerIndex, fds: FdCache) -> None:
    index.close()
    fds.close_all()


class LayerStack:
    """A read-only union view of ``layers`` (top first). ``top_changes``: the top layer is
    being written while the view is used (see the module docstring)."""

    def __init__(self, layers: Sequence[str | os.PathLike[str]], *, top_changes: bool = False) -> None:
        self.layers = [os.fspath(p) for p in layers]
        self.top_changes = top_changes
        self._index: LowerIndex | None = None
        self._layer_of: list[int] = []  # dirindex's layer number -> index into self.layers
        self._finalizer: weakref.finalize[[LowerIndex, FdCache], LayerStack] | None = None

    # --- resources ----------------------------------------------------------------------

    def _open(self) -> LowerIndex:
        if self._index is None:
            dirs = [i for i, path in enumerate(self.layers) if stat.S_ISDIR(os.lstat(path).st_mode)]
            fds = FdCache(FD_CACHE)
            index = LowerIndex([self.layers[i] for i in dirs], fds)
            self._index, self._layer_of = index, dirs
            self._finalizer = weakref.finalize(self, _close, index, fds)
        return self._index

    def close(self) -> None:
        """Close the view's fds. Entries it returned are no use to it afterwards."""
        if self._finalizer is not None:
            self._finalizer()
        self._index, self._finalizer = None, None

    def __enter__(self) -> LayerStack:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- entries ------------------------------------------------------------------------

    def real_path(self, entry: Entry) -> str:
        """The file in its layer that provides ``entry``."""
        base = self.layers[entry.layer]
        return os.path.join(base, entry.lpath) if entry.lpath else base

    def _dir_layers(self, chain: tuple[LowerDir, ...]) -> tuple[tuple[int, str], ...]:
        return tuple((self._layer_of[d.layer], _lpath(d)) for d in chain)

    def _entry(self, index: LowerIndex, path: str, hit: LowerHit, parent_lpath: str | None = None) -> Entry:
        """The entry for what ``dirindex`` found; ``parent_lpath``: ``_lpath(hit.dir)`` if known."""
        if hit.kind == stat.S_IFDIR:
            top = hit.chain[0]
            return Entry(path, self._layer_of[top.layer], _lpath(top), top.st, self._dir_layers(hit.chain), hit.chain)
        lparent = _lpath(hit.dir) if parent_lpath is None else parent_lpath
        return Entry(path, self._layer_of[hit.dir.layer], _join(lparent, os.fsdecode(hit.name)),
                     index.stat(hit.dir, hit.name))

    def root(self) -> Entry | None:
        """The union's root (None when no layer is a directory). Every layer merges into it:
        an opaque marker on a layer root is ignored, as kernel overlayfs ignores it."""
        index = self._open()
        if self.top_changes:
            index.refresh_top()
        if not index.roots:
            return None
        chain = index.root_chain
        return Entry("", self._layer_of[0], "", chain[0].st, self._dir_layers(chain), chain)

    def child(self, parent: Entry, name: str) -> Entry | None:
        """One lookup step below an already resolved directory entry."""
        if whiteout.is_marker_name(name):
            return None
        index = self._open()
        hit = index.lookup(parent.chain, os.fsencode(name))
        return None if hit is None else self._entry(index, _join(parent.path, name), hit)

    def lookup(self, relpath: str) -> Entry | None:
        """The visible entry at ``relpath``, or None. A symlink on the way is not followed:
        a non-directory in a middle component makes the path not found."""
        cur = self.root()
        for name in split_path(relpath):
            if cur is None or not cur.is_dir:
                return None
            cur = self.child(cur, name)
        return cur

    def lookup_parents(self, relpath: str) -> Iterator[Entry | None]:
        """Yield the visible entry for every proper prefix of ``relpath`` (shortest first),
        stopping after the first one that is missing or not a directory."""
        cur = self.root()
        for name in split_path(relpath)[:-1]:
            if cur is None or not cur.is_dir:
                return
            cur = self.child(cur, name)
            yield cur
            if cur is None or not cur.is_dir:
                return

    def listdir(self, entry: Entry) -> dict[str, Entry]:
        """Merged children of a directory entry, name -> Entry (unsorted)."""
        if not entry.chain:
            return {}
        index = self._open()
        lpaths: dict[LowerDir, str] = {}  # the children of one directory share a few parents
        out: dict[str, Entry] = {}
        for bname, _ in index.visible(index.merged(entry.chain)):
            hit = index.lookup(entry.chain, bname)
            if hit is None:
                continue
            lparent = lpaths.get(hit.dir)
            if lparent is None:
                lparent = lpaths[hit.dir] = _lpath(hit.dir)
            name = os.fsdecode(bname)
            out[name] = self._entry(index, _join(entry.path, name), hit, lparent)
        return out

    def walk(self, entry: Entry | None = None) -> Iterator[Entry]:
        """Every visible entry below ``entry`` (default: the root) in path order (a directory
        before its children, siblings sorted by name). The root itself is not yielded."""
        start = entry if entry is not None else self.root()
        if start is None:
            return
        index = self._open()
        # the directories being walked, outermost first: (entry, its children not yet done)
        todo: list[tuple[Entry, Iterator[Entry]]] = [(start, self._sorted_children(start))]
        while todo:
            parent, children = todo[-1]
            child = next(children, None)
            if child is None:
                todo.pop()
                index.forget(parent.chain)  # done below it: drop what was read for it
                continue
            yield child
            if child.is_dir:
                todo.append((child, self._sorted_children(child)))

    def _sorted_children(self, entry: Entry) -> Iterator[Entry]:
        children = self.listdir(entry)
        return iter([children[name] for name in sorted(children)])
