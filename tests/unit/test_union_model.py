"""The read-write union model (``layerfs.union.fs.UnionFS``), driven through its API.

No FUSE mount: tests call the model directly. Where the on-disk upper matters, the same
scenario runs on kernel overlayfs (``redirect_dir=on,index=off``) over an identical copy
of the layers, and the two uppers must match (types, modes, owners, contents, opaque and
redirect markers; the kernel's origin/impure/uuid records and our origin record are
ignored). Then each upper is cross-mounted by the other backend, and the merged trees must
match. Kernel mounts always unmount in ``finally`` (and the ``kmounts`` fixture detaches
anything left, then checks mountinfo).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from layerfs.linux.files import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from layerfs.mount import kernel
from layerfs.mount.spec import MountSpec
from layerfs.union import whiteout
from layerfs.union.api import ROOT_INODE, Attr, Ctx, SetAttr
from layerfs.union.fs import UnionFS
from layerfs.union.view import LayerStack
from tests.support.markers import IS_ROOT, needs_root

T0 = 1_600_000_000_123_456_789  # fixed lower timestamps (ns), so copies compare exactly


def _overlay_listed() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1:] == ["overlay"] for line in f)
    except OSError:
        return False


needs_overlay = pytest.mark.skipif(not (IS_ROOT and _overlay_listed()),
                                   reason="needs root and kernel overlayfs (the oracle)")


@pytest.fixture(autouse=True)
def _umask() -> Iterator[None]:
    old = os.umask(0o022)  # kernel-side operations and the model's Ctx() agree on 022
    yield
    os.umask(old)


# --- building layers ------------------------------------------------------------------


def put(root: Path, rel: str, data: bytes | str = b"", *, mode: int = 0o644, uid: int = 0, gid: int = 0,
        xattrs: dict[str, bytes] | None = None) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chown(p, uid, gid)
    os.chmod(p, mode)
    for k, v in (xattrs or {}).items():
        os.setxattr(p, k, v)
    return p


def mkd(root: Path, rel: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0,
        xattrs: dict[str, bytes] | None = None) -> Path:
    p = root / rel
    p.mkdir(parents=True, exist_ok=True)
    os.chown(p, uid, gid)
    os.chmod(p, mode)
    for k, v in (xattrs or {}).items():
        os.setxattr(p, k, v)
    return p


def device_whiteout(root: Path, rel: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    os.mknod(root / rel, stat.S_IFCHR, os.makedev(0, 0))


def fix_times(root: Path) -> None:
    """Every entry gets the same fixed atime/mtime (children first: they touch parents)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), ns=(T0, T0 + 1), follow_symlinks=False)
    os.utime(root, ns=(T0, T0 + 1))


def base_layers(base: Path) -> list[str]:
    """Two lower layers exercising every rule the scenarios touch (top first)."""
    l1, l2 = base / "l1", base / "l2"
    for rel in ("file", "file2", "file3", "file4", "file5", "g1", "g2", "hl_src", "gone"):
        put(l2, rel, rel * 3)
    put(l2, "big", b"big" * 1000)
    put(l2, "esc", "esc", mode=0o4751, uid=123, gid=456,
        xattrs={"trusted.overlay.overlay.foo": b"1", "trusted.overlay.bogus": b"junk", "user.foo": b"bar"})
    put(l2, "esc2", "esc2", xattrs={"user.foo": b"bar", "user.keep": b"k"})
    mkd(l2, "d", mode=0o750, uid=1000, gid=1000)
    put(l2, "d/sub/f", "f", mode=0o640)
    put(l2, "e/x", "x")
    for rel in ("empty", "lonely", "ren/other", "srcd/in", "tgt", "opq/hidden_dir"):
        mkd(l2, rel)
    for rel in ("ren/a/x", "ren2/a/x", "ren3/a/x", "p/a/deep/f", "m/a/f", "m/g", "opq/hidden"):
        put(l2, rel, rel)
    put(l1, "d/g", "g")
    mkd(l1, "m")
    put(l1, "m/top", "top")
    device_whiteout(l1, "gone")
    mkd(l1, "opq", xattrs={"trusted.overlay.opaque": b"y"})
    put(l1, "opq/own", "own")
    os.symlink("file", l2 / "sl_lower")
    for layer in (l1, l2):
        fix_times(layer)
    return [str(l1), str(l2)]


# --- the model behind paths -----------------------------------------------------------


class Model:
    """Paths over the inode API (lookup references are simply leaked: tests are short)."""

    def __init__(self, fs: UnionFS) -> None:
        self.fs = fs

    def ino(self, path: str) -> int:
        ino = ROOT_INODE
        for comp in [c for c in path.split("/") if c]:
            ino = self.fs.lookup(ino, comp.encode()).st_ino
        return ino

    def at(self, path: str) -> tuple[int, bytes]:
        head, _, tail = path.rstrip("/").rpartition("/")
        return self.ino(head), tail.encode()

    def attr(self, path: str) -> Attr:
        return self.fs.getattr(self.ino(path))

    def ls(self, path: str = "") -> list[str]:
        return sorted(os.fsdecode(n) for n, _ in self.entries(self.ino(path)))

    def entries(self, ino: int) -> list[tuple[bytes, Attr]]:
        fh = self.fs.opendir(ino)
        out: list[tuple[bytes, Attr]] = []
        off = 0
        try:
            while batch := self.fs.readdir(fh, off):
                out += [(e.name, e.attr) for e in batch]
                off = batch[-1].next_offset
        finally:
            self.fs.releasedir(fh)
        return out

    def read(self, path: str) -> bytes:
        fh = self.fs.open(self.ino(path), os.O_RDONLY)
        try:
            return self.fs.read(fh, 0, 1 << 24)
        finally:
            self.fs.release(fh)

    def exists(self, path: str) -> bool:
        try:
            self.ino(path)
            return True
        except FileNotFoundError:
            return False


class ModelOps:
    """Scenario operations on the model."""

    def __init__(self, m: Model) -> None:
        self.m, self.fs = m, m.fs

    def write(self, path: str, data: bytes = b"", *, append: bool = False, trunc: bool = False) -> None:
        if self.m.exists(path):
            flags = os.O_WRONLY | (os.O_APPEND if append else 0) | (os.O_TRUNC if trunc else 0)
            fh = self.fs.open(self.m.ino(path), flags)
        else:
            fh, _ = self.fs.create(*self.m.at(path), 0o666, os.O_WRONLY, Ctx())
        try:
            if data:
                self.fs.write(fh, 0, data)
        finally:
            self.fs.release(fh)

    def mkdir(self, path: str, mode: int = 0o777) -> None:
        self.fs.mkdir(*self.m.at(path), mode, Ctx())

    def rmdir(self, path: str) -> None:
        self.fs.rmdir(*self.m.at(path))

    def unlink(self, path: str) -> None:
        self.fs.unlink(*self.m.at(path))

    def rename(self, a: str, b: str, flags: int = 0) -> None:
        self.fs.rename(*self.m.at(a), *self.m.at(b), flags)

    def link(self, a: str, b: str) -> None:
        self.fs.link(self.m.ino(a), *self.m.at(b))

    def symlink(self, target: str, path: str) -> None:
        self.fs.symlink(*self.m.at(path), target.encode(), Ctx())

    def mkfifo(self, path: str) -> None:
        self.fs.mknod(*self.m.at(path), stat.S_IFIFO | 0o666, 0, Ctx())

    def chmod(self, path: str, mode: int) -> None:
        self.fs.setattr(self.m.ino(path), SetAttr(mode=mode), None, Ctx())

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.fs.setattr(self.m.ino(path), SetAttr(uid=uid, gid=gid), None, Ctx())

    def truncate(self, path: str, size: int) -> None:
        self.fs.setattr(self.m.ino(path), SetAttr(size=size), None, Ctx())

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        self.fs.setxattr(self.m.ino(path), name.encode(), value, 0)

    def removexattr(self, path: str, name: str) -> None:
        self.fs.removexattr(self.m.ino(path), name.encode())


