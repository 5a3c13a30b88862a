"""Overlayfs' lookup walk over a stack of read-only layers, and the caches it runs on.

This is the one implementation of the lookup rules: the FUSE union model (``core``) asks it
for everything below its upper layer, and the read-only view (``view.LayerStack``) for
everything.

Layers read here do not change while indexed, so what is read from them is cached: each
real directory (``LowerDir``) is listed once (names, types, whiteouts, opaque and redirect
markers) and each entry is ``lstat``-ed at most once. A merged directory (``MergedDir``: the
real directories that contribute to one union directory, top first) memoizes its lookups,
and once listed keeps a map "name -> topmost layer that mentions it", so a lookup costs dict
accesses instead of one ``lstat`` per layer (about 6.5 µs per layer in Python, 2.6 ms at 400 layers). Two ways to let
go of what was read: ``forget`` (a walk that is done with a directory) and ``refresh_top``
(the top layer was written since: the view over a layer being extracted into).

The caches are bounded, so a walk of a huge image holds neither one fd nor one listing
per directory: fds live in an ``FdCache`` (LRU; a union's holds ``LAYERFS_FD_CACHE``,
default ``FD_CACHE``), and at most ``dir_capacity`` listed real
directories (``LAYERFS_DIR_CACHE``, default ``DIR_CACHE``) and as many merged directories
keep what was read from them; the least recently used lose it (listing, stats, xattrs,
child directories) and are simply read again when next used, which is correct because
the layers never change while indexed.

Conventions read (every one, whatever the mount writes; names from ``layerfs.union.whiteout``):

- whiteout: a 0/0 character device; a regular file ``.wh.NAME`` (which hides NAME in its
  own layer too); in a directory whose ``*.overlay.opaque`` is ``x``, an empty regular file
  carrying ``*.overlay.whiteout`` (kernel >= 6.7 "xwhiteouts");
- opaque directory: ``*.overlay.opaque=y`` (the trusted one decides when both are set) or a
  ``.wh..wh..opq`` entry inside; other ``.wh.*`` names are markers, never entries;
- redirect (``*.overlay.redirect``) on a directory: relative (a sibling name) or absolute
  (``/a/b`` from the layer roots); a malformed one is ignored.
- layer roots are never opaque, whatever they carry (the kernel never consults them).

The walk follows ``ovl_lookup`` / ``ovl_lookup_layer`` (fs/overlayfs/namei.c): per layer,
the (possibly redirected) path is walked component by component; a whiteout or a
non-directory on the way stops the lookup in all lower layers; an opaque directory stops
it after its own layer (and its redirect is ignored); a redirect rewrites the path used in
the layers below; an absolute redirect continues from the layer roots below the current
layer. Directories are only ever entered with ``O_NOFOLLOW`` relative to their parent's fd.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from layerfs.linux.files import DIR_FLAGS, proc_path
from layerfs.union import whiteout, xattrs
from layerfs.union.whiteout import OPAQUE_NAMES, OPQ, REDIRECT_NAMES, WH, XWHITEOUT_NAMES

DIR_CACHE = 4096  # listed directories (and merged directories) kept by default
DIR_CACHE_ENV = "LAYERFS_DIR_CACHE"


FD_CACHE = 1024  # directory fds a union keeps open by default
# a name looked up in a merged directory past this many layers (or in none of more) makes
# the directory's name -> layer map at once, so lookups in deep stacks stay flat
SCAN_LAYERS = 8
FD_CACHE_ENV = "LAYERFS_FD_CACHE"


def fd_cache_capacity(soft_limit: int) -> int:
    """``$LAYERFS_FD_CACHE`` or ``FD_CACHE``, within a quarter of ``soft_limit`` (RLIMIT_NOFILE;
    the rest stays for open files), and at least 64."""
    value = os.environ.get(FD_CACHE_ENV, "")
    try:
        wanted = int(value) if value else FD_CACHE
    except ValueError:
        wanted = FD_CACHE
    return max(64, min(wanted, (soft_limit if soft_limit > 0 else 1024) // 4))


def dir_cache_capacity() -> int:
    """``$LAYERFS_DIR_CACHE`` (at least 16) or ``DIR_CACHE``."""
    value = os.environ.get(DIR_CACHE_ENV, "")
    try:
        return max(16, int(value)) if value else DIR_CACHE
    except ValueError:
        return DIR_CACHE


def open_dir_chain(base: int, names: Sequence[bytes]) -> int:
    """Open the directory reached from the fd ``base`` through ``names``, one component at a
    time with O_NOFOLLOW. Returns a new fd owned by the caller (-1 when ``names`` is empty);
    ``base`` is never closed. On an error every fd opened on the way is closed."""
    owned = -1
    try:
        for name in names:
            nxt = os.open(name, DIR_FLAGS, dir_fd=base)
            if owned >= 0:
                os.close(owned)
            owned = base = nxt
    except BaseException:
        if owned >= 0:
            os.close(owned)
        raise
    return owned


class FdCache:
    """An LRU of open directory fds, keyed by any hashable object.

    Used only under the model's lock: an fd taken from it is valid until the next call
    that may insert (which can evict the least recently used one), so callers take the
    fds they need right before using them.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(16, capacity)
        self._fds: OrderedDict[object, int] = OrderedDict()

    def get(self, key: object) -> int | None:
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
        return fd

    def put(self, key: object, fd: int) -> None:
        old = self._fds.pop(key, None)
        if old is not None and old != fd:
            os.close(old)
        self._fds[key] = fd
        while len(self._fds) > self.capacity:
            _, victim = self._fds.popitem(last=False)
            os.close(victim)

    def drop(self, key: object) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def drop_where(self, doomed: Callable[[object], bool]) -> None:
        for key in [k for k in self._fds if doomed(k)]:
            self.drop(key)

    def close_all(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


def _split_redirect(value: bytes) -> tuple[tuple[bytes, ...], bool] | None:
    """(components, absolute) of a redirect xattr value, None when it is malformed."""
    if value.startswith(b"/"):
        parts = tuple(value[1:].split(b"/"))
        absolute = True
    else:
        parts = (value,)
        absolute = False
    if not parts or any(p in (b"", b".", b"..") for p in parts):
        return None  # the kernel refuses such a redirect ("invalid redirect")
    return parts, absolute


class LowerDir:
    """One real directory of one layer. What is read is kept (until ``LowerIndex.forget``)."""

    __slots__ = ("layer", "parent", "name", "st", "redirect", "xopaque", "_entries", "_whiteouts",
                 "_opaque", "_stats", "_children", "_xattrs", "_links")

    def __init__(self, layer: int, parent: LowerDir | None, name: bytes, st: os.stat_result,
                 opaque_value: bytes | None, redirect: bytes | None) -> None:
        self.layer = layer
        self.parent = parent
        self.name = name
        self.st = st
        self.redirect = redirect
        # opaque=y: hides lower layers; opaque=x: may hold xwhiteouts (not opaque)
        self.xopaque = opaque_value
        self._entries: dict[bytes, int] | None = None  # name -> S_IFMT
        self._whiteouts: frozenset[bytes] = frozenset()
        self._opaque = opaque_value == b"y"
        self._stats: dict[bytes, os.stat_result] = {}
        self._children: dict[bytes, LowerDir] = {}
        self._xattrs: dict[bytes | None, dict[str, bytes]] = {}
        self._links: dict[bytes, bytes] = {}

    def __repr__(self) -> str:
        return f"LowerDir(layer={self.layer}, name={self.name!r})"


@dataclass(frozen=True, slots=True)
class LowerHit:
    """Where the lowers provide a name: the lower directory holding the topmost entry, its
    type, and for a directory every lower directory that merges into it (top first)."""

    dir: LowerDir
    name: bytes
    kind: int  # stat.S_IFMT bits
    chain: tuple[LowerDir, ...] = ()


class MergedDir:
    """The lower part of one union directory: its contributing lower dirs, top first."""

    __slots__ = ("chain", "first", "memo", "_visible")

    def __init__(self, chain: tuple[LowerDir, ...]) -> None:
        self.chain = chain
        self.first: dict[bytes, int] | None = None  # name -> index in chain of topmost mention
        self.memo: dict[bytes, LowerHit | None] = {}
        self._visible: list[tuple[bytes, int]] | None = None


class LowerIndex:
    """The layers of one stack (top first: a mount's lowers, or a view's layers) and the
    caches over them. Not thread-safe: the model calls it under its lock."""

    def __init__(self, roots: Sequence[str], fds: FdCache, dir_capacity: int | None = None) -> None:
        self.fds = fds
        self.dir_capacity = max(16, dir_capacity) if dir_capacity is not None else dir_cache_capacity()
        self.root_fds: list[int] = []
        self.roots: list[LowerDir] = []
        # LRUs (least recently used first), each at most ``dir_capacity`` long (``_cont`` 4x)
        self._loaded: OrderedDict[LowerDir, None] = OrderedDict()  # real directories listed
        self._merged: OrderedDict[tuple[LowerDir, ...], MergedDir] = OrderedDict()
        # merged directories with a directory of layer 0 (always first): ``refresh_top`` drops them
        self._merged_top: OrderedDict[tuple[LowerDir, ...], MergedDir] = OrderedDict()
        self._cont: OrderedDict[tuple[tuple[LowerDir, ...], tuple[bytes, ...], bool], tuple[LowerDir, ...]] = (
            OrderedDict())
        try:
            for i, path in enumerate(roots):
                fd = os.open(path, DIR_FLAGS)
                self.root_fds.append(fd)
                attrs = xattrs.read_all(fd)
                self.roots.append(LowerDir(i, None, b"", os.fstat(fd), _first(attrs, OPAQUE_NAMES), None))
        except BaseException:
            self.close()
            raise
        # Every layer root merges: kernel overlayfs ignores opaque markers on layer roots
        # (it never looks the roots up), so a layer cannot hide everything below it.
        self.root_chain = tuple(self.roots)

    def close(self) -> None:
        for fd in self.root_fds:
            os.close(fd)
        self.root_fds = []

    def refresh_top(self) -> None:
        """Forget everything read from the top layer (layer 0), which has been written since:
        its directories are read again when next used. What the other layers showed stays
        cached. ``LowerDir``s of layer 0 read before still work, as a picture of then."""
        if not self.roots:
            return
        fd = self.root_fds[0]
        attrs = xattrs.read_all(fd)
        self.roots[0] = LowerDir(0, None, b"", os.fstat(fd), _first(attrs, OPAQUE_NAMES), None)
        self.root_chain = tuple(self.roots)
        self.fds.drop_where(lambda key: isinstance(key, LowerDir) and key.layer == 0)
        # a chain holding a layer-0 directory starts with it; other chains never reach one
        # (an absolute redirect continues in the layers below the one holding it)
        self._merged_top.clear()
        self._cont.clear()

    def forget(self, chain: tuple[LowerDir, ...]) -> None:
        """Drop what was read for the directories of ``chain`` and the merged directory they
        make: listings, stats, xattrs, child directories, fds. Only time is lost: a later use
        reads them again. A walk that is done with a directory calls it, so that it holds
        the directories on its path rather than the whole tree."""
        self._merged_for(chain).pop(chain, None)
        for d in chain:
            self._loaded.pop(d, None)
            self._drop_listing(d)
            if d.parent is not None:
                self.fds.drop(d)

    @staticmethod
    def _drop_listing(d: LowerDir) -> None:
        d._entries = None
        d._whiteouts = frozenset()
        d._stats = {}
        d._children = {}  # made again from the listing (same directories, new objects)
        d._xattrs = {}
        d._links = {}

    # --- real directories ---------------------------------------------------------------

    def fd(self, d: LowerDir) -> int:
        """An open fd of the lower directory ``d`` (cached; see ``FdCache`` for its life)."""
        if d.parent is None:
            return self.root_fds[d.layer]
        fd = self.fds.get(d)
        if fd is not None:
            return fd
        # Open downwards from the nearest ancestor with an fd: no path string ever grows
        # with the depth, and no Python recursion either (trees can be thousands deep).
        path: list[LowerDir] = []
        cur: LowerDir | None = d
        base = -1
        while cur is not None and cur.parent is not None:
            cached = self.fds.get(cur)
            if cached is not None:
                base = cached
                break
            path.append(cur)
            cur = cur.parent
        if base < 0:
            assert cur is not None
            base = self.root_fds[cur.layer]
        owned = open_dir_chain(base, [step.name for step in reversed(path)])
        self.fds.put(d, owned)
        return owned

    def entries(self, d: LowerDir) -> dict[bytes, int]:
        if d._entries is None:
            self._load(d)
        elif d.parent is not None:
            self._loaded.move_to_end(d)
        assert d._entries is not None
        return d._entries

    def whiteouts(self, d: LowerDir) -> frozenset[bytes]:
        if d._entries is None:
            self._load(d)
        return d._whiteouts

    def opaque(self, d: LowerDir) -> bool:
        if d._entries is None:
            self._load(d)  # the .wh..wh..opq marker is an entry of the directory
        return d._opaque

    def _load(self, d: LowerDir) -> None:
        fd = self.fd(d)
        entries: dict[bytes, int] = {}
        gone: set[bytes] = set()
        for ent in scan(fd):
            name = ent.name
            if ent.is_dir(follow_symlinks=False):
                kind = stat.S_IFDIR
            elif ent.is_file(follow_symlinks=False):
                kind = stat.S_IFREG
            elif ent.is_symlink():
                kind = stat.S_IFLNK
            else:
                st = ent.stat(follow_symlinks=False)
                d._stats[name] = st
                if whiteout.is_whiteout_stat(st):
                    gone.add(name)
                    continue
                kind = stat.S_IFMT(st.st_mode)
            if name.startswith(WH):
                if name == OPQ:
                    d._opaque = True
                elif kind == stat.S_IFREG and len(name) > len(WH):
                    gone.add(name[len(WH):])
                continue  # markers are never entries
            entries[name] = kind
        if d.xopaque == b"x":
            for name, kind in list(entries.items()):
                if kind == stat.S_IFREG and self._is_xwhiteout(d, fd, name):
                    gone.add(name)
        for name in gone:
            entries.pop(name, None)
        d._whiteouts = frozenset(gone)
        d._entries = entries
        if d.parent is not None:  # layer roots stay listed (few, and every walk starts there)
            self._loaded[d] = None
            while len(self._loaded) > self.dir_capacity:
                victim, _ = self._loaded.popitem(last=False)
                self._drop_listing(victim)

    def _is_xwhiteout(self, d: LowerDir, fd: int, name: bytes) -> bool:
        if self.stat(d, name).st_size != 0:
            return False
        path = proc_path(fd, name)
        return any(xattrs.get(path, n) is not None for n in XWHITEOUT_NAMES)

    def stat(self, d: LowerDir, name: bytes) -> os.stat_result:
        st = d._stats.get(name)
        if st is None:
            st = d._stats[name] = os.stat(name, dir_fd=self.fd(d), follow_symlinks=False)
        return st

    def readlink(self, d: LowerDir, name: bytes) -> bytes:
        target = d._links.get(name)
        if target is None:
            target = d._links[name] = os.readlink(name, dir_fd=self.fd(d))
        return target

    def xattrs(self, d: LowerDir, name: bytes | None) -> dict[str, bytes]:
        """Stored xattrs of the entry ``name`` of ``d`` (of ``d`` itself for None), cached."""
        got = d._xattrs.get(name)
        if got is None:
            if name is None:
                got = xattrs.read_all(self.fd(d))
            else:
                got = xattrs.read_all(proc_path(self.fd(d), name))
            d._xattrs[name] = got
        return got

    def child_dir(self, d: LowerDir, name: bytes) -> LowerDir:
        """The lower directory ``name`` inside ``d`` (which must list it as a directory)."""
        child = d._children.get(name)
        if child is None:
            # opened now: it is listed right after (opaque markers, lookups below it)
            fd = os.open(name, DIR_FLAGS, dir_fd=self.fd(d))
            try:
                st = d._stats[name] = os.fstat(fd)
                attrs = d._xattrs[name] = xattrs.read_all(fd)
            except BaseException:
                os.close(fd)
                raise
            child = LowerDir(d.layer, d, name, st, _first(attrs, OPAQUE_NAMES), _first(attrs, REDIRECT_NAMES))
            d._children[name] = child
            self.fds.put(child, fd)
        return child

    # --- merged lower directories -------------------------------------------------------

    def _merged_for(self, chain: tuple[LowerDir, ...]) -> OrderedDict[tuple[LowerDir, ...], MergedDir]:
        return self._merged_top if chain and chain[0].layer == 0 else self._merged

    def merged(self, chain: tuple[LowerDir, ...]) -> MergedDir:
        cache = self._merged_for(chain)
        m = cache.get(chain)
        if m is None:
            m = cache[chain] = MergedDir(chain)
            while len(cache) > self.dir_capacity:
                cache.popitem(last=False)
        else:
            cache.move_to_end(chain)
        return m

    def _topmost(self, m: MergedDir, name: bytes) -> int | None:
        """The index in ``m.chain`` of the topmost directory that has or hides ``name``."""
        if m.first is not None:
            return m.first.get(name)
        found: int | None = None
        for k, d in enumerate(m.chain):  # no map yet: a scan lists no more layers than needed
            if name in self.entries(d) or name in d._whiteouts:
                found = k
                break
        if len(m.chain) > SCAN_LAYERS and (found is None or found >= SCAN_LAYERS):
            # a deep scan: the next name would walk as far again (each lookup O(layers));
            # one map of the whole chain answers every later name at once
            self._first_map(m)
        return found

    def _first_map(self, m: MergedDir) -> dict[bytes, int]:
        if m.first is None:
            first: dict[bytes, int] = {}
            for k in range(len(m.chain) - 1, -1, -1):  # bottom up: upper layers overwrite
                d = m.chain[k]
                for name in self.entries(d):
                    first[name] = k
                for name in d._whiteouts:
                    first[name] = k
            m.first = first
        return m.first

    def visible(self, m: MergedDir) -> list[tuple[bytes, int]]:
        """(name, index into the chain of the directory providing it) of every visible entry."""
        if m._visible is None:
            first = self._first_map(m)
            m._visible = [(n, k) for n, k in first.items() if n in self.entries(m.chain[k])]
        return m._visible

    def lookup(self, chain: tuple[LowerDir, ...], name: bytes) -> LowerHit | None:
        """What the lowers show for ``name`` in the union directory whose lower part is
        ``chain`` (no upper entry in the way)."""
        if not chain:
            return None
        m = self.merged(chain)
        try:
            return m.memo[name]
        except KeyError:
            pass
        k = self._topmost(m, name)
        if k is None:
            return None  # in no layer: not memoized (misses are unbounded)
        hit = None
        d = chain[k]
        kind = d._entries.get(name) if d._entries is not None else None
        if kind is not None and kind != stat.S_IFDIR and name not in d._whiteouts:
            hit = LowerHit(d, name, kind)  # the walk's answer for a non-directory, directly
        else:
            # layers above k neither have nor hide the name: starting at k is the same walk
            found = self._walk(chain[k:], (name,), False, None)
            if isinstance(found, LowerHit):
                hit = found
        m.memo[name] = hit
        return hit

    def continue_dir(self, parent_chain: tuple[LowerDir, ...], name: bytes, redirect: bytes | None) -> tuple[LowerDir, ...]:
        """The lower directories that merge into an upper directory ``name`` (not opaque) of
        a union directory with lower part ``parent_chain``; ``redirect`` is its redirect xattr."""
        path: tuple[bytes, ...] = (name,)
        absolute = False
        if redirect is not None:
            parsed = _split_redirect(redirect)
            if parsed is not None:
                path, absolute = parsed
        cands = self.root_chain if absolute else parent_chain
        if not cands:
            return ()
        key = (cands, path, absolute)
        got = self._cont.get(key)
        if got is None:
            found = self._walk(cands, path, absolute, ())
            got = found if isinstance(found, tuple) else ()
            self._cont[key] = got
            while len(self._cont) > 4 * self.dir_capacity:
                self._cont.popitem(last=False)
        else:
            self._cont.move_to_end(key)
        return got

    def _walk(self, cands: tuple[LowerDir, ...], path: tuple[bytes, ...], absolute: bool,
              above: tuple[LowerDir, ...] | None) -> LowerHit | tuple[LowerDir, ...] | None:
        """The per-layer walk of ``ovl_lookup``. ``above`` is None when nothing was found
        above these layers (the result is then a ``LowerHit`` or None), or the chain found so
        far for a directory (the result is then the complete chain)."""
        contrib: list[LowerDir] = list(above) if above is not None else []
        is_dir = above is not None
        top: tuple[LowerDir, bytes] | None = None  # (parent lower dir, name) of the topmost hit
        on_roots = cands is self.root_chain
        k = 0
        while k < len(cands):
            base = cands[k]
            k += 1
            cur = base
            stop = False
            new_path = path
            reached = True
            for i, comp in enumerate(path):
                last = i == len(path) - 1
                entries = self.entries(cur)
                if comp in cur._whiteouts:
                    stop, reached = True, False
                    break
                kind = entries.get(comp)
                if kind is None:
                    reached = False
                    break
                if kind != stat.S_IFDIR:
                    if is_dir or not last:
                        stop, reached = True, False
                        break
                    return LowerHit(cur, comp, kind)  # a non-directory ends every lookup
                parent = cur
                cur = self.child_dir(cur, comp)
                if last and top is None:
                    top = (parent, comp)
                if self.opaque(cur):
                    stop = True  # ... after this layer; an opaque dir's redirect is ignored
                    continue
                if cur.redirect is not None:
                    parsed = _split_redirect(cur.redirect)
                    if parsed is not None:
                        parts, is_abs = parsed
                        if is_abs:
                            new_path = parts + path[i + 1:]
                            absolute = True
                            stop = False  # an absolute redirect below an opaque one wins
                        else:
                            new_path = new_path[:i] + parts + path[i + 1:]
            if reached:
                contrib.append(cur)
                is_dir = True
            if stop:
                break
            path = new_path
            if absolute and not on_roots:
                # ovl_lookup: after an absolute redirect, continue on the root's layers
                cands = tuple(r for r in self.root_chain if r.layer > base.layer)
                on_roots = True
                k = 0
        if above is not None:
            return tuple(contrib)
        if not contrib or top is None:
            return None
        return LowerHit(top[0], top[1], stat.S_IFDIR, tuple(contrib))


def scan(dir_fd: int) -> Iterator[os.DirEntry[bytes]]:
    """``os.scandir`` of an open directory, with bytes names and d_type. Through its
    ``/proc/self/fd`` name: ``os.scandir(fd)`` costs several times more per call here."""
    with os.scandir(proc_path(dir_fd)) as it:
        yield from it


def _first(attrs: dict[str, bytes], names: Sequence[str]) -> bytes | None:
    for n in names:
        v = attrs.get(n)
        if v is not None:
            return v
    return None
