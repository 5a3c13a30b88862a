"""Union inodes: identity, stable inode numbers, lookup counts.

A ``Node`` is one object of the union as the adapter (and the kernel's FUSE inode cache)
knows it. Directories and lower files are identified by their place in the tree, except
lower hardlinks: every visible name of one lower inode with several links is one node
(``InodeTable.by_lower``, as kernel overlayfs with ``index=on``), and copy-up keeps them one
file (``UnionCore._link_aliases`` links the copy at every visible name of that lower inode,
so the upper itself holds the hardlink: it survives a remount without an index; a name it
cannot reach, below a directory renamed before the copy-up, is linked from the index when
next looked up, and until then holds a link in the index so every name counts it). Upper
files are identified by the real file that backs them (``(st_dev, st_ino)``), so upper
hardlinks looked up under several names are one node. Every node
keeps parent pointers instead of paths: a rename moves one pointer, and the real
directories are reached by walking fds down from the nearest cached ancestor.

Inode numbers (``st_ino`` = the FUSE inode number):

- the root is ``ROOT_INODE`` (1);
- otherwise the real ``st_ino`` of the entry's *origin*: for a lower entry the lower file;
  for a directory that merges lower directories the topmost of those (as the kernel
  reports); for an upper file copied up from a lower one the number recorded at copy-up
  (see below), so copy-up and remount never change it (a lower hardlink too: every name of
  its copy carries the same record); for a
  file created in the upper its own ``st_ino``;
- layers on another filesystem than the first one get their device folded in
  (``dev_index << 48 ^ ino``); a number already held by another live node (two filesystems
  with the same inode number; a lower hardlink found under a name its copy-up could not
  link, e.g. below a directory renamed before the copy-up) is replaced by a fresh
  one from ``2**63`` up, which is stable only for the life of the mount (and, once the file
  is copied up, recorded in its origin record like any other number).

Written and read here: the origin record ``trusted.overlay.layerfs.origin`` (or
``user.overlay.layerfs.origin`` with user xattrs; ``whiteout.ORIGIN_NAMES``) on a copied-up
non-directory, its value the decimal inode number, ASCII. It is overlay-private: hidden,
never copied, never exported. The kernel's own ``trusted.overlay.origin``
(``whiteout.KERNEL_ORIGIN``, a ``struct ovl_fb`` file handle) is read too, so files the
kernel copied up keep the inode number the kernel shows.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from types import MappingProxyType
from typing import Literal, cast

from layerfs.union.api import ROOT_INODE
from layerfs.union.dirindex import LowerDir, LowerHit
from layerfs.union.whiteout import KERNEL_ORIGIN, ORIGIN_NAMES, ORIGIN_SUFFIX
from layerfs.union.xattrs import MISSING

FRESH_BASE = 1 << 63
DEV_SHIFT = 48
# the children of every non-directory: one shared empty mapping (a write to it raises), as
# most nodes are files and an empty dict each costs 64 bytes
_NO_CHILDREN = cast("dict[bytes, Node]", MappingProxyType({}))


class Node:
    """One union object. Mutated only under the model's lock."""

    __slots__ = ("number", "kind", "links", "nlookup", "pins", "children", "upper", "lower",
                 "chain", "opaque", "redirect", "dead", "busy", "gen", "backing", "upper_wh", "_handles",
                 "lower_key", "indexed")

    def __init__(self, kind: int, parent: Node | None, name: bytes) -> None:
        self.number = 0
        self.kind = kind  # stat.S_IFMT bits
        # (parent, name) of every known name, the most recent last; one for a directory
        self.links: list[tuple[Node, bytes]] = [] if parent is None else [(parent, name)]
        self.nlookup = 0
        self.pins = 0  # open file and directory handles, readdir snapshots
        # directories: nodes of looked-up children
        self.children: dict[bytes, Node] = {} if kind == 0o040000 else _NO_CHILDREN
        self.upper = False  # exists in the upper layer (under its parent's upper directory)
        self.lower: LowerHit | None = None  # where the lowers provide it
        self.chain: tuple[LowerDir, ...] = ()  # directories: lower dirs merging into it
        self.opaque = False  # directories: the upper directory is opaque
        self.redirect: bytes | None = None  # directories: the upper directory's redirect
        self.dead = False  # unlinked from the union (maybe still open)
        self.busy = False  # a copy-up is copying its data with the lock released
        self.gen = 0  # bumped by copy-up: read-only handles on the lower reopen the upper
        self.backing: tuple[int, int] | None = None  # upper non-directories: real (st_dev, st_ino)
        self.upper_wh: bool | None = None  # directories: the upper dir may hold .wh.* files
        self._handles: set[int] | None = None  # see ``handles``
        # lower non-directories with several links, not copied up: the lower (st_dev, st_ino)
        self.lower_key: tuple[int, int] | None = None
        self.indexed = False  # upper non-directories: one of the real file's links is our index's

    @property
    def handles(self) -> set[int]:
        """Open file handles (getattr of an unlinked file); made at first use, as most
        nodes are never opened (an empty set costs 216 bytes)."""
        h = self._handles
        if h is None:
            h = self._handles = set()
        return h

    @property
    def parent(self) -> Node | None:
        return self.links[-1][0] if self.links else None

    @property
    def name(self) -> bytes:
        return self.links[-1][1] if self.links else b""

    @property
    def is_dir(self) -> bool:
        return self.kind == 0o040000

    @property
    def merged(self) -> bool:
        """A directory with more than one contributing layer (kernel: OVL_TYPE_MERGE)."""
        return len(self.chain) + (1 if self.upper else 0) > 1

    def add_link(self, parent: Node, name: bytes) -> None:
        self.remove_link(parent, name)
        self.links.append((parent, name))

    def remove_link(self, parent: Node, name: bytes) -> None:
        self.links = [(p, n) for p, n in self.links if not (p is parent and n == name)]

    def __repr__(self) -> str:
        return f"Node({self.number}, {self.name!r}, upper={self.upper}, dead={self.dead})"


