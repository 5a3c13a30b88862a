"""The state of a union mount and the steps every operation is built from.

``UnionCore`` holds the layers (a ``LowerIndex`` over the lowers, an ``Upper`` writer),
the inode table, the open handles and the lock, and knows how to: find a child of a union
directory (upper first, then the cached lower index), reach the real directory behind a
node as an fd, compute attributes, and copy a node up. ``layerfs.union.fs.UnionFS`` turns
these into the operations of ``layerfs.union.api.UnionOps``.

Locking: one ``threading.Lock`` guards all metadata (nodes, caches, the upper's namespace).
Public operations take it once; helpers here assume it is held. Data I/O on open handles
(read/write/fsync) runs without it, on the handle's own fd. A copy-up of a large file
releases it while the data is copied (the node is marked ``busy``; anything that would
move, replace or copy that node waits on ``self._cond``) and the operation that asked for
the copy-up starts over, since the tree may have changed meanwhile.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from layerfs.linux.files import DIR_FLAGS, RENAME_NOREPLACE, proc_path, renameat2
from layerfs.union import copyup, whiteout, xattrs
from layerfs.union.api import ROOT_INODE, Attr
from layerfs.union.dirindex import (
    FdCache,
    LowerDir,
    LowerHit,
    LowerIndex,
    fd_cache_capacity,
    open_dir_chain,
    scan,
)
from layerfs.union.inodes import InodeTable, Node, origin_name, read_origin
from layerfs.union.upper import Upper
from layerfs.union.whiteout import (
    OPAQUE_NAMES,
    OPQ,
    REDIRECT_NAMES,
    TRUSTED_PREFIX,
    USER_PREFIX,
    WH,
    LayerFormat,
)

NAME_MAX = 255
# copy-ups of more data than this release the lock while the data moves
UNLOCKED_COPY_BYTES = 1 << 20


def oserror(err: int, what: str, name: bytes | None = None) -> OSError:
    return OSError(err, f"{os.strerror(err)}: {what}", None if name is None else os.fsdecode(name))


@dataclass
class FileHandle:
    node: Node
    fd: int
    writable: bool
    upper: bool  # the fd is the upper file (else the lower one, reopened after a copy-up)
    gen: int  # node.gen when the fd was opened
    stale: list[int] = field(default_factory=list)  # replaced fds, closed on release


@dataclass
class DirHandle:
    node: Node
    names: list[bytes]  # the merged listing, snapshotted at opendir; offsets index it
    upper_names: set[bytes]  # what the upper directory held then (entries and whiteouts)
    gen: int  # UnionCore._gen at opendir: while unchanged, upper_names is still true
    pinned: set[Node] = field(default_factory=set)  # nodes readdir returned, kept till release
    served: bool = False  # whether readdir returned anything yet (offset 0 again = rewinddir)


class UnionCore:
    # whether ``flush`` has work to do: data goes straight to the real file, so no (an
    # adapter may then tell the kernel not to send FLUSH at close: FOPEN_NOFLUSH)
    flush_needed = False

    def __init__(self, lowers: Sequence[str], upper: str | None = None, work: str | None = None,
                 fmt: LayerFormat | None = None, volatile: bool = False) -> None:
        if isinstance(lowers, str | bytes):
            raise TypeError("lowers is a sequence of layer directories, top first")
        if not lowers and upper is None:
            raise ValueError("a union needs at least one layer")
        if (upper is None) != (work is None):
            raise ValueError("upper and work come together (the workdir must be on the upper's filesystem)")
        self.fmt = fmt if fmt is not None else whiteout.default_format()
        # overlayfs' ``volatile``: fsync of upper files is skipped (the data reaches the disk
        # with the writeback the kernel does anyway); a crash may lose recent writes
        self.volatile = volatile
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        # one fd per cached directory, bounded (LRU): see ``dirindex.fd_cache_capacity``
        self._fds = FdCache(fd_cache_capacity(soft))
        self._lowers = LowerIndex(list(lowers), self._fds)
        self._upper: Upper | None = None
        try:
            if upper is not None and work is not None:
                self._upper = Upper(upper, work, self.fmt)
        except BaseException:
            self._lowers.close()
            raise
        primary = os.fstat(self._upper.root_fd) if self._upper else self._lowers.roots[0].st
        self._lower_dev = self._lowers.roots[0].st.st_dev if self._lowers.roots else primary.st_dev
        self._origin_xattr = origin_name(self._upper.prefix) if self._upper else ""
        self._xnames = xattrs.Names(USER_PREFIX if self.fmt.userxattr else TRUSTED_PREFIX)
        self._table = InodeTable(primary.st_dev, self._forget_node)
        root = Node(stat.S_IFDIR, None, b"")
        root.number = ROOT_INODE
        root.nlookup = 1  # the kernel's reference to the root is never forgotten
        root.upper = self._upper is not None
        root.chain = self._lowers.root_chain  # an opaque marker on the upper root counts neither
        self._table.nodes[ROOT_INODE] = root
        self._root = root
        self._fhs: dict[int, FileHandle] = {}
        self._dhs: dict[int, DirHandle] = {}
        self._next_handle = 1
        self._closed = False
        self._gen = 0  # bumped by every change to the upper layer
        self._invalidations: list[int] = []  # see UnionFS.drain_invalidations
        self._aliases: dict[int, dict[tuple[int, int], list[tuple[bytes, ...]]]] = {}  # _alias_paths

    # --- plumbing -----------------------------------------------------------------------

    def _writable(self) -> Upper:
        """The upper layer, for an operation about to change it (EROFS without one)."""
        if self._upper is None:
            raise oserror(errno.EROFS, "read-only union (no upper layer)")
        self._gen += 1  # readdir's "not in the upper" hints taken before now are void
        return self._upper

    def _handle_id(self) -> int:
        h = self._next_handle
        self._next_handle += 1
        return h

    def _forget_node(self, node: Node) -> None:
        if node.is_dir:
            self._fds.drop(node)

    def _node(self, inode: int) -> Node:
        return self._table.get(inode)

    def _dir(self, inode: int) -> Node:
        node = self._table.get(inode)
        if not node.is_dir:
            raise oserror(errno.ENOTDIR, "not a directory")
        if node.dead:
            raise oserror(errno.ENOENT, "directory was removed")
        return node

    @staticmethod
    def _check_name(name: bytes, creating: bool = False) -> None:
        if len(name) > NAME_MAX:
            raise oserror(errno.ENAMETOOLONG, "name longer than NAME_MAX (255 bytes)", name[:64])
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise oserror(errno.EINVAL, "not a valid name", name)
        if creating and name.startswith(WH):
            # .wh.* names are whiteout markers in every layer format layerfs reads
            raise oserror(errno.EINVAL, "names starting with .wh. are reserved for whiteouts", name)

    def _upper_fd(self, node: Node) -> int:
        """An fd of the upper directory behind the directory ``node`` (which is upper)."""
        assert self._upper is not None and node.upper
        if node is self._root:
            return self._upper.root_fd
        fd = self._fds.get(node)
        if fd is not None:
            return fd
        # walk down from the nearest ancestor with an fd: never a long path, never recursion
        path: list[Node] = []
        cur: Node | None = node
        base = -1
        while cur is not None and cur is not self._root:
            cached = self._fds.get(cur)
            if cached is not None:
                base = cached
                break
            path.append(cur)
            cur = cur.parent
        if base < 0:
            base = self._upper.root_fd
        owned = open_dir_chain(base, [step.name for step in reversed(path)])
        self._fds.put(node, owned)
        return owned

    def _at(self, node: Node) -> tuple[int, bytes | None]:
        """(dir fd, name) naming the upper entry of ``node``; name None: the fd is the entry
        itself (the root, or an unlinked file reached through one of its open handles)."""
        if node is self._root:
            assert self._upper is not None
            return self._upper.root_fd, None
        parent = node.parent
        if parent is None or node.dead:
            for h in node.handles:
                handle = self._fhs.get(h)
                if handle is not None and handle.upper:
                    return handle.fd, None
            if node.indexed and not node.dead and self._upper is not None:
                # every upper name went, names still lower remain (see _hold_unlinked)
                return self._upper.index_fd, self._index_name(node.number)
            raise oserror(errno.ENOENT, "the file has no name left")
        return self._upper_fd(parent), node.name

    def _xattr_target(self, node: Node) -> xattrs.Target:
        """Where the xattrs of an upper node are read and written (see ``xattrs.Target``)."""
        fd, name = self._at(node)
        return fd if name is None else proc_path(fd, name)

    # --- resolution ---------------------------------------------------------------------

    def _child(self, parent: Node, name: bytes, not_upper: bool = False) -> Node | None:
        """The node of the visible entry ``name`` of the directory ``parent``, or None.
        ``not_upper``: the caller knows the upper holds nothing at ``name``."""
        node = parent.children.get(name)
        if node is not None:
            return node
        node = self._resolve(parent, name, not_upper)
        if node is not None:
            parent.children[name] = node
        return node

    def _resolve(self, parent: Node, name: bytes, not_upper: bool = False) -> Node | None:
        if name.startswith(WH):
            return None  # markers are never entries
        if parent.upper and self._upper is not None and not not_upper:
            pfd = self._upper_fd(parent)
            if self._upper_has_markers(parent, pfd) and len(name) + len(WH) <= NAME_MAX:
                if _lexists(pfd, WH + name):
                    return None  # a .wh.NAME file hides NAME in its own layer too
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None:
                if whiteout.is_whiteout_stat(st):
                    return None
                if stat.S_ISDIR(st.st_mode):
                    return self._upper_dir_node(parent, name, pfd, st)
                return self._upper_file_node(parent, name, pfd, st)
        hit = self._lowers.lookup(parent.chain, name)
        return None if hit is None else self._lower_node(parent, name, hit)

    def _upper_has_markers(self, node: Node, fd: int) -> bool:
        """Whether the upper directory of ``node`` may hold ``.wh.*`` files (scanned once;
        this model only adds them with file whiteouts, and then sets the flag)."""
        if node.upper_wh is None:
            node.upper_wh = any(e.name.startswith(WH) for e in scan(fd))
        return node.upper_wh

    @staticmethod
    def _dir_opaque(path: bytes, attrs: dict[str, bytes]) -> bool:
        if any(attrs.get(n) == b"y" for n in OPAQUE_NAMES):
            return True
        return _lexists_path(path + b"/" + OPQ)

    def _upper_dir_node(self, parent: Node, name: bytes, pfd: int, st: os.stat_result) -> Node:
        path = proc_path(pfd, name)
        attrs = xattrs.read_all(path)
        node = Node(stat.S_IFDIR, parent, name)
        node.upper = True
        node.opaque = self._dir_opaque(path, attrs)
        node.redirect = next((attrs[n] for n in REDIRECT_NAMES if n in attrs), None)
        if not node.opaque:
            node.chain = self._lowers.continue_dir(parent.chain, name, node.redirect)
        top = node.chain[0].st if node.chain else st
        self._table.register(node, self._table.number_for(top.st_dev, top.st_ino))
        return node

    def _upper_file_node(self, parent: Node, name: bytes, pfd: int, st: os.stat_result) -> Node:
        key = (st.st_dev, st.st_ino)
        node = self._table.by_backing.get(key)
        if node is not None and not node.dead:
            node.add_link(parent, name)  # another name of a hardlinked upper file
            return node
        node = Node(stat.S_IFMT(st.st_mode), parent, name)
        node.upper = True
        node.backing = key
        origin = read_origin(proc_path(pfd, name), self._table, self._lower_dev)
        if origin is not None and st.st_nlink > 1 and self._upper is not None:
            try:
                ist = os.stat(self._index_name(origin), dir_fd=self._upper.index_fd, follow_symlinks=False)
                node.indexed = (ist.st_dev, ist.st_ino) == key
            except FileNotFoundError:
                pass
        self._table.register(node, origin if origin is not None else self._table.number_for(*key))
        return node

    def _lower_node(self, parent: Node, name: bytes, hit: LowerHit) -> Node:
        if hit.kind == stat.S_IFDIR:
            node = Node(stat.S_IFDIR, parent, name)
            node.lower = hit
            node.chain = hit.chain
            top = hit.chain[0].st
            self._table.register(node, self._table.number_for(top.st_dev, top.st_ino))
            return node
        # Every name of a lower hardlink is one node (kernel overlayfs with index=on hashes
        # such a file by its lower inode too): one st_ino, and copy-up keeps them one file.
        st = self._lowers.stat(hit.dir, hit.name)
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1:
            known = self._table.by_lower.get(key)
            # (an upper one only while _link_aliases links its names: lower_key still set)
            if known is not None and not known.dead and known.lower_key is not None:
                known.add_link(parent, name)
                return known
            linked = self._link_from_index(parent, name, key)
            if linked is not None:
                return linked
        node = Node(hit.kind, parent, name)
        node.lower = hit
        if st.st_nlink > 1:
            node.lower_key = key
        self._table.register(node, self._table.number_for(*key))
        return node

    def _list(self, node: Node, upper_names: set[bytes] | None = None) -> list[bytes]:
        """The merged listing of a directory: its upper entries, then what the lowers show
        that the upper neither has nor hides. ``upper_names`` collects every name the upper
        directory holds (entries and whiteouts)."""
        if node.dead:
            return []
        names: list[bytes] = []
        hidden: set[bytes] = set()
        if node.upper:
            file_whiteouts: set[bytes] = set()
            for ent in scan(self._upper_fd(node)):
                name = ent.name
                if name.startswith(WH):
                    if name != OPQ and ent.is_file(follow_symlinks=False):
                        file_whiteouts.add(name[len(WH):])
                    continue
                hidden.add(name)
                if ent.is_dir(follow_symlinks=False) or ent.is_file(follow_symlinks=False) or ent.is_symlink():
                    names.append(name)
                elif not whiteout.is_whiteout_stat(ent.stat(follow_symlinks=False)):
                    names.append(name)
            if file_whiteouts:
                names = [n for n in names if n not in file_whiteouts]
                hidden |= file_whiteouts
            if upper_names is not None:
                upper_names |= hidden
        if node.chain:
            names.extend(n for n, _ in self._lowers.visible(self._lowers.merged(node.chain)) if n not in hidden)
        return names

    def _lower_positive(self, parent: Node, name: bytes) -> bool:
        """Whether a lower layer shows ``name`` in ``parent`` (kernel: ovl_lower_positive):
        removing or moving the upper entry must then leave a whiteout."""
        return self._lowers.lookup(parent.chain, name) is not None

    def _refuse_existing(self, parent: Node, name: bytes) -> None:
        existing = self._child(parent, name)
        if existing is not None:
            self._done_with(existing)
            raise oserror(errno.EEXIST, "already exists", name)

    def _done_with(self, *nodes: Node | None) -> None:
        """Drop nodes an operation resolved for itself if nothing else holds them."""
        for node in nodes:
            if node is not None:
                self._table.maybe_drop(node)

    # --- attributes ---------------------------------------------------------------------

    def _stat(self, node: Node) -> os.stat_result:
        if node.upper:
            fd, name = self._at(node)
            return os.fstat(fd) if name is None else os.stat(name, dir_fd=fd, follow_symlinks=False)
        if node.is_dir:
            return node.chain[0].st if node.chain else self._lowers.roots[0].st
        assert node.lower is not None
        return self._lowers.stat(node.lower.dir, node.lower.name)

    def _attr(self, node: Node) -> Attr:
        if node is self._root and not node.upper:
            st = self._lowers.roots[0].st
        else:
            st = self._stat(node)
        nlink = st.st_nlink  # an unlinked file: its real file's count (0 if it was upper)
        if node.indexed and nlink > 0:
            nlink -= 1  # not the index's link
        if node.is_dir and not node.dead and node.merged:
            nlink = 1  # as the kernel: a merged directory's link count is unknown
        return Attr(node.number, st.st_mode, nlink, st.st_uid, st.st_gid, st.st_rdev, st.st_size,
                    st.st_blocks, st.st_blksize, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
                    immutable=self._immutable(node))

    def _immutable(self, node: Node) -> bool:
        """Whether nothing can change what ``_attr`` reports for ``node`` while mounted.

        Lower-only files change only through requests on themselves. A lower-only directory
        is copied up as a side effect of changes below it: one served by a single layer then
        becomes merged and its link count turns to 1, so it is not immutable in a writable
        union; one merging several layers keeps nlink 1 (its size and ctime follow the upper
        copy: ``drain_invalidations`` names those inodes)."""
        if node.upper or node.dead:
            return False
        return not node.is_dir or self._upper is None or len(node.chain) > 1

    def _lower_xattrs(self, node: Node) -> dict[str, bytes]:
        if node.is_dir:
            d = node.chain[0] if node.chain else self._lowers.roots[0]
            return self._lowers.xattrs(d, None) if d.parent is None else self._lowers.xattrs(d.parent, d.name)
        assert node.lower is not None
        return self._lowers.xattrs(node.lower.dir, node.lower.name)

    # --- copy-up ------------------------------------------------------------------------

    def _wait_idle(self, *nodes: Node | None) -> bool:
        """Wait until no node is being copied up; True if the lock was released meanwhile."""
        waited = False
        for node in nodes:
            while node is not None and node.busy:
                self._cond.wait()
                waited = True
        return waited

    def _copy_up_dirs(self, node: Node) -> None:
        """Copy up the directory ``node`` and every ancestor not yet in the upper."""
        missing: list[Node] = []
        cur: Node | None = node
        while cur is not None and not cur.upper:
            missing.append(cur)
            cur = cur.parent
        for d in reversed(missing):
            self._copy_up_dir(d)

    def _copy_up_dir(self, node: Node) -> None:
        upper = self._writable()
        src: LowerDir = node.chain[0]
        assert src.parent is not None
        attrs = self._lowers.xattrs(src.parent, src.name)
        pfd = self._upper_fd(node.parent) if node.parent is not None else upper.root_fd
        tmp = upper.tmp_name()
        os.mkdir(tmp, 0o700, dir_fd=upper.work_fd)
        try:
            fd = os.open(tmp, DIR_FLAGS, dir_fd=upper.work_fd)
            try:
                copyup.apply_meta_fd(fd, src.st, attrs, self._xnames)
                renameat2(upper.work_fd, tmp, pfd, node.name, RENAME_NOREPLACE)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            os.rmdir(tmp, dir_fd=upper.work_fd)
            raise
        node.upper = True
        node.upper_wh = False
        self._gen += 1
        self._invalidations.append(node.number)  # its attributes changed behind the kernel
        self._fds.put(node, fd)

    def _ensure_upper(self, node: Node, truncate: int | None = None) -> bool:
        """Copy ``node`` (and its parents) up unless it is there. ``truncate``: only that
        many bytes of data are needed (O_TRUNC, truncate). Returns True when the lock was
        released meanwhile: the caller must then start over."""
        if self._wait_idle(node):
            return True
        if node.upper:
            return False
        if node.dead or node.parent is None:
            raise oserror(errno.ENOENT, "cannot copy up a file that has no name left")
        parent = node.parent
        self._copy_up_dirs(parent)
        if node.is_dir:
            self._copy_up_dir(node)
            return False
        return self._copy_up_file(node, parent, truncate)

    def _copy_up_file(self, node: Node, parent: Node, truncate: int | None) -> bool:
        upper = self._writable()
        hit = node.lower
        assert hit is not None
        st = self._lowers.stat(hit.dir, hit.name)
        attrs = self._lowers.xattrs(hit.dir, hit.name)
        # The copy keeps the node's number across remounts (a lower hardlink's too: every
        # name of it is linked to this copy below, so all carry the same record).
        private = {self._origin_xattr: str(node.number).encode()}
        tmp = upper.tmp_name()
        released = False
        try:
            if stat.S_ISREG(st.st_mode):
                released = self._copy_regular(node, hit, st, attrs, private, tmp, truncate)
            else:
                target = self._lowers.readlink(hit.dir, hit.name) if stat.S_ISLNK(st.st_mode) else None
                copyup.make_special(upper.work_fd, tmp, st, target)
                copyup.apply_meta_at(upper.work_fd, tmp, st, attrs, self._xnames, private)
            # the parent may have moved while the lock was released: find its fd again
            renameat2(upper.work_fd, tmp, self._upper_fd(node.parent or parent), node.name, RENAME_NOREPLACE)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=upper.work_fd)
            except FileNotFoundError:
                pass
            raise
        self._table.unbind_backing(node)
        ust = os.stat(node.name, dir_fd=self._upper_fd(node.parent or parent), follow_symlinks=False)
        node.backing = (ust.st_dev, ust.st_ino)
        self._table.by_backing[node.backing] = node
        node.upper = True
        node.gen += 1
        self._gen += 1  # also after the lock was released: a listing taken meanwhile is stale
        if node.lower_key is not None:
            self._link_aliases(node, hit, st.st_nlink)
        return released

    @staticmethod
    def _index_name(number: int) -> bytes:
        return b"%d" % number  # the copy's number, as in its origin record

    @staticmethod
    def _held_name(number: int, k: int) -> bytes:
        return b"%d.%d" % (number, k)

    def _held_links(self, number: int) -> list[bytes]:
        """The index's extra links of the copy ``number``: one per name of the lower
        hardlink that still shows the lower file (see ``_hold_unlinked``), densely numbered."""
        assert self._upper is not None
        names: list[bytes] = []
        while _lexists(self._upper.index_fd, self._held_name(number, len(names))):
            names.append(self._held_name(number, len(names)))
        return names

    def _hold_unlinked(self, node: Node, lower_nlink: int) -> None:
        """After a copy-up linked what it could reach: hold one more index link for every
        name of the lower inode not linked in the upper (below a directory renamed before
        the copy-up, not looked up since; or hidden by a lower layer), so the copy's link
        count stays the lower one, as kernel overlayfs with index=on reports it ("L+0"),
        in this mount and after a remount. ``_link_from_index`` gives one back for every
        such name it links later."""
        assert self._upper is not None
        if not node.indexed:
            return  # no index link to count against (one existed already, not this file's)
        fd, name = self._at(node)
        real = os.stat(name, dir_fd=fd, follow_symlinks=False) if name is not None else os.fstat(fd)
        have = len(self._held_links(node.number))
        upper_names = real.st_nlink - 1 - have
        for k in range(have, lower_nlink - upper_names):
            os.link(self._index_name(node.number), self._held_name(node.number, k),
                    src_dir_fd=self._upper.index_fd, dst_dir_fd=self._upper.index_fd, follow_symlinks=False)

    def _link_from_index(self, parent: Node, name: bytes, key: tuple[int, int]) -> Node | None:
        """A name of a lower hardlink whose copy is in the index (copied up before, under
        another name): link the copy here and return its node; None if there is none."""
        upper = self._upper
        if upper is None:
            return None
        iname = self._index_name(self._table.number_for(*key))
        try:
            os.stat(iname, dir_fd=upper.index_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        self._writable()
        self._copy_up_dirs(parent)
        pfd = self._upper_fd(parent)
        os.link(iname, name, src_dir_fd=upper.index_fd, dst_dir_fd=pfd, follow_symlinks=False)
        held = self._held_links(int(iname))
        if held:
            os.unlink(held[-1], dir_fd=upper.index_fd)  # this name counts in the upper now
        return self._upper_file_node(parent, name, pfd, os.stat(name, dir_fd=pfd, follow_symlinks=False))

    def _link_aliases(self, node: Node, hit: LowerHit, lower_nlink: int) -> None:
        """After copying up a lower hardlink: link the copy at every other name of the same
        lower inode (same layer, same st_dev/st_ino) that the union still shows, so the names
        stay one file, in this mount and after a remount (the upper holds the hardlinks; no
        index is needed). A name is visible when looking its lower path up in the union finds
        this very node; whited-out or replaced names are not, and are left alone. Names it
        cannot reach (below a directory renamed before, not looked up since) keep a link in
        the index instead (``_hold_unlinked``) until a lookup links them."""
        key = node.lower_key
        assert key is not None and self._upper is not None
        self._table.by_lower[key] = node  # lookups of its other names find it meanwhile
        try:
            self._link_alias_names(node, key, hit.dir.layer)
            self._hold_unlinked(node, lower_nlink)
        finally:
            self._table.unbind_backing(node)
            self._table.by_lower.pop(key, None)
            node.lower_key = None
            if node.backing is not None:
                self._table.by_backing[node.backing] = node

    def _link_alias_names(self, node: Node, key: tuple[int, int], layer: int) -> None:
        copy = node.links[-1]  # the name just copied up (looking names up below adds links)
        assert self._upper is not None
        try:
            os.link(copy[1], self._index_name(node.number), src_dir_fd=self._upper_fd(copy[0]),
                    dst_dir_fd=self._upper.index_fd, follow_symlinks=False)
            node.indexed = True
        except FileExistsError:
            pass
        try:
            # the names already known first: they may lie below a renamed directory, where
            # the lower paths do not lead
            for p, name in list(node.links[:-1]):
                if not p.dead and p.children.get(name) is node:
                    self._copy_up_dirs(p)
                    pfd = self._upper_fd(p)
                    if not _lexists(pfd, name):
                        os.link(copy[1], name, src_dir_fd=self._upper_fd(copy[0]), dst_dir_fd=pfd,
                                follow_symlinks=False)
            self._link_each_alias(node, key, layer, copy)
        finally:
            node.add_link(*copy)  # the one _at uses: last

    def _link_each_alias(self, node: Node, key: tuple[int, int], layer: int, copy: tuple[Node, bytes]) -> None:
        for parts in self._alias_paths(layer).get(key, ()):
            held: list[Node] = []
            try:
                p: Node | None = self._root
                for comp in parts[:-1]:
                    assert p is not None
                    p = self._child(p, comp)
                    if p is None or not p.is_dir:
                        break
                    held.append(p)
                else:
                    assert p is not None
                    found = self._child(p, parts[-1])
                    if found is not node:
                        self._done_with(found)
                        continue
                    self._copy_up_dirs(p)
                    pfd = self._upper_fd(p)
                    if _lexists(pfd, parts[-1]):
                        continue  # the copy itself, or already linked
                    os.link(copy[1], parts[-1], src_dir_fd=self._upper_fd(copy[0]), dst_dir_fd=pfd,
                            follow_symlinks=False)
                    node.add_link(p, parts[-1])
            finally:
                self._done_with(*reversed(held))

    def _alias_paths(self, layer: int) -> dict[tuple[int, int], list[tuple[bytes, ...]]]:
        """Lower layer ``layer``'s non-directories with several links: (st_dev, st_ino) ->
        their paths (components from the layer root). Read once per mount (layers are
        read-only)."""
        found = self._aliases.get(layer)
        if found is not None:
            return found
        found = {}
        root = b"/proc/self/fd/%d/." % self._lowers.root_fds[layer]  # fwalk will not follow a link
        for dirpath, _dirs, files, dfd in os.fwalk(root):
            rel = os.path.relpath(dirpath, root)
            base = () if rel == b"." else tuple(rel.split(b"/"))
            for f in files:
                if f.startswith(WH):
                    continue
                try:
                    st = os.stat(f, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    continue
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    found.setdefault((st.st_dev, st.st_ino), []).append((*base, f))
        self._aliases[layer] = found
        return found

    def _copy_regular(self, node: Node, hit: LowerHit, st: os.stat_result, attrs: dict[str, bytes],
                      private: dict[str, bytes], tmp: bytes, truncate: int | None) -> bool:
        upper = self._writable()
        length = st.st_size if truncate is None else min(truncate, st.st_size)
        src = os.open(hit.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._lowers.fd(hit.dir))
        released = False
        try:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=upper.work_fd)
            try:
                if length > UNLOCKED_COPY_BYTES:
                    node.busy = True
                    self._lock.release()
                    released = True
                    try:
                        copyup.copy_data(src, dst, length)
                    finally:
                        self._lock.acquire()
                        node.busy = False
                        self._cond.notify_all()
                else:
                    copyup.copy_data(src, dst, length)
                copyup.apply_meta_fd(dst, st, attrs, self._xnames, private)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        return released

    # --- handles ------------------------------------------------------------------------

    def _open_fd(self, node: Node, flags: int) -> tuple[int, bool]:
        """Open the real file of ``node``: (fd, whether it is the upper one)."""
        if node.upper:
            fd, name = self._at(node)
            if name is None:  # unlinked: reopen through the handle's fd
                return os.open(b"/proc/self/fd/%d" % fd, flags | os.O_CLOEXEC), True
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd), True
        if node.dead:
            for h in node.handles:
                handle = self._fhs.get(h)
                if handle is not None:
                    return os.dup(handle.fd), False
            raise oserror(errno.ENOENT, "the file has no name left")
        assert node.lower is not None
        fd = os.open(node.lower.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=self._lowers.fd(node.lower.dir))
        return fd, False

    def read_fd(self, fh: int) -> int:
        """The fd that ``read(fh, ...)`` reads now (the upper copy once the file was
        copied up), for an adapter that moves the data itself (``preadv`` into a buffer of
        its own, ``splice``). It stays valid until ``release(fh)``. Not part of
        ``UnionOps`` (an optional fast path)."""
        h = self._fhs.get(fh)
        if h is None:
            raise oserror(errno.EBADF, "no such file handle")
        if not h.upper and h.gen != h.node.gen:
            self._refresh(h)
        return h.fd

    def _refresh(self, h: FileHandle) -> None:
        """A read-only handle opened on the lower file, after the file was copied up: read
        the upper from now on (as the kernel does since 4.19). The old fd stays open until
        release, so a read racing with this never sees a reused fd number."""
        with self._lock:
            if h.upper or h.gen == h.node.gen or not h.node.upper:
                return
            fd, _ = self._open_fd(h.node, os.O_RDONLY)
            h.stale.append(h.fd)
            h.fd, h.upper, h.gen = fd, True, h.node.gen

    def _close_all(self) -> None:
        for h in self._fhs.values():
            for fd in (h.fd, *h.stale):
                os.close(fd)
        self._fhs.clear()
        self._dhs.clear()
        self._fds.close_all()
        self._lowers.close()
        if self._upper is not None:
            self._upper.close()


def _lexists(dir_fd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _lexists_path(path: bytes) -> bool:
    try:
        os.stat(path, follow_symlinks=False)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