class KernelOps:
    """The same operations on a kernel overlay mount."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def p(self, path: str) -> str:
        return str(self.root / path)

    def write(self, path: str, data: bytes = b"", *, append: bool = False, trunc: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0) | (os.O_TRUNC if trunc else 0)
        fd = os.open(self.p(path), flags, 0o666)
        try:
            if data:
                os.pwrite(fd, data, 0)
        finally:
            os.close(fd)

    def mkdir(self, path: str, mode: int = 0o777) -> None:
        os.mkdir(self.p(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self.p(path))

    def unlink(self, path: str) -> None:
        os.unlink(self.p(path))

    def rename(self, a: str, b: str, flags: int = 0) -> None:
        renameat2(-100, self.p(a).encode(), -100, self.p(b).encode(), flags)

    def link(self, a: str, b: str) -> None:
        os.link(self.p(a), self.p(b))

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self.p(path))

    def mkfifo(self, path: str) -> None:
        os.mkfifo(self.p(path), 0o666)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self.p(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self.p(path), uid, gid, follow_symlinks=False)

    def truncate(self, path: str, size: int) -> None:
        os.truncate(self.p(path), size)

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        os.setxattr(self.p(path), name, value, follow_symlinks=False)

    def removexattr(self, path: str, name: str) -> None:
        os.removexattr(self.p(path), name, follow_symlinks=False)


# --- snapshots ------------------------------------------------------------------------

# overlay records that differ between backends by design, or are the kernel's bookkeeping
IGNORED = {f"{p}{n}" for p in ("trusted.overlay.", "user.overlay.")
           for n in ("origin", "impure", "uuid", "layerfs.origin")}


def _xattrs_of(path: str) -> dict[str, bytes]:
    out = {}
    for n in os.listxattr(path, follow_symlinks=False):
        if n not in IGNORED:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
    return out


def upper_snapshot(root: str | Path) -> dict[str, tuple[Any, ...]]:
    """What an upper layer holds, as far as semantics go."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            full = os.path.join(dirpath, n)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            if whiteout.is_whiteout_stat(st):
                out[rel] = ("whiteout",)  # the kernel shares one whiteout inode: no nlink
                continue
            data: Any = None
            if stat.S_ISREG(st.st_mode):
                data = (Path(full).read_bytes(), st.st_nlink)
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(full)
            out[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, data, _xattrs_of(full))
    out["."] = ("root", _xattrs_of(str(root)))
    return out