class InodeTable:
    """Inode number -> Node, with the rules for numbers and when a node is forgotten."""

    def __init__(self, primary_dev: int, on_drop: Callable[[Node], None]) -> None:
        self.nodes: dict[int, Node] = {}
        self.by_backing: dict[tuple[int, int], Node] = {}
        self.by_lower: dict[tuple[int, int], Node] = {}  # lower hardlinks: one node per inode
        self._devs: dict[int, int] = {primary_dev: 0}
        self._fresh = FRESH_BASE
        self._on_drop = on_drop

    def number_for(self, dev: int, ino: int) -> int:
        """The stable number of the real inode ``ino`` on device ``dev``."""
        idx = self._devs.get(dev)
        if idx is None:
            idx = self._devs[dev] = len(self._devs)
        return ino if idx == 0 else (idx << DEV_SHIFT) ^ ino

    def register(self, node: Node, wanted: int) -> None:
        """Give ``node`` the number ``wanted``, or a fresh one when that is taken."""
        if wanted <= ROOT_INODE or wanted in self.nodes:
            while self._fresh in self.nodes:
                self._fresh += 1
            wanted = self._fresh
            self._fresh += 1
        node.number = wanted
        self.nodes[wanted] = node
        if node.backing is not None:
            self.by_backing[node.backing] = node
        if node.lower_key is not None:
            self.by_lower[node.lower_key] = node

    def get(self, number: int) -> Node:
        node = self.nodes.get(number)
        if node is None:
            raise OSError(errno.ESTALE, f"no inode {number} (forgotten or never looked up)")
        return node

    def unbind_backing(self, node: Node) -> None:
        """``node`` no longer answers for its real file (unlinked, or copied up)."""
        if node.backing is not None and self.by_backing.get(node.backing) is node:
            del self.by_backing[node.backing]
        if node.lower_key is not None and self.by_lower.get(node.lower_key) is node:
            del self.by_lower[node.lower_key]

    def maybe_drop(self, node: Node) -> None:
        """Forget ``node`` if nothing refers to it any more, then its parents likewise."""
        todo = [node]
        while todo:
            n = todo.pop()
            if n.number == ROOT_INODE or n.nlookup > 0 or n.pins > 0 or n.busy or n.children:
                continue
            if self.nodes.get(n.number) is n:
                del self.nodes[n.number]
            self.unbind_backing(n)
            for parent, name in n.links:
                if parent.children.get(name) is n:
                    del parent.children[name]
                    todo.append(parent)
            self._on_drop(n)


def origin_name(private_prefix: str) -> str:
    return private_prefix + ORIGIN_SUFFIX


def read_origin(path: bytes, table: InodeTable, lower_dev: int) -> int | None:
    """The recorded origin number of the upper file at ``path``, or None."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in MISSING:
            return None
        raise
    for name in ORIGIN_NAMES:
        if name in names:
            value = _get(path, name)
            if value is not None and value.isdigit():
                return int(value)
    for name in KERNEL_ORIGIN:
        if name in names:
            value = _get(path, name)
            ino = parse_kernel_origin(value) if value is not None else None
            if ino is not None:
                # the handle names a lower filesystem; in practice the lowers share one
                return table.number_for(lower_dev, ino)
    return None


def _get(path: bytes, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in MISSING:
            return None
        raise


def parse_kernel_origin(value: bytes) -> int | None:
    """The inode number inside overlayfs' origin file handle, where its type is known.

    ``struct ovl_fb { u8 version, magic (0xfb), len, flags, type; uuid_t uuid; u32 fid[]; }``;
    ``type`` is the exportfs fileid type of the lower filesystem: ``FILEID_INO32_GEN`` (1,
    ext4 and most) and ``_PARENT`` (2) start with a u32 inode number, ``FILEID_INO64_GEN``
    (0x81/0x82) with a u64, btrfs (0x4d-0x4f) with the u64 objectid.
    """
    if len(value) < 25 or value[1] != 0xFB or value[2] != len(value):
        return None
    big = value[3] & 1  # OVL_FH_FLAG_BIG_ENDIAN
    if bool(big) != (sys.byteorder == "big"):
        return None  # a handle from another machine: not ours to interpret
    order: Literal["little", "big"] = "big" if big else "little"
    fid = value[21:]
    kind = value[4]
    if kind in (1, 2):
        return int.from_bytes(fid[:4], order)
    if kind in (0x81, 0x82, 0x4D, 0x4E, 0x4F) and len(fid) >= 8:
        return int.from_bytes(fid[:8], order)
    return None
