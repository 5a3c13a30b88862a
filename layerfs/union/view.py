"""Read-only union of layer directories, with kernel overlayfs' lookup rules.

Plain Python over layer directories in the on-disk format of ``layerfs.union.whiteout``; no
pyfuse3, no store. ``layers`` are given top first (like overlayfs' ``lowerdir=``).

Rules (Documentation/filesystems/overlayfs.rst, fs/overlayfs/namei.c):
- a name is looked up from the top layer down; the first layer that has it decides;
- a whiteout (0/0 char device, or a ``.wh.<name>`` file) hides the name in all lower layers;
- a directory merges with same-named directories below it until one is opaque or a lower
  layer has a non-directory (or a whiteout) of that name;
- a directory with a ``redirect`` xattr (written by overlayfs' ``redirect_dir=on`` when a
  merged directory is renamed) continues the lookup in the lower layers at the path it names:
  relative (a sibling name in the same parent) or absolute (from the layer roots);
- a non-directory hides everything below it.

Each layer is only entered through components verified to be real directories of that
layer, so no symlink inside a layer is ever followed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from layerfs.union import whiteout

REDIRECT_XATTRS = (whiteout.TRUSTED_PREFIX + "redirect", whiteout.USER_PREFIX + "redirect")


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


def redirect_of(path: str) -> str | None:
    """The overlayfs redirect xattr of a directory, or None."""
    for name in REDIRECT_XATTRS:
        try:
            return os.getxattr(path, name, follow_symlinks=False).decode("utf-8", "surrogateescape")
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                raise
    return None


class LayerStack:
    """A read-only union view of ``layers`` (top first)."""

    def __init__(self, layers: Sequence[str | os.PathLike[str]]) -> None:
        self.layers = [os.fspath(p) for p in layers]

    def real_path(self, entry: Entry) -> str:
        """The file in its layer that provides ``entry``."""
        base = self.layers[entry.layer]
        return os.path.join(base, entry.lpath) if entry.lpath else base

    def root(self) -> Entry | None:
        contributing: list[tuple[int, str]] = []
        for i, layer in enumerate(self.layers):
            st = os.lstat(layer)
            if not stat.S_ISDIR(st.st_mode):
                continue
            # An opaque marker on a layer root is ignored, as kernel overlayfs ignores it.
            contributing.append((i, ""))
        if not contributing:
            return None
        top = contributing[0][0]
        return Entry("", top, "", os.lstat(self.layers[top]), tuple(contributing))

    def _safe_lstat(self, layer: int, rel: str, verify_parents: bool) -> os.stat_result | None:
        """lstat ``rel`` in a layer. With ``verify_parents`` (an absolute redirect target, not
        reached through verified directories) every parent component must be a real directory."""
        base = self.layers[layer]
        parts = rel.split("/")
        if verify_parents and len(parts) > 1:
            cur = base
            for comp in parts[:-1]:
                cur = os.path.join(cur, comp)
                try:
                    if not stat.S_ISDIR(os.lstat(cur).st_mode):
                        return None
                except (FileNotFoundError, NotADirectoryError):
                    return None
        try:
            return os.lstat(os.path.join(base, rel))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def child(self, parent: Entry, name: str) -> Entry | None:
        """One lookup step below an already resolved directory entry."""
        relpath = _join(parent.path, name)
        found: Entry | None = None
        contributing: list[tuple[int, str]] = []
        candidates = list(parent.dir_layers)
        k = 0
        want: str | None = None  # name to look up in the lower parents after a relative redirect
        absolute: str | None = None  # layer-root-relative path after an absolute redirect
        while k < len(candidates):
            i, ppath = candidates[k]
            k += 1
            rel = absolute if absolute is not None else _join(ppath, want or name)
            full = os.path.join(self.layers[i], rel)
            head, tail = os.path.split(full)
            # a file-style whiteout in this layer hides the name here and below
            if os.path.lexists(os.path.join(head, whiteout.WHITEOUT_PREFIX + tail)):
                break
            st = self._safe_lstat(i, rel, verify_parents=absolute is not None)
            if st is None:
                continue
            if whiteout.is_whiteout_stat(st):
                break
            is_dir = stat.S_ISDIR(st.st_mode)
            if found is None:
                found = Entry(relpath, i, rel, st)
                if not is_dir:
                    return found
            elif not is_dir:
                break  # a lower non-directory under a directory: merge stops here
            contributing.append((i, rel))
            if whiteout.is_opaque(full):
                break
            redirect = redirect_of(full)
            if redirect is not None:
                if redirect.startswith("/"):
                    absolute = redirect.strip("/")
                    root = self.root()
                    candidates = [(j, "") for j, _ in (root.dir_layers if root else ()) if j > i]
                    k = 0
                elif absolute is not None:
                    absolute = _join(os.path.dirname(absolute), redirect)
                else:
                    want = redirect
        if found is None:
            return None
        return Entry(relpath, found.layer, found.lpath, found.st, tuple(contributing))

    def lookup(self, relpath: str) -> Entry | None:
        """The visible entry at ``relpath``, or None. A symlink on the way is not followed:
        a non-directory in a middle component makes the path not found."""
        cur = self.root()
        for name in split_path(relpath):
            if cur is None or not cur.is_dir:
                return None
            if whiteout.is_marker_name(name):
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
        names: set[str] = set()
        for i, lpath in entry.dir_layers:
            base = os.path.join(self.layers[i], lpath) if lpath else self.layers[i]
            for name in os.listdir(base):
                if not whiteout.is_marker_name(name):
                    names.add(name)
        out = {}
        for name in names:
            child = self.child(entry, name)
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