def kernel_tree(root: str | Path) -> dict[str, tuple[Any, ...]]:
    """The merged tree a mount shows."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            full = os.path.join(dirpath, n)
            st = os.lstat(full)
            data: Any = None
            if stat.S_ISREG(st.st_mode):
                data = Path(full).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(full)
            nlink = None if stat.S_ISDIR(st.st_mode) else st.st_nlink
            out[os.path.relpath(full, root)] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, nlink, data,
                                                sorted(os.listxattr(full, follow_symlinks=False)))
    return out


def model_tree(m: Model) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    todo = [("", ROOT_INODE)]
    while todo:
        rel, ino = todo.pop()
        for name, a in m.entries(ino):
            path = f"{rel}/{os.fsdecode(name)}".lstrip("/")
            child = m.fs.lookup(ino, name)
            data: Any = None
            if stat.S_ISREG(a.st_mode):
                data = m.read(path)
            elif stat.S_ISLNK(a.st_mode):
                data = os.fsdecode(m.fs.readlink(child.st_ino))
            nlink = None if stat.S_ISDIR(a.st_mode) else a.st_nlink
            out[path] = (stat.filemode(a.st_mode), a.st_uid, a.st_gid, nlink, data,
                         sorted(os.fsdecode(x) for x in m.fs.listxattr(child.st_ino)))
            if stat.S_ISDIR(a.st_mode):
                todo.append((path, child.st_ino))
    return dict(sorted(out.items()))


# --- kernel mounts --------------------------------------------------------------------


@pytest.fixture
def kmounts() -> Iterator[list[str]]:
    """Targets mounted by a test; whatever is still mounted at teardown is detached."""
    targets: list[str] = []
    yield targets
    for t in reversed(targets):
        if kernel.is_mountpoint(t):
            kernel.unmount(t, detach=True)
    assert not any(kernel.is_mountpoint(t) for t in targets)


@contextlib.contextmanager
def overlay(kmounts: list[str], base: Path, lowers: list[str], target: Path) -> Iterator[Path]:
    target.mkdir(exist_ok=True)
    kmounts.append(str(target))
    spec = MountSpec.overlay(lowers, str(base / "u"), str(base / "w"), extra=["redirect_dir=on", "index=off"])
    kernel.mount(spec, str(target))
    try:
        yield target
    finally:
        kernel.unmount(str(target), detach=True)


def new_union(base: Path, lowers: list[str], **kw: Any) -> UnionFS:
    for d in ("u", "w"):
        (base / d).mkdir(exist_ok=True)
    return UnionFS(lowers, str(base / "u"), str(base / "w"), **kw)


Scenario = Callable[[Any], None]


def run_both(tmp_path: Path, kmounts: list[str], scenario: Scenario) -> None:
    """The scenario on kernel overlayfs and on the model, each over its own copy of the
    same layers: same upper; then each upper mounted by the other shows the same tree."""
    kbase, mbase = tmp_path / "k", tmp_path / "m"
    klowers, mlowers = base_layers(kbase), base_layers(mbase)
    for d in ("u", "w"):
        (kbase / d).mkdir()
    with overlay(kmounts, kbase, klowers, kbase / "mnt") as mnt:
        scenario(KernelOps(mnt))
    fs = new_union(mbase, mlowers)
    try:
        scenario(ModelOps(Model(fs)))
        model_view = model_tree(Model(fs))
    finally:
        fs.destroy()
    assert upper_snapshot(mbase / "u") == upper_snapshot(kbase / "u")
    with overlay(kmounts, mbase, mlowers, mbase / "mnt") as mnt:
        assert kernel_tree(mnt) == model_view  # the kernel reads the model's upper
    fs = new_union(kbase, klowers)
    try:
        view = model_tree(Model(fs))
    finally:
        fs.destroy()
    with overlay(kmounts, kbase, klowers, kbase / "mnt") as mnt:
        assert view == kernel_tree(mnt)  # the model reads the kernel's upper


SCENARIOS: dict[str, Scenario] = {
    "unlink-lower-file": lambda o: o.unlink("file"),
    "rmdir-mkdir-opaque": lambda o: (o.rmdir("empty"), o.mkdir("empty", 0o700)),
    "rename-lower-dir": lambda o: (o.rename("ren/a", "ren/b"), o.rename("ren/b", "ren/c"),
                                   o.rename("ren/c", "ren/other/z"), o.rename("e", "ren/other/e2")),
    "nested-renames": lambda o: (o.rename("p/a", "p/b"), o.rename("p", "q"), o.rename("q/b", "r")),
    "rename-back": lambda o: (o.rename("ren2/a", "ren2/b"), o.rename("ren2/b", "ren2/a")),
    "rmdir-renamed": lambda o: (o.rename("ren3/a", "ren3/b"), o.unlink("ren3/b/x"), o.rmdir("ren3/b")),
    "copy-up-metadata": lambda o: (o.chmod("esc", 0o4755), o.chown("d/sub/f", 1000, 1000),
                                   o.chown("sl_lower", 7, 8)),
    "mkdir-opaque-rules": lambda o: (o.mkdir("newtop"), o.mkdir("newtop/sub"), o.mkdir("d/x"),
                                     o.mkdir("opq/y")),
    "create-over-whiteouts": lambda o: (o.unlink("file"), o.write("file", b"new"), o.unlink("e/x"),
                                        o.rmdir("e"), o.mkdir("e"), o.write("e/x", b"again"),
                                        o.unlink("g1"), o.symlink("t", "g1")),
    "pure-upper-dir-moved-to-merged": lambda o: (o.mkdir("top"), o.mkdir("top/inner"),
                                                 o.write("top/inner/f", b"f"), o.rename("top/inner", "inner2")),
    "rename-dir-over-empty-merged": lambda o: o.rename("srcd", "tgt"),
    "rename-exchange": lambda o: (o.rename("d", "lonely", RENAME_EXCHANGE), o.write("a1", b"a1"),
                                  o.rename("a1", "empty", RENAME_EXCHANGE), o.rename("file2", "file3", RENAME_EXCHANGE)),
    "rename-onto-whiteouts": lambda o: (o.unlink("file"), o.write("newf", b"x"), o.rename("newf", "file"),
                                        o.unlink("g2"), o.rename("g1", "g2"), o.rename("file4", "d/file4b")),
    "rmdir-merged-whiteouts-only": lambda o: (o.unlink("m/a/f"), o.rmdir("m/a"), o.unlink("m/g"),
                                              o.unlink("m/top"), o.rmdir("m")),
    "hardlinks": lambda o: (o.link("hl_src", "hl_dst"), o.link("hl_dst", "d/hl3"), o.unlink("hl_src")),
    "special-files": lambda o: (o.symlink("target", "sl"), o.mkfifo("fifo"), o.mkfifo("d/sub/fifo")),
    "xattrs": lambda o: (o.setxattr("file2", "user.new", b"v"), o.setxattr("file2", "trusted.overlay.mine", b"m"),
                         o.removexattr("esc2", "user.foo"), o.setxattr("d", "user.dir", b"1")),
    "truncate-append-trunc": lambda o: (o.truncate("big", 10), o.write("file3", b"more", append=True),
                                        o.write("file4", b"t", trunc=True), o.truncate("file5", 100)),
    "rename-over-upper-dir-holding-whiteouts": lambda o: (o.unlink("m/a/f"), o.rename("lonely", "m/a")),
    "rename-dir-into-new-dir-and-back": lambda o: (o.mkdir("nd"), o.rename("ren/a", "nd/a"),
                                                    o.rename("nd/a", "ren/a"), o.rename("d", "nd/d")),
    "exchange-across-dirs": lambda o: (o.rename("ren/a", "p/a", RENAME_EXCHANGE),
                                       o.rename("e", "d/sub/f", RENAME_EXCHANGE)),
    "link-and-fifo-over-whiteouts": lambda o: (o.unlink("g1"), o.link("hl_src", "g1"), o.unlink("g2"),
                                               o.mkfifo("g2"), o.rmdir("empty"), o.symlink("x", "empty")),
    "deep-copy-up-parents": lambda o: (o.write("p/a/deep/new", b"n"), o.chmod("ren/a/x", 0o600),
                                       o.rename("p/a/deep", "p/deep2")),
    "rename-files": lambda o: (o.rename("file5", "d/sub/file5b"), o.rename("d/g", "g3"),
                               o.rename("file2", "file3")),
}


@needs_overlay
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_upper_matches_kernel(name: str, tmp_path: Path, kmounts: list[str]) -> None:
    run_both(tmp_path, kmounts, SCENARIOS[name])


# --- lookup conventions ---------------------------------------------------------------


@needs_root
def test_lookup_reads_every_whiteout_and_opaque_convention(tmp_path: Path) -> None:
    l1, l2, l3 = tmp_path / "l1", tmp_path / "l2", tmp_path / "l3"
    for rel in ("dev_wh", "file_wh", "x_wh", "opq_x/a", "opq_m/a", "keep", "opq_x_dir/a", "xdir/f"):
        put(l3, rel, rel)
    device_whiteout(l2, "dev_wh")
    put(l2, ".wh.file_wh")
    mkd(l2, "opq_x", xattrs={"trusted.overlay.opaque": b"y"})
    put(l2, "opq_x/b", "b")
    mkd(l2, "opq_m", xattrs={"user.overlay.opaque": b"y"})
    put(l1, "opq_m/.wh..wh..opq")  # the marker alone also makes it opaque
    mkd(l2, "xdir", xattrs={"trusted.overlay.opaque": b"x"})  # may hold xwhiteouts
    put(l2, "xdir/f", b"", xattrs={"trusted.overlay.whiteout": b""})
    put(l2, "xdir/own", "own")
    fs = UnionFS([str(l1), str(l2), str(l3)])
    try:
        m = Model(fs)
        assert m.ls() == ["keep", "opq_m", "opq_x", "opq_x_dir", "x_wh", "xdir"]
        assert m.ls("opq_x") == ["b"]
        assert m.ls("opq_m") == []
        assert m.ls("xdir") == ["own"]
        for hidden in ("dev_wh", "file_wh", ".wh.file_wh", "opq_x/a", "xdir/f"):
            assert not m.exists(hidden)
        # the same tree as the read-only view (which knows all but xwhiteouts)
        view = {e.path for e in LayerStack([str(l1), str(l2), str(l3)]).walk()}
        assert view - {"xdir/f"} == {p for p in model_tree(m)}
    finally:
        fs.destroy()


def test_bounded_lower_caches_evict_and_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With caches far smaller than the tree (16 listed directories, 64 fds), a walk evicts
    and re-reads lower directories and sees exactly what an unbounded walk sees, twice."""
    l1, l2, l3, upper, work = (tmp_path / n for n in ("l1", "l2", "l3", "upper", "work"))
    for i in range(12):
        for j in range(6):
            put(l3, f"d{i}/s{j}/low", f"{i}{j}")
            put(l2, f"d{i}/s{j}/mid", f"{i}{j}")
        device_whiteout(l2, f"d{i}/s0/low")
        mkd(l1, f"d{i}/s1", xattrs={"trusted.overlay.opaque": b"y"})
        put(l1, f"d{i}/s1/top", "top")
        put(l1, f"d{i}/.wh.s2")
    upper.mkdir()
    work.mkdir()
    layers = [str(l1), str(l2), str(l3)]

    def walk(capacity: str | None) -> list[dict[str, tuple[Any, ...]]]:
        if capacity is None:
            monkeypatch.delenv("LAYERFS_DIR_CACHE", raising=False)
        else:
            monkeypatch.setenv("LAYERFS_DIR_CACHE", capacity)
        fs = UnionFS(layers, str(upper), str(work))
        try:
            m = Model(fs)
            trees = [model_tree(m), model_tree(m)]
            before = _open_fds()
            trees.append(model_tree(m))
            assert _open_fds() <= before + 64
            return trees
        finally:
            fs.destroy()

    monkeypatch.setenv("LAYERFS_FD_CACHE", "64")
    small = walk("16")
    full = walk(None)
    assert small[0] == small[1] == small[2] == full[0]
    assert "d3/s0/low" not in full[0] and "d3/s1/top" in full[0] and "d3/s1/mid" not in full[0]
    assert "d3/s2" not in full[0] and "d3/s3/low" in full[0] and "d3/s3/mid" in full[0]


