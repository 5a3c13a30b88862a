"""Read-only union of layer directories, with kernel overlayfs' lookup rules.

Plain Python over layer directories in the on-disk format of ``layerfs.whiteout``; no
pyfuse3, no store. ``layers`` are given top first (like overlayfs' ``lowerdir=``).

Rules (Documentation/filesystems/overlayfs.rst):
- a name is looked up from the top layer down; the first layer that has it decides;
- a whiteout (0/0 char device, or a ``.wh.<name>`` file) hides the name in all lower layers;
- a directory merges with same-named directories below it until one is opaque or a lower
  layer has a non-directory (or a whiteout) of that name;
- a non-directory hides everything below it.

Each directory is only entered through components already verified to be real directories
of that layer, so no symlink inside a layer is ever followed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .. import whiteout


@dataclass(frozen=True)
class Entry:
    """A visible entry: where it comes from and what it is."""

    path: str  # relative path in the union, '' for the root
    layer: int  # index into the stack (0 = top) of the layer that provides it
    st: os.stat_result
    # for directories: indices of every layer that contributes children, top first
    dir_layers: tuple[int, ...] = field(default=())

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


def split_path(relpath: str) -> list[str]:
    parts = [p for p in relpath.split("/") if p and p != "."]
    if any(p == ".." for p in parts):
        raise ValueError(f"path escapes the union root: {relpath!r}")
    return parts


class LayerStack:
    """A read-only union view of ``layers`` (top first)."""

    def __init__(self, layers: Sequence[str | os.PathLike[str]]) -> None:
        self.layers = [os.fspath(p) for p in layers]

    def root(self) -> Entry | None:
        contributing = []
        for i, layer in enumerate(self.layers):
            st = os.lstat(layer)
            if not stat.S_ISDIR(st.st_mode):
                continue
            contributing.append(i)
            if whiteout.is_opaque(layer):
                break
        if not contributing:
            return None
        return Entry("", contributing[0], os.lstat(self.layers[contributing[0]]), tuple(contributing))

    def child(self, parent: Entry, name: str) -> Entry | None:
        """One lookup step below an already resolved directory entry."""
        return self._child(parent, name)

    def _child(self, parent: Entry, name: str) -> Entry | None:
        relpath = f"{parent.path}/{name}" if parent.path else name
        found: Entry | None = None
        contributing: list[int] = []
        for i in parent.dir_layers:
            base = os.path.join(self.layers[i], parent.path) if parent.path else self.layers[i]
            # file-style whiteout in this layer hides the name here and below
            if os.path.lexists(os.path.join(base, whiteout.WHITEOUT_PREFIX + name)):
                break
            try:
                st = os.lstat(os.path.join(base, name))
            except FileNotFoundError:
                continue
            except NotADirectoryError:
                continue
            if whiteout.is_whiteout_stat(st):
                break
            if found is None:
                found = Entry(relpath, i, st)
                if not stat.S_ISDIR(st.st_mode):
                    return found
            elif not stat.S_ISDIR(st.st_mode):
                break  # a lower non-directory under a directory: merge stops here
            contributing.append(i)
            if whiteout.is_opaque(os.path.join(base, name)):
                break
        if found is None:
            return None
        return Entry(relpath, found.layer, found.st, tuple(contributing))

    def lookup(self, relpath: str) -> Entry | None:
        """The visible entry at ``relpath``, or None. A symlink on the way is not followed:
        a non-directory in a middle component makes the path not found."""
        cur = self.root()
        for name in split_path(relpath):
            if cur is None or not cur.is_dir:
                return None
            if whiteout.is_marker_name(name):
                return None
            cur = self._child(cur, name)
        return cur

    def lookup_parents(self, relpath: str) -> Iterator[Entry | None]:
        """Yield the visible entry for every proper prefix of ``relpath`` (shortest first),
        stopping after the first one that is missing or not a directory."""
        cur = self.root()
        for name in split_path(relpath)[:-1]:
            if cur is None or not cur.is_dir:
                return
            cur = self._child(cur, name)
            yield cur
            if cur is None or not cur.is_dir:
                return

    def listdir(self, entry: Entry) -> dict[str, Entry]:
        """Merged children of a directory entry, name -> Entry (unsorted)."""
        names: set[str] = set()
        for i in entry.dir_layers:
            base = os.path.join(self.layers[i], entry.path) if entry.path else self.layers[i]
            for name in os.listdir(base):
                if not whiteout.is_marker_name(name):
                    names.add(name)
        out = {}
        for name in names:
            child = self._child(entry, name)
            if child is not None:
                out[name] = child
        return out

    def walk(self, entry: Entry | None = None) -> Iterator[Entry]:
        """Every visible entry below ``entry`` (default: the root) in path order (a directory
        before its children, siblings sorted by name). The root itself is not yielded."""
        start = entry if entry is not None else self.root()
        if start is None:
            return
        children = self.listdir(start)
        for name in sorted(children):
            child = children[name]
            yield child
            if child.is_dir:
                yield from self.walk(child)
