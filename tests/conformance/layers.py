"""Lower layers for the conformance suite, written in kernel overlayfs' on-disk format.

Every backend of one case gets its own fresh copy, built by the same function from the same
description, so the layers are identical down to owners, modes, xattrs and mtimes (all
mtimes and atimes are pinned to ``FIXED_NS``). Nothing here mounts; the functions only
write below the directory they are given.

The format (the same as ``layerfs.union.whiteout`` with ``PRIVILEGED``):

- whiteout: a character device 0/0 named like the deleted entry;
- opaque directory: xattr ``trusted.overlay.opaque`` = ``y``;
- hardlinks within one layer are real hardlinks; device nodes are real device nodes.

A layer set is a function ``(base) -> [top, ..., bottom]``: it creates ``base/lower0`` (the
top) and the layers below it and returns their paths top first, as ``lowerdir=`` wants them.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

FIXED_NS = 1_600_000_000_123_456_789
OPAQUE_XATTR = "trusted.overlay.opaque"
LONG_NAME = "n" * 250  # a lower-layer name close to NAME_MAX
DEEP = "deep/d1/d2/d3/d4/d5/d6/d7/d8"
BIG_SIZE = 200 * 1024 + 17  # more than one FUSE read/write buffer, not a multiple of a page


def big_content() -> bytes:
    """Deterministic, incompressible-looking content for the ``big`` file."""
    out = bytearray()
    counter = 0
    while len(out) < BIG_SIZE:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:BIG_SIZE])


# --- entries -------------------------------------------------------------------------


@dataclass(frozen=True)
class File:
    path: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    opaque: bool = False


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str


@dataclass(frozen=True)
class Hardlink:
    path: str
    to: str  # an entry of the same layer, created earlier


@dataclass(frozen=True)
class Fifo:
    path: str
    mode: int = 0o644


@dataclass(frozen=True)
class Device:
    path: str
    major: int
    minor: int
    mode: int = 0o666
    block: bool = False


@dataclass(frozen=True)
class Whiteout:
    path: str


Entry = File | Dir | Symlink | Hardlink | Fifo | Device | Whiteout
LayerSet = Callable[[Path], list[Path]]


def build_layer(root: Path, entries: Sequence[Entry]) -> Path:
    """Create ``root`` and write ``entries`` into it (parents made 0755 as needed), then pin times."""
    root.mkdir(parents=True)
    os.chmod(root, 0o755)
    for e in entries:
        p = root / e.path
        if not p.parent.exists():
            p.parent.mkdir(parents=True, mode=0o755)
        if isinstance(e, File):
            p.write_bytes(e.data)
            _meta(p, e.mode, e.uid, e.gid, e.xattrs)
        elif isinstance(e, Dir):
            p.mkdir()
            _meta(p, e.mode, e.uid, e.gid, e.xattrs)
            if e.opaque:
                os.setxattr(p, OPAQUE_XATTR, b"y")
        elif isinstance(e, Symlink):
            os.symlink(e.target, p)
        elif isinstance(e, Hardlink):
            os.link(root / e.to, p)
        elif isinstance(e, Fifo):
            os.mkfifo(p)
            os.chmod(p, e.mode)
        elif isinstance(e, Device):
            kind = stat.S_IFBLK if e.block else stat.S_IFCHR
            os.mknod(p, kind | e.mode, os.makedev(e.major, e.minor))
            os.chmod(p, e.mode)
        elif isinstance(e, Whiteout):
            os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        else:  # pragma: no cover - the union above is closed
            raise TypeError(e)
    pin_times(root)
    return root


def _meta(p: Path, mode: int, uid: int, gid: int, xattrs: Mapping[str, bytes]) -> None:
    os.chown(p, uid, gid)
    os.chmod(p, mode)  # after chown: chown clears setuid/setgid
    for name, value in xattrs.items():
        os.setxattr(p, name, value)


def pin_times(root: Path) -> None:
    """Set atime and mtime of everything below ``root`` (and ``root``) to ``FIXED_NS``.

    Works with directory fds, so trees deeper than PATH_MAX are pinned too; directories are
    pinned after their children (creating a child changes the parent's mtime).
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _pin_at(fd)
    finally:
        os.close(fd)
    os.utime(root, ns=(FIXED_NS, FIXED_NS))


def _pin_at(dir_fd: int) -> None:
    for name in os.listdir(dir_fd):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                _pin_at(sub)
            finally:
                os.close(sub)
        os.utime(name, ns=(FIXED_NS, FIXED_NS), dir_fd=dir_fd, follow_symlinks=False)


# --- layer sets ----------------------------------------------------------------------

BOTTOM: list[Entry] = [
    Dir("dir"),
    File("dir/a", b"a\n"),
    File("dir/b", b"b\n"),
    Dir("dir/sub", mode=0o750),
    File("dir/sub/deep", b"deep\n"),
    File("file", b"bottom file\n"),
    File("hidden", b"hidden by a whiteout in the middle layer\n"),
    File("shadowed", b"from bottom\n"),
    Dir("merged"),
    File("merged/lowonly", b"low\n"),
    File("merged/both", b"low version\n"),
    File("merged/wh_me", b"whited out in the top layer\n"),
    Dir("opaque"),
    File("opaque/gone", b"hidden by the opaque directory above\n"),
    Dir("replaced"),
    File("replaced/child", b"hidden: a file replaces this directory above\n"),
    Dir("emptydir", mode=0o711),
    Dir("movable"),
    File("movable/x", b"x\n"),
    Dir("movable/inner"),
    File("movable/inner/y", b"y\n"),
    Dir("nest/a/b/c"),
    File("nest/a/b/c/leaf", b"leaf\n"),
    File("nest/a/sibling", b"sibling\n"),
    File("setuid", b"#!/bin/sh\necho suid\n", mode=0o4755),
    File("setgid", b"sgid\n", mode=0o2755),
    File("owned", b"owned by 1000\n", mode=0o640, uid=1000, gid=1000),
    File("private", b"private\n", mode=0o600),
    File("mode000", b"nobody may read me but root\n", mode=0o000),
    File("exec.sh", b"#!/bin/sh\ntrue\n", mode=0o755),
    File("xattr_file", b"with xattrs\n", xattrs={"user.color": b"blue", "trusted.note": b"t"}),
    Dir("xattr_dir", xattrs={"user.tag": b"d"}),
    File("hl1", b"linked\n"),
    Hardlink("hl2", "hl1"),
    Hardlink("dir/hl3", "hl1"),
    Symlink("link_rel", "file"),
    Symlink("link_dir", "dir"),
    Symlink("link_dangling", "missing"),
    Symlink("link_abs", "/nonexistent/abs"),
    Fifo("fifo", mode=0o640),
    Device("chardev", 1, 3, mode=0o666),
    Device("blockdev", 7, 200, mode=0o660, block=True),
    Dir("deep"),
    File(DEEP + "/leaf", b"deep leaf\n"),
    File(LONG_NAME, b"long name\n"),
    File("big", big_content()),
    Dir("sticky", mode=0o1777),
    File("sticky/owned_by_1000", b"s\n", uid=1000, gid=1000),
]

MIDDLE: list[Entry] = [
    Whiteout("hidden"),
    File("shadowed", b"from middle\n"),
    Dir("merged"),
    File("merged/midonly", b"mid\n"),
    File("merged/both", b"mid version\n"),
    Dir("opaque", opaque=True),
    File("opaque/kept", b"kept\n"),
    File("replaced", b"now a file\n"),
    Dir("dir"),
    Whiteout("dir/b"),
    Dir("mid_only_dir", mode=0o775),
    File("mid_only_dir/m", b"m\n"),
]

TOP: list[Entry] = [
    File("top", b"top file\n"),
    Dir("merged"),
    File("merged/toponly", b"top\n"),
    Whiteout("merged/wh_me"),
    Dir("dir"),
    File("dir/c", b"c\n"),
]


def standard(base: Path) -> list[Path]:
    """Three layers exercising every lookup rule (see BOTTOM/MIDDLE/TOP), top first."""
    return [
        build_layer(base / "lower0", TOP),
        build_layer(base / "lower1", MIDDLE),
        build_layer(base / "lower2", BOTTOM),
    ]


SMALL_BOTTOM: list[Entry] = [
    File("a", b"a from bottom\n"),
    File("b", b"b\n", mode=0o600),
    Dir("d"),
    File("d/a", b"d/a\n"),
    File("d/b", b"d/b\n"),
    Dir("d/e"),
    File("d/e/a", b"d/e/a\n"),
    Dir("e"),
    File("e/b", b"e/b\n"),
    File("hl", b"hardlinked\n"),
    Hardlink("d/hl", "hl"),
    Symlink("s", "a"),
]
SMALL_TOP: list[Entry] = [
    File("a", b"a from top\n"),
    Dir("d"),
    File("d/c", b"d/c\n"),
    Whiteout("d/b"),
    Dir("e", opaque=True),
    File("e/a", b"e/a\n"),
]


def small(base: Path) -> list[Path]:
    """Two small layers over a handful of names, for the stateful test."""
    return [build_layer(base / "lower0", SMALL_TOP), build_layer(base / "lower1", SMALL_BOTTOM)]


LONG_COMPONENT = 240  # bytes per directory name in ``long_paths``
LONG_DEPTH = 20  # 20 x 241 bytes: deeper than PATH_MAX (4096)


def long_component(i: int) -> str:
    return f"{i:03d}" + "p" * (LONG_COMPONENT - 3)


def long_paths(base: Path) -> list[Path]:
    """Two layers; the bottom holds ``long/<20 dirs of 240-byte names>/leaf``, deeper than
    PATH_MAX, built with directory fds (a path string that long cannot be used)."""
    top = build_layer(base / "lower0", [File("short", b"short\n")])
    bottom = base / "lower1"
    build_layer(bottom, [Dir("long")])
    fd = os.open(bottom / "long", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(LONG_DEPTH):
            name = long_component(i)
            os.mkdir(name, 0o755, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = sub
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        try:
            os.write(leaf, b"below PATH_MAX\n")
        finally:
            os.close(leaf)
    finally:
        os.close(fd)
    pin_times(bottom)
    return [top, bottom]


LAYER_SETS: dict[str, LayerSet] = {"standard": standard, "small": small, "long_paths": long_paths}