def _redirect_layers(base: Path) -> list[str]:
    """Lowers as committed from containers that renamed directories (redirects in lowers)."""
    l1, l2, l3 = base / "l1", base / "l2", base / "l3"
    put(l3, "a/x", "x")
    put(l3, "p/q/deep", "deep")
    put(l3, "p/other", "other")
    mkd(l2, "b", xattrs={"trusted.overlay.redirect": b"a"})  # a -> b in l2
    put(l2, "b/y", "y")
    device_whiteout(l2, "a")
    mkd(l2, "s", xattrs={"trusted.overlay.redirect": b"p"})  # p -> s in l2
    device_whiteout(l2, "p")
    mkd(l1, "z", xattrs={"trusted.overlay.redirect": b"/s/q"})  # s/q -> z in l1 (through l2's redirect)
    device_whiteout(l1, "s/q")
    mkd(l1, "w", xattrs={"trusted.overlay.redirect": b"/b"})
    device_whiteout(l1, "b")
    return [str(l1), str(l2), str(l3)]


@needs_overlay
def test_redirects_in_lower_layers_match_kernel(tmp_path: Path, kmounts: list[str]) -> None:
    lowers = _redirect_layers(tmp_path)
    fs = UnionFS(lowers)
    try:
        mine = model_tree(Model(fs))
    finally:
        fs.destroy()
    target = tmp_path / "mnt"
    target.mkdir()
    kmounts.append(str(target))
    kernel.mount(MountSpec.overlay(lowers, extra=["redirect_dir=on", "index=off"]), str(target))
    try:
        theirs = kernel_tree(target)
    finally:
        kernel.unmount(str(target), detach=True)
    assert mine == theirs
    assert {"z/deep", "w/x", "w/y", "s/other"} <= set(mine)


@needs_overlay
def test_opaque_markers_on_layer_roots_count_for_nothing(tmp_path: Path, kmounts: list[str]) -> None:
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    put(l2, "below", "below")
    put(l1, "above", "above")
    os.setxattr(l1, "trusted.overlay.opaque", b"y")
    for d in ("u", "w"):
        (tmp_path / d).mkdir()
    os.setxattr(tmp_path / "u", "trusted.overlay.opaque", b"y")
    fs = new_union(tmp_path, [str(l1), str(l2)])
    try:
        mine = model_tree(Model(fs))
    finally:
        fs.destroy()
    with overlay(kmounts, tmp_path, [str(l1), str(l2)], tmp_path / "mnt") as mnt:
        assert kernel_tree(mnt) == mine
    assert set(mine) == {"above", "below"}


@needs_root
def test_readdir_offsets_are_stable(tmp_path: Path) -> None:
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    for i in range(300):
        put(l1 if i % 2 else l2, f"dir/f{i:03}", str(i))
    fs = new_union(tmp_path, [str(l1), str(l2)])
    try:
        m = Model(fs)
        d = m.ino("dir")
        for i in range(0, 20):
            ModelOps(m).write(f"dir/new{i}", b"n")
        whole = m.entries(d)
        names = [n for n, _ in whole]
        assert len(names) == len(set(names)) == 320
        assert b"." not in names and b".." not in names
        fh = fs.opendir(d)
        try:
            first = fs.readdir(fh, 0)
            assert 0 < len(first) < 320  # served in chunks
            fs.unlink(d, b"f150")  # changes after opendir do not shift offsets
            rest = fs.readdir(fh, 100)
            listed = [e.name for e in first[:100]] + [e.name for e in rest]
            off = rest[-1].next_offset
            while batch := fs.readdir(fh, off):
                listed += [e.name for e in batch]
                off = batch[-1].next_offset
            assert listed == [n for n in names if n != b"f150"]
            assert fs.readdir(fh, off) == []
        finally:
            fs.releasedir(fh)
    finally:
        fs.destroy()


# --- inode numbers --------------------------------------------------------------------


@needs_root
def test_st_ino_stable_across_copy_up_rename_and_remount(tmp_path: Path) -> None:
    lowers = base_layers(tmp_path)
    l2 = Path(lowers[1])
    real_file = os.lstat(l2 / "file").st_ino
    real_d = os.lstat(Path(lowers[0]) / "d").st_ino  # the top one of a merged directory
    fs = new_union(tmp_path, lowers)
    try:
        m, o = Model(fs), ModelOps(Model(fs))
        assert m.attr("").st_ino == ROOT_INODE
        assert m.attr("file").st_ino == real_file and m.attr("file").immutable
        assert m.attr("d").st_ino == real_d and m.attr("d").st_nlink == 1  # merged: nlink 1
        assert m.attr("d").immutable  # ... before and after a copy-up
        lonely = m.attr("lonely")
        assert lonely.st_nlink == 2 and not lonely.immutable  # one layer: real count, until copy-up
        fs.drain_invalidations()
        ModelOps(m).write("lonely/new", b"n")
        assert m.attr("lonely").st_nlink == 1  # merged now, as the kernel reports it
        assert fs.drain_invalidations() == [lonely.st_ino]  # a change behind the kernel's back
        o.chmod("file", 0o600)
        o.write("d/sub/f", b"changed")
        o.rename("d", "d2")
        o.write("newfile", b"n")
        o.link("newfile", "newlink")
        assert not m.attr("file").immutable
        assert m.attr("file").st_ino == real_file
        assert m.attr("d2").st_ino == real_d
        ino_f, ino_new = m.attr("d2/sub/f").st_ino, m.attr("newfile").st_ino
        assert ino_f == os.lstat(l2 / "d/sub/f").st_ino
        assert ino_new == os.lstat(tmp_path / "u/newfile").st_ino == m.attr("newlink").st_ino
    finally:
        fs.destroy()
    fs = new_union(tmp_path, lowers)  # a remount of the same layers
    try:
        m = Model(fs)
        assert (m.attr("file").st_ino, m.attr("d2").st_ino) == (real_file, real_d)
        assert (m.attr("d2/sub/f").st_ino, m.attr("newfile").st_ino) == (ino_f, ino_new)
    finally:
        fs.destroy()


@needs_overlay
def test_st_ino_of_files_the_kernel_copied_up(tmp_path: Path, kmounts: list[str]) -> None:
    lowers = base_layers(tmp_path)
    for d in ("u", "w"):
        (tmp_path / d).mkdir()
    with overlay(kmounts, tmp_path, lowers, tmp_path / "mnt") as mnt:
        os.chmod(mnt / "file", 0o600)
        kernel_ino = os.lstat(mnt / "file").st_ino
    fs = new_union(tmp_path, lowers)
    try:
        # read from the kernel's own origin record (struct ovl_fb)
        assert Model(fs).attr("file").st_ino == kernel_ino == os.lstat(Path(lowers[1]) / "file").st_ino
    finally:
        fs.destroy()


# --- paths and names ------------------------------------------------------------------


def _deep_tree(root: Path, depth: int, comp: str) -> None:
    """root/comp/comp/.../leaf, built with dir fds (the path is longer than PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(comp, dir_fd=fd)
            nxt = os.open(comp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"deep")
        os.close(leaf)
    finally:
        os.close(fd)


@needs_overlay
def test_paths_longer_than_path_max(tmp_path: Path, kmounts: list[str]) -> None:
    comp = "c" * 200
    l1 = tmp_path / "l1"
    l1.mkdir()
    _deep_tree(l1, 30, comp)  # 30 * 201 bytes: over 6000 bytes below the layer root
    deep = "/".join([comp] * 30)
    assert len(deep) > 4096
    fs = new_union(tmp_path, [str(l1)])
    try:
        m, o = Model(fs), ModelOps(Model(fs))
        assert m.read(deep + "/leaf") == b"deep"
        o.write(deep + "/leaf", b"DEEP")  # copies up 30 parents, then the file
        o.write(deep + "/new", b"new")
        o.mkdir(deep + "/newdir")
        leaf_ino = m.attr(deep + "/leaf").st_ino
        # a redirect of ~2000 bytes: the kernel says EXDEV past redirect_max (256); we write it
        o.rename("/".join([comp] * 10), "mid")
        # ~5000 bytes do not fit in an ext4 xattr (one block): the directory is copied up
        o.rename("mid/" + "/".join([comp] * 15), "far")
        tail = "far/" + "/".join([comp] * 5)
        assert m.read(tail + "/leaf") == b"DEEP" and m.attr(tail + "/leaf").st_ino == leaf_ino
        assert m.ls("mid") == [comp]
    finally:
        fs.destroy()
    assert os.getxattr(tmp_path / "u/mid", "trusted.overlay.redirect") == b"/" + "/".join([comp] * 10).encode()
    assert os.getxattr(tmp_path / "u/far", "trusted.overlay.opaque") == b"y"
    fs = new_union(tmp_path, [str(l1)])
    try:
        m = Model(fs)
        assert m.ls(tail) == ["leaf", "new", "newdir"]
        assert m.read(tail + "/leaf") == b"DEEP" and m.attr(tail + "/leaf").st_ino == leaf_ino
        assert m.ls("mid/" + comp) == [comp]
        mine = model_tree(m)
    finally:
        fs.destroy()
    # the kernel reads both (it follows the long redirect it would not have written)
    with overlay(kmounts, tmp_path, [str(l1)], tmp_path / "mnt") as mnt:
        assert _fd_tree(mnt) == {p for p in mine}


def _fd_tree(root: Path) -> set[str]:
    """Every path below ``root``, walked with dir fds (paths longer than PATH_MAX)."""
    out: set[str] = set()
    stack = [(os.open(root, os.O_RDONLY | os.O_DIRECTORY), "")]
    while stack:
        fd, rel = stack.pop()
        try:
            for name in os.listdir(fd):
                path = f"{rel}/{name}".lstrip("/")
                out.add(path)
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    stack.append((os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), path))
        finally:
            os.close(fd)
    return out


@needs_root
def test_name_max(tmp_path: Path) -> None:
    fs = new_union(tmp_path, base_layers(tmp_path))
    try:
        m, o = Model(fs), ModelOps(Model(fs))
        ok, long = "n" * 255, "n" * 256
        o.write(ok, b"x")
        o.mkdir("d/" + ok)
        assert m.read(ok) == b"x"
        for call in (lambda: o.write(long), lambda: o.mkdir(long), lambda: m.ino(long),
                     lambda: o.rename("file", long), lambda: o.symlink("t", long)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.ENAMETOOLONG
    finally:
        fs.destroy()


# --- files ----------------------------------------------------------------------------


@needs_root
def test_open_then_unlinked_file_stays_usable(tmp_path: Path) -> None:
    fs = new_union(tmp_path, base_layers(tmp_path))
    try:
        m, o = Model(fs), ModelOps(Model(fs))
        o.write("upperfile", b"abc")
        lower_ino, upper_ino = m.ino("file"), m.ino("upperfile")
        rd = fs.open(lower_ino, os.O_RDONLY)
        rw = fs.open(upper_ino, os.O_RDWR)
        fs.unlink(ROOT_INODE, b"file")
        fs.unlink(ROOT_INODE, b"upperfile")
        assert not m.exists("file") and not m.exists("upperfile")
        assert fs.read(rd, 0, 100) == b"filefilefile"
        fs.write(rw, 3, b"def")
        assert fs.read(rw, 0, 100) == b"abcdef"
        # as the kernel: the real file's count, so 0 for the upper one and 1 for the lower one
        assert fs.getattr(upper_ino).st_nlink == 0 and fs.getattr(lower_ino).st_nlink == 1
        assert fs.getattr(upper_ino).st_size == 6
        fs.setattr(upper_ino, SetAttr(mode=0o600), rw, Ctx())  # through the handle
        assert stat.S_IMODE(fs.getattr(upper_ino).st_mode) == 0o600
        fs.release(rd)
        fs.release(rw)
        assert (tmp_path / "u/file").is_char_device() and not (tmp_path / "u/upperfile").exists()
    finally:
        fs.destroy()


@needs_root
def test_hardlink_counts_across_copy_up_and_remount(tmp_path: Path) -> None:
    lowers = base_layers(tmp_path)
    fs = new_union(tmp_path, lowers)
    try:
        m, o = Model(fs), ModelOps(Model(fs))
        o.link("hl_src", "d/hl2")
        a, b = m.attr("hl_src"), m.attr("d/hl2")
        assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
        assert m.ino("hl_src") == m.ino("d/hl2")  # one inode, two names
        o.write("d/hl2", b"changed", trunc=True)
        assert m.read("hl_src") == b"changed"
    finally:
        fs.destroy()
    fs = new_union(tmp_path, lowers)
    try:
        m, o = Model(fs), ModelOps(Model(fs))
        assert m.attr("hl_src").st_nlink == 2 and m.attr("hl_src").st_ino == m.attr("d/hl2").st_ino
        o.unlink("hl_src")
        assert m.attr("d/hl2").st_nlink == 1
    finally:
        fs.destroy()


def test_lower_hardlinks_stay_one_file_across_copy_up_and_remount(tmp_path: Path) -> None:
    """The names of a lower hardlink are one inode (one st_ino); writing one copies it up
    once and links the copy at every other visible name (not at a whited-out one), so the
    names stay one file after a remount too, with the lower inode's number."""
    lower = tmp_path / "lower"
    put(lower, "a", b"one\n")
    mkd(lower, "d")
    os.link(lower / "a", lower / "d" / "b")
    os.link(lower / "a", lower / "gone")
    fix_times(lower)
    lowers = [str(lower)]
    ino = os.stat(lower / "a").st_ino
    fs = new_union(tmp_path, lowers)
    try:
        m, o = Model(fs), ModelOps(Model(fs))
        assert m.attr("a").st_ino == m.attr("d/b").st_ino == ino and m.attr("a").st_nlink == 3
        o.unlink("gone")
        o.write("d/b", b"two\n", trunc=True)
        assert m.read("a") == b"two\n" and m.attr("a").st_nlink == 2
        assert m.attr("a").st_ino == m.attr("d/b").st_ino == ino
    finally:
        fs.destroy()
    upper = tmp_path / "u"
    assert os.stat(upper / "a").st_ino == os.stat(upper / "d" / "b").st_ino
    assert os.stat(upper / "a").st_nlink == 3  # the two names and the index entry
    fs = new_union(tmp_path, lowers)
    try:
        m, o = Model(fs), ModelOps(Model(fs))
        assert m.attr("a").st_ino == m.attr("d/b").st_ino == ino
        o.write("a", b"three\n", trunc=True)
        assert m.read("d/b") == b"three\n"
    finally:
        fs.destroy()


@needs_root
def test_open_flags_append_trunc_excl(tmp_path: Path) -> None:
    fs = new_union(tmp_path, base_layers(tmp_path))
    try:
        m = Model(fs)
        fh = fs.open(m.ino("file"), os.O_WRONLY | os.O_APPEND)
        assert fs.write(fh, 0, b"+") == 1  # O_APPEND: appended whatever the offset
        fs.release(fh)
        assert m.read("file") == b"filefilefile+"
        fh = fs.open(m.ino("big"), os.O_WRONLY | os.O_TRUNC)
        assert fs.getattr(m.ino("big")).st_size == 0  # copied up without its data
        fs.write(fh, 0, b"small")
        fs.release(fh)
        assert m.read("big") == b"small"
        for name in (b"file2", b"d"):
            with pytest.raises(FileExistsError):
                fs.create(ROOT_INODE, name, 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, Ctx())
        fh, attr = fs.create(ROOT_INODE, b"fresh", 0o666, os.O_RDWR, Ctx())
        assert stat.S_IMODE(attr.st_mode) == 0o644 and attr.st_nlink == 1
        fs.write(fh, 0, b"hi")
        assert fs.read(fh, 0, 10) == b"hi"
        fs.release(fh)
        ro = fs.open(m.ino("file2"), os.O_RDONLY)
        with pytest.raises(OSError) as e:
            fs.write(ro, 0, b"x")
        assert e.value.errno == errno.EBADF
        fs.release(ro)
    finally:
        fs.destroy()


@needs_root
def test_read_only_handle_sees_copy_up(tmp_path: Path) -> None:
    fs = new_union(tmp_path, base_layers(tmp_path))
    try:
        m = Model(fs)
        ro = fs.open(m.ino("file3"), os.O_RDONLY)
        assert fs.read(ro, 0, 4) == b"file"
        ModelOps(m).write("file3", b"FILE")  # a write-open copies up
        assert fs.read(ro, 0, 4) == b"FILE"  # as the kernel since 4.19
        fs.release(ro)
    finally:
        fs.destroy()


@needs_root
def test_copy_up_of_large_sparse_file_releases_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    l1 = tmp_path / "l1"
    l1.mkdir()
    with open(l1 / "sparse", "wb") as f:
        f.seek(64 << 20)
        f.write(os.urandom(3 << 20))
    os.utime(l1 / "sparse", ns=(T0, T0 + 1))
    put(l1, "other", "other")
    fs = new_union(tmp_path, [str(l1)])
    from layerfs.union import copyup

    inside, go_on = threading.Event(), threading.Event()
    real_copy = copyup.copy_data

    def slow_copy(src: int, dst: int, length: int) -> None:
        inside.set()
        assert go_on.wait(10)
        real_copy(src, dst, length)

    monkeypatch.setattr(copyup, "copy_data", slow_copy)
    try:
        m = Model(fs)
        ino = m.ino("sparse")
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                fh = fs.open(ino, os.O_RDWR)
                fs.write(fh, 0, b"X")
                fs.release(fh)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        t = threading.Thread(target=writer)
        t.start()
        assert inside.wait(10)
        # the lock is free while the data moves: other requests go on
        assert m.read("other") == b"other" and m.ls() == ["other", "sparse"]
        go_on.set()
        t.join(10)
        assert not t.is_alive() and not errors
        st = os.lstat(tmp_path / "u/sparse")
        assert st.st_size == (67 << 20) and st.st_blocks * 512 < (8 << 20)  # the hole stayed a hole
        with open(tmp_path / "u/sparse", "rb") as f, open(l1 / "sparse", "rb") as g:
            f.seek(1)
            g.seek(1)
            assert f.read() == g.read()
    finally:
        fs.destroy()


@needs_root
def test_truncate_chmod_chown_utimens_copy_up(tmp_path: Path) -> None:
    fs = new_union(tmp_path, base_layers(tmp_path))
    try:
        m = Model(fs)
        ino = m.ino("esc")
        fs.setattr(ino, SetAttr(size=2), None, Ctx())
        assert m.read("esc") == b"es"
        up = tmp_path / "u/esc"
        st = os.lstat(up)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4751, 123, 456)
        assert os.getxattr(up, "trusted.overlay.overlay.foo") == b"1" and os.getxattr(up, "user.foo") == b"bar"
        assert "trusted.overlay.bogus" not in os.listxattr(up)  # overlay state is never copied
        fs.setattr(ino, SetAttr(uid=5, gid=6, mode=0o2755), None, Ctx())
        a = fs.getattr(ino)
        assert (a.st_uid, a.st_gid, stat.S_IMODE(a.st_mode)) == (5, 6, 0o2755)
        atime = fs.getattr(ino).st_atime_ns
        fs.setattr(ino, SetAttr(mtime_ns=T0 + 42), None, Ctx())
        a = fs.getattr(ino)
        assert a.st_mtime_ns == T0 + 42 and a.st_atime_ns == atime  # atime left alone (UTIME_OMIT)
        fs.setattr(ino, SetAttr(atime_ns=T0), None, Ctx())
        fs.setattr(ino, SetAttr(atime_now=True), None, Ctx())
        a = fs.getattr(ino)
        assert a.st_atime_ns > T0 and a.st_mtime_ns == T0 + 42
        with pytest.raises(IsADirectoryError):
            fs.setattr(m.ino("d"), SetAttr(size=0), None, Ctx())
    finally:
        fs.destroy()


# --- errors ---------------------------------------------------------------------------


def _errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(OSError) as e:
        call()
    return e.value.errno or 0


@needs_root
def test_rename_and_rmdir_errors(tmp_path: Path) -> None:
    fs = new_union(tmp_path, base_layers(tmp_path))
    try:
        m, o = Model(fs), ModelOps(Model(fs))
        assert _errno_of(lambda: o.rmdir("d")) == errno.ENOTEMPTY  # lower children
        o.mkdir("fresh")
        o.write("fresh/f")
        assert _errno_of(lambda: o.rmdir("fresh")) == errno.ENOTEMPTY  # upper child
        assert _errno_of(lambda: o.rmdir("file")) == errno.ENOTDIR
        assert _errno_of(lambda: o.unlink("d")) == errno.EISDIR
        assert _errno_of(lambda: o.unlink("nope")) == errno.ENOENT
        assert _errno_of(lambda: o.rename("d", "d/sub/in")) == errno.EINVAL
        assert _errno_of(lambda: o.rename("file", "d")) == errno.EISDIR
        assert _errno_of(lambda: o.rename("d", "file")) == errno.ENOTDIR
        assert _errno_of(lambda: o.rename("lonely", "d")) == errno.ENOTEMPTY
        assert _errno_of(lambda: o.rename("file", "file2", RENAME_NOREPLACE)) == errno.EEXIST
        assert _errno_of(lambda: o.rename("file", "nope", RENAME_EXCHANGE)) == errno.ENOENT
        assert _errno_of(lambda: o.rename("file", "x", 4)) == errno.EINVAL  # RENAME_WHITEOUT
        assert _errno_of(lambda: o.rename("file", "x", 3)) == errno.EINVAL
        assert _errno_of(lambda: o.mkdir("file")) == errno.EEXIST
        assert _errno_of(lambda: o.write(".wh.evil")) == errno.EINVAL  # reserved for whiteouts
        assert _errno_of(lambda: fs.mknod(ROOT_INODE, b"wh", stat.S_IFCHR | 0o644, 0, Ctx())) == errno.EPERM
        assert _errno_of(lambda: fs.link(m.ino("d"), ROOT_INODE, b"dl")) == errno.EPERM
        assert _errno_of(lambda: fs.readlink(m.ino("file"))) == errno.EINVAL
        o.link("file", "file_hl")
        o.rename("file", "file_hl")  # two names of one inode: nothing happens
        assert m.exists("file") and m.exists("file_hl")
        o.rename("file", "file")
        assert m.read("file") == b"filefilefile"
        o.unlink("e/x")
        o.rmdir("e")  # only whiteouts left in it: empty
        assert not m.exists("e") and (tmp_path / "u/e").is_char_device()
        assert not upper_snapshot(tmp_path / "u").keys() & {"e/x"}
    finally:
        fs.destroy()


@needs_root
def test_read_only_union_refuses_changes(tmp_path: Path) -> None:
    fs = UnionFS(base_layers(tmp_path))
    try:
        m, o = Model(fs), ModelOps(Model(fs))
        assert m.read("file") == b"filefilefile" and "d" in m.ls()
        assert m.attr("file").immutable
        changes: list[Callable[[], object]] = [
            lambda: o.write("new"), lambda: o.write("file", b"x"), lambda: o.mkdir("x"), lambda: o.unlink("file"),
            lambda: o.rmdir("empty"), lambda: o.rename("file", "x"), lambda: o.link("file", "x"),
            lambda: o.symlink("t", "x"), lambda: o.mkfifo("x"), lambda: o.chmod("file", 0o600),
            lambda: o.truncate("file", 0), lambda: o.setxattr("file", "user.x", b"1"),
            lambda: o.removexattr("esc", "user.foo"), lambda: fs.open(m.ino("file"), os.O_RDONLY | os.O_TRUNC),
        ]
        for change in changes:
            assert _errno_of(change) == errno.EROFS
        assert fs.statfs().f_namemax == 255
    finally:
        fs.destroy()


# --- xattrs, ownership, formats -------------------------------------------------------


@needs_root
def test_xattrs_hide_overlay_state_and_escape_user_names(tmp_path: Path) -> None:
    fs = new_union(tmp_path, base_layers(tmp_path))
    try:
        m = Model(fs)
        esc = m.ino("esc")
        assert sorted(fs.listxattr(esc)) == [b"trusted.overlay.foo", b"user.foo"]
        assert fs.getxattr(esc, b"trusted.overlay.foo") == b"1"
        assert _errno_of(lambda: fs.getxattr(esc, b"trusted.overlay.bogus")) == errno.ENODATA
        assert _errno_of(lambda: fs.getxattr(m.ino("opq"), b"trusted.overlay.opaque")) == errno.ENODATA
        assert _errno_of(lambda: fs.removexattr(esc, b"user.nope")) == errno.ENODATA
        assert not (tmp_path / "u/esc").exists()  # no copy-up for a missing attribute
        fs.setxattr(m.ino("file"), b"trusted.overlay.opaque", b"y", 0)  # a user's name, escaped
        st = os.lstat(tmp_path / "u/file")
        assert (st.st_atime_ns, st.st_mtime_ns) == (T0, T0 + 1)  # copy-up keeps times exactly
        assert os.getxattr(tmp_path / "u/file", "trusted.overlay.overlay.opaque") == b"y"
        assert fs.listxattr(m.ino("file")) == [b"trusted.overlay.opaque"]
        assert "trusted.overlay.layerfs.origin" in os.listxattr(tmp_path / "u/file")  # hidden record
        assert _errno_of(lambda: fs.setxattr(m.ino("file"), b"user.a", b"1", os.XATTR_REPLACE)) == errno.ENODATA
        # the other prefix is user data (as the kernel has it), but for the state names
        # every layerfs mount reads, whatever it writes
        fs.setxattr(m.ino("file"), b"user.overlay.x", b"1", 0)
        assert os.getxattr(tmp_path / "u/file", "user.overlay.x") == b"1"
        assert b"user.overlay.x" in fs.listxattr(m.ino("file"))
        assert _errno_of(lambda: fs.setxattr(m.ino("d"), b"user.overlay.opaque", b"y", 0)) == errno.EPERM
        assert _errno_of(lambda: fs.getxattr(m.ino("d"), b"user.overlay.opaque")) == errno.ENODATA
    finally:
        fs.destroy()


@needs_root
def test_new_entries_owner_mode_and_setgid(tmp_path: Path) -> None:
    lowers = base_layers(tmp_path)
    mkd(Path(lowers[0]), "sg", mode=0o2775, gid=777)
    fs = new_union(tmp_path, lowers)
    try:
        m = Model(fs)
        ctx = Ctx(uid=1000, gid=1000, umask=0o027)
        a = fs.mkdir(ROOT_INODE, b"mine", 0o777, ctx)
        assert (a.st_uid, a.st_gid, stat.S_IMODE(a.st_mode)) == (1000, 1000, 0o750)
        sg = m.ino("sg")
        a = fs.mkdir(sg, b"sub", 0o777, ctx)
        assert (a.st_gid, stat.S_IMODE(a.st_mode)) == (777, 0o2750)  # group and setgid inherited
        _, a = fs.create(sg, b"f", 0o4777, os.O_WRONLY, ctx)
        assert (a.st_uid, a.st_gid, stat.S_IMODE(a.st_mode)) == (1000, 777, 0o4750)
        a = fs.symlink(sg, b"l", b"target", ctx)
        assert (a.st_uid, a.st_gid, stat.S_IMODE(a.st_mode)) == (1000, 777, 0o777)
        a = fs.mknod(ROOT_INODE, b"fifo", stat.S_IFIFO | 0o666, 0, ctx)
        assert stat.S_ISFIFO(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o640
    finally:
        fs.destroy()


@needs_root
def test_file_whiteout_format(tmp_path: Path) -> None:
    lowers = base_layers(tmp_path)
    fs = new_union(tmp_path, lowers, fmt=whiteout.UNPRIVILEGED_FILES)
    try:
        m, o = Model(fs), ModelOps(Model(fs))
        o.unlink("file")
        o.rmdir("empty")
        o.mkdir("empty")
        o.rename("ren/a", "ren/b")
        o.unlink("g1")
        o.write("g1", b"back")
        tree = model_tree(m)
    finally:
        fs.destroy()
    u = tmp_path / "u"
    assert (u / ".wh.file").is_file() and not (u / "file").exists()
    assert os.getxattr(u / "empty", "user.overlay.opaque") == b"y" and (u / "empty/.wh..wh..opq").exists()
    assert os.getxattr(u / "ren/b", "user.overlay.redirect") == b"a" and (u / "ren/.wh.a").exists()
    assert (u / "g1").read_bytes() == b"back" and not (u / ".wh.g1").exists()
    # a fresh model and the read-only view read the same tree back
    fs = new_union(tmp_path, lowers, fmt=whiteout.UNPRIVILEGED_FILES)
    try:
        assert model_tree(Model(fs)) == tree
    finally:
        fs.destroy()
    assert {e.path for e in LayerStack([str(u), *lowers]).walk()} == set(tree)


# --- lifecycle ------------------------------------------------------------------------


@needs_root
def test_lookup_counts_and_forget(tmp_path: Path) -> None:
    fs = new_union(tmp_path, base_layers(tmp_path))
    try:
        ino = fs.lookup(ROOT_INODE, b"file").st_ino
        assert fs.lookup(ROOT_INODE, b"file").st_ino == ino
        fs.forget(ino, 1)
        fs.getattr(ino)  # one reference left
        fs.forget(ino, 1)
        assert _errno_of(lambda: fs.getattr(ino)) == errno.ESTALE
        assert fs.lookup(ROOT_INODE, b"file").st_ino == ino  # the same number again
        fs.forget(ROOT_INODE, 100)
        fs.getattr(ROOT_INODE)  # the root is never forgotten
    finally:
        fs.destroy()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_root
def test_destroy_closes_every_fd(tmp_path: Path) -> None:
    lowers = base_layers(tmp_path)
    before = _open_fds()
    fs = new_union(tmp_path, lowers)
    m, o = Model(fs), ModelOps(Model(fs))
    model_tree(m)
    o.write("d/sub/f", b"x")
    fs.open(m.ino("file"), os.O_RDONLY)  # left open on purpose
    fs.opendir(m.ino("d"))
    assert _open_fds() > before
    fs.destroy()
    fs.destroy()  # idempotent
    assert _open_fds() == before


@needs_root
def test_threads_share_one_model(tmp_path: Path) -> None:
    fs = new_union(tmp_path, base_layers(tmp_path))
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            m, o = Model(fs), ModelOps(Model(fs))
            o.mkdir(f"t{n}")
            for i in range(30):
                o.write(f"t{n}/f{i}", b"%d" % i)
                assert m.read(f"t{n}/f{i}") == b"%d" % i
                o.rename(f"t{n}/f{i}", f"t{n}/g{i}")
            o.write("d/sub/f", b"shared")  # everyone copies up the same file
            assert len(m.ls(f"t{n}")) == 30
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        assert Model(fs).read("d/sub/f") == b"shared"
    finally:
        fs.destroy()


def test_inode_numbers_fold_devices_and_avoid_collisions() -> None:
    from layerfs.union.inodes import FRESH_BASE, InodeTable, Node, parse_kernel_origin

    table = InodeTable(primary_dev=10, on_drop=lambda n: None)
    assert table.number_for(10, 1234) == 1234  # the usual case: all layers on one filesystem
    other = table.number_for(11, 1234)
    assert other != 1234 and other == table.number_for(11, 1234)  # folded, deterministically
    a, b, c = Node(0o100000, None, b""), Node(0o100000, None, b""), Node(0o100000, None, b"")
    table.register(a, 1234)
    table.register(b, 1234)  # taken: a fresh number
    table.register(c, 1)  # the root's: never handed out
    assert a.number == 1234 and b.number >= FRESH_BASE and c.number >= FRESH_BASE and b.number != c.number
    # the kernel's origin handle: struct ovl_fb with an ext4 FILEID_INO32_GEN file id
    fh = bytes([0, 0xFB, 29, 0, 1]) + bytes(16) + (2212146).to_bytes(4, "little") + bytes(4)
    assert parse_kernel_origin(fh) == 2212146
    assert parse_kernel_origin(fh[:-1]) is None and parse_kernel_origin(b"junk") is None


@needs_root
def test_workdir_garbage_is_removed_at_start(tmp_path: Path) -> None:
    lowers = base_layers(tmp_path)
    mkd(tmp_path, "w/work/#dead.1/sub", mode=0o700)
    put(tmp_path, "w/work/#dead.2", "half a copy-up")
    fs = new_union(tmp_path, lowers)
    try:
        assert os.listdir(tmp_path / "w/work") == []
    finally:
        fs.destroy()


@pytest.mark.parametrize("volatile", [False, True])
def test_volatile_skips_fsync_of_upper_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             volatile: bool) -> None:
    """overlayfs' ``volatile``: fsync and fdatasync of upper files never reach the disk."""
    from layerfs.union.api import ROOT_INODE, Ctx
    from layerfs.union.fs import UnionFS

    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    fs = UnionFS([str(lower)], upper=str(upper), work=str(work), volatile=volatile)
    try:
        calls: list[str] = []
        monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
        monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append("fdatasync"))
        fh, _attr = fs.create(ROOT_INODE, b"f", 0o644, os.O_WRONLY, Ctx(0, 0, 0o022))
        fs.write(fh, 0, b"data")
        fs.fsync(fh, False)
        fs.fsync(fh, True)
        fs.release(fh)
        assert calls == ([] if volatile else ["fsync", "fdatasync"])
        assert (upper / "f").read_bytes() == b"data"
    finally:
        fs.destroy()
