"""layerfs.layer.changes: per-layer A/C/D, the deterministic OCI layer tar, and tree_diff."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import xxhash

from layerfs.layer.changes import (
    Change,
    fingerprint,
    layer_changes,
    layer_tar_digest,
    tree_diff,
    write_layer_tar,
)
from layerfs.union.view import LayerStack
from tests.support.markers import needs_root

T0 = 1_600_000_000 * 10**9  # a fixed mtime in ns


def mk(root: Path, rel: str, data: bytes = b"", mode: int = 0o644) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    p.chmod(mode)
    return p


def mkdir(root: Path, rel: str, mode: int = 0o755) -> Path:
    p = root / rel
    p.mkdir(parents=True, exist_ok=True)
    p.chmod(mode)
    return p


def wh(root: Path, rel: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(p, stat.S_IFCHR, 0)


def freeze_times(root: Path, ns: int = T0) -> None:
    """Same mtime for every entry, children before parents (creating a child bumps its dir)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(ns, ns), follow_symlinks=False)
    os.utime(root, ns=(ns, ns))


def changes(*pairs: str) -> list[Change]:
    return sorted(Change(p.split(" ", 1)[1], p.split(" ", 1)[0]) for p in pairs)


# --- layer_changes -----------------------------------------------------------------------


@needs_root
def test_layer_changes_every_kind(tmp_path: Path) -> None:
    lower, layer = tmp_path / "lower", tmp_path / "layer"
    mk(lower, "etc/passwd", b"root")
    mk(lower, "etc/hosts", b"localhost")
    mk(lower, "usr/bin/ls", b"ls")
    mk(lower, "usr/bin/cat", b"cat")
    mk(lower, "var/log/syslog", b"x")
    mk(lower, "var/keep", b"x")
    freeze_times(lower)

    mk(layer, "etc/passwd", b"root\nuser")  # C
    mk(layer, "etc/new", b"n")  # A
    wh(layer, "etc/hosts")  # D (file)
    mk(layer, "usr/bin/ls", b"ls2")  # C; usr and usr/bin keep their metadata: not reported
    wh(layer, "var/log")  # D (dir): only the directory itself
    wh(layer, "var/nothere")  # nothing below: not reported
    mk(layer, "newdir/sub/f", b"f")  # A, A, A
    freeze_times(layer)
    os.utime(layer / "etc", ns=(T0 + 10**9, T0 + 10**9))  # a changed directory mtime

    assert layer_changes(str(layer), [str(lower)]) == changes(
        "C /etc",
        "D /etc/hosts",
        "A /etc/new",
        "C /etc/passwd",
        "A /newdir",
        "A /newdir/sub",
        "A /newdir/sub/f",
        "C /usr/bin/ls",
        "D /var/log",
    )


@needs_root
def test_layer_changes_whiteout_through_several_lowers(tmp_path: Path) -> None:
    bottom, middle, layer = tmp_path / "bottom", tmp_path / "middle", tmp_path / "layer"
    mk(bottom, "a", b"1")
    mk(bottom, "b", b"1")
    wh(middle, "b")  # already deleted below
    wh(layer, "a")
    wh(layer, "b")
    assert layer_changes(str(layer), [str(middle), str(bottom)]) == changes("D /a")


def test_layer_changes_without_lowers_all_added(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    mk(layer, "d/f")
    mk(layer, ".wh.gone")  # a marker with nothing below
    assert layer_changes(str(layer), []) == changes("A /d", "A /d/f")


@needs_root
def test_opaque_dir_hides_lower_children(tmp_path: Path) -> None:
    lower, layer = tmp_path / "lower", tmp_path / "layer"
    mk(lower, "app/a")
    mk(lower, "app/b")
    mk(lower, "app/c/x")
    mk(lower, "app/c/y")
    freeze_times(lower)
    mk(layer, "app/b", b"new")
    mk(layer, "app/d")
    mk(layer, "app/c/y")  # under an opaque dir: app/c does not merge with the lower app/c
    freeze_times(layer)
    os.setxattr(layer / "app", "trusted.overlay.opaque", b"y")
    assert layer_changes(str(layer), [str(lower)]) == changes(
        "C /app",
        "D /app/a",
        "C /app/b",
        "C /app/c",
        "D /app/c/x",
        "C /app/c/y",
        "A /app/d",
    )


def test_file_convention_markers(tmp_path: Path) -> None:
    lower, layer = tmp_path / "lower", tmp_path / "layer"
    mk(lower, "a")
    mk(lower, "b/old")
    mk(lower, "c")
    freeze_times(lower)
    mk(layer, ".wh.a", mode=0)
    mk(layer, ".wh.zzz", mode=0)  # nothing below
    mk(layer, "b/.wh..wh..opq", mode=0)
    mk(layer, "b/new")
    freeze_times(layer)
    assert layer_changes(str(layer), [str(lower)]) == changes("D /a", "C /b", "A /b/new", "D /b/old")


def test_type_changes(tmp_path: Path) -> None:
    lower, layer = tmp_path / "lower", tmp_path / "layer"
    mk(lower, "x")
    mk(lower, "y/child")
    mk(layer, "x/f")
    mk(layer, "y")
    assert layer_changes(str(layer), [str(lower)]) == changes("C /x", "A /x/f", "C /y")


def test_dir_metadata_changes(tmp_path: Path) -> None:
    lower, layer = tmp_path / "lower", tmp_path / "layer"
    for d in ("same", "mode", "xattr", "private"):
        mkdir(lower, d)
        mkdir(layer, d)
    (layer / "mode").chmod(0o700)
    os.setxattr(layer / "xattr", "user.note", b"v")
    os.setxattr(layer / "private", "user.overlay.origin", b"v")  # overlay-private: ignored
    freeze_times(lower)
    freeze_times(layer)
    assert layer_changes(str(layer), [str(lower)]) == changes("C /mode", "C /xattr")


# --- write_layer_tar -----------------------------------------------------------------------

BIN = b"\xff\x00\x80bin\xc3"


def build_rich_tree(root: Path, reverse: bool = False) -> None:
    """A layer using every feature the tar writer converts; ``reverse`` changes creation order."""
    steps = [
        lambda: mk(root, "etc/passwd", b"root:x:0:0\n"),
        lambda: mk(root, "usr/bin/su", b"#!su", mode=0o4755),
        lambda: mk(root, "usr/bin/a", b"linked"),
        lambda: os.symlink("../etc/passwd", root / "usr" / "pw"),
        lambda: os.mkfifo(root / "fifo"),
        lambda: os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3)),
        lambda: os.mknod(root / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 0)),
        lambda: wh(root, "etc/gone"),
        lambda: mk(root, "var/.wh.old", mode=0),
        lambda: mkdir(root, "opq"),
        lambda: mk(root, "opq/inside"),
        lambda: mk(root, "opf/.wh..wh..opq", mode=0),
        lambda: mk(root, "opf/z"),
        lambda: mk(root, "-early"),  # sorts before '.': the opaque marker still follows its dir
        lambda: mk(root, "opq/-first"),
    ]
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    for step in reversed(steps) if reverse else steps:
        step()
    os.link(root / "usr" / "bin" / "a", root / "usr" / "bin" / "b")
    os.link(root / "usr" / "bin" / "a", root / "etc" / "c")
    os.setxattr(root / "opq", "trusted.overlay.opaque", b"y")
    os.setxattr(root / "etc" / "passwd", "user.bin", BIN)
    os.setxattr(root / "etc" / "passwd", "trusted.meta", b"t")
    os.setxattr(root / "etc" / "passwd", "trusted.overlay.origin", b"secret")
    os.setxattr(root / "etc" / "passwd", "user.overlay.origin", b"secret")
    os.chown(root / "usr" / "bin" / "su", 1000, 1001)
    (root / "usr" / "bin" / "su").chmod(0o4755)  # after chown, which clears setuid
    for p in (root, *root.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    freeze_times(root)


def tar_bytes(layer: Path) -> bytes:
    out = io.BytesIO()
    write_layer_tar(str(layer), out)
    return out.getvalue()


def read_tar(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as tar:
        return tar.getmembers()


@needs_root
def test_tar_is_deterministic(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    build_rich_tree(one)
    first = tar_bytes(one)
    assert tar_bytes(one) == first
    os.utime(one / "etc" / "passwd", ns=(T0 + 5 * 10**9, T0))  # atime only
    assert tar_bytes(one) == first
    build_rich_tree(two, reverse=True)  # other inodes, other creation and listing order
    assert tar_bytes(two) == first
    digest, size = layer_tar_digest(str(one))
    assert (digest, size) == ("sha256:" + hashlib.sha256(first).hexdigest(), len(first))


@needs_root
def test_tar_contents(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    build_rich_tree(layer)
    data = tar_bytes(layer)
    members = read_tar(data)
    names = [m.name for m in members]
    by = {m.name: m for m in members}

    # the names as written: relative, no ./ prefix, directories with a trailing slash
    raw = {m.name: data[m.offset_data - 512 :][:100].rstrip(b"\0").decode() for m in members}
    assert raw["etc"] == "etc/" and raw["usr/bin"] == "usr/bin/" and raw["usr/bin/su"] == "usr/bin/su"
    assert not any(n.startswith(("./", "/")) for n in raw.values())
    assert names == [
        "-early",
        "etc",
        "etc/.wh.gone",
        "etc/c",
        "etc/passwd",
        "fifo",
        "loop",
        "null",
        "opf",
        "opf/.wh..wh..opq",
        "opf/z",
        "opq",
        "opq/.wh..wh..opq",
        "opq/-first",
        "opq/inside",
        "usr",
        "usr/bin",
        "usr/bin/a",
        "usr/bin/b",
        "usr/bin/su",
        "usr/pw",
        "var",
        "var/.wh.old",
    ]
    for marker in ("etc/.wh.gone", "var/.wh.old", "opq/.wh..wh..opq", "opf/.wh..wh..opq"):
        m = by[marker]
        assert (m.type, m.mode, m.uid, m.gid, m.size, m.mtime) == (tarfile.REGTYPE, 0, 0, 0, 0, T0 // 10**9)
    # hardlinks: the first path in order is the file, the others link to it
    assert by["etc/c"].isfile() and by["etc/c"].size == 6
    assert by["usr/bin/a"].islnk() and by["usr/bin/a"].linkname == "etc/c"
    assert by["usr/bin/b"].islnk() and by["usr/bin/b"].linkname == "etc/c"
    su = by["usr/bin/su"]
    assert (su.mode, su.uid, su.gid, su.uname, su.gname) == (0o4755, 1000, 1001, "", "")
    assert by["usr/pw"].issym() and by["usr/pw"].linkname == "../etc/passwd"
    assert by["fifo"].isfifo()
    assert by["null"].ischr() and (by["null"].devmajor, by["null"].devminor) == (1, 3)
    assert by["loop"].isblk() and (by["loop"].devmajor, by["loop"].devminor) == (7, 0)
    pw = by["etc/passwd"]
    xattrs = {k: v for k, v in pw.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    assert list(xattrs) == ["SCHILY.xattr.trusted.meta", "SCHILY.xattr.user.bin"]
    assert xattrs["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape") == BIN
    assert b"overlay." not in data and b"secret" not in data
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        f = tar.extractfile("etc/passwd")
        assert f is not None and f.read() == b"root:x:0:0\n"


def test_tar_file_convention_layer(tmp_path: Path) -> None:
    """An unprivileged store's layer: `.wh.` files pass through, the opq file is not doubled."""
    layer = tmp_path / "layer"
    mk(layer, ".wh.gone", mode=0)
    mk(layer, "d/.wh..wh..opq", mode=0)
    mk(layer, "d/f", b"x" * 70_000)
    mk(layer, ".wh..wh.plnk", mode=0)  # aufs' private dir name: not valid in an OCI tar
    freeze_times(layer)
    data = tar_bytes(layer)
    members = read_tar(data)
    assert [m.name for m in members] == [".wh.gone", "d", "d/.wh..wh..opq", "d/f"]
    assert members[3].size == 70_000
    assert len(data) % 10240 == 0


# --- tree_diff and fingerprint -------------------------------------------------------------


def test_fingerprint_path_and_fd(tmp_path: Path) -> None:
    p = mk(tmp_path, "f", b"a" * 3_000_000)
    expected = xxhash.xxh3_128(b"a" * 3_000_000).hexdigest()
    assert fingerprint(str(p)) == expected
    fd = os.open(p, os.O_RDONLY)
    try:
        os.lseek(fd, 10, os.SEEK_SET)
        assert fingerprint(fd) == expected
        assert os.lseek(fd, 0, os.SEEK_CUR) == 10  # position untouched
    finally:
        os.close(fd)
    os.symlink("f", tmp_path / "link")
    with pytest.raises(OSError):
        fingerprint(str(tmp_path / "link"))  # never follows a symlink


def base_tree(root: Path) -> None:
    mk(root, "same", b"same")
    mk(root, "content", b"aaaa")
    mk(root, "size", b"aaaa")
    mk(root, "mode")
    mk(root, "xattr")
    mk(root, "mtime", b"m")
    os.symlink("t1", root / "link")
    mk(root, "d/x")
    mk(root, "d/y")
    mk(root, "gone/deep/f")


def test_tree_diff(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    base_tree(a)
    base_tree(b)
    (b / "content").write_bytes(b"bbbb")  # same size, other bytes: only the fingerprint tells
    (b / "size").write_bytes(b"aaaaa")
    (b / "mode").chmod(0o600)
    os.setxattr(b / "xattr", "user.k", b"v")
    os.setxattr(b / "same", "user.overlay.origin", b"private")  # ignored
    os.utime(b / "mtime", ns=(T0, T0))  # ignored
    os.utime(b / "d", ns=(T0, T0))  # ignored
    (b / "link").unlink()
    os.symlink("t2", b / "link")
    (b / "d" / "x").unlink()  # d/x: file -> dir
    mk(b, "d/x/new")
    (b / "d" / "y").unlink()
    mk(b, "d/z")
    (b / "gone" / "deep" / "f").unlink()
    (b / "gone" / "deep").rmdir()
    (b / "gone").rmdir()
    mk(b, "gone")  # dir -> file
    assert tree_diff(LayerStack([a]), LayerStack([b])) == changes(
        "C /content",
        "C /d/x",
        "A /d/x/new",
        "D /d/y",
        "A /d/z",
        "C /gone",
        "D /gone/deep",
        "D /gone/deep/f",
        "C /link",
        "C /mode",
        "C /size",
        "C /xattr",
    )
    assert tree_diff(LayerStack([b]), LayerStack([a]))[:3] == changes("C /content", "C /d/x", "D /d/x/new")
    assert tree_diff(LayerStack([a]), LayerStack([a])) == []


def test_tree_diff_sibling_order_and_whole_dirs(tmp_path: Path) -> None:
    """`a/b` and `a-c` sort differently by string and by tree order; the merge must not care."""
    a, b = tmp_path / "a", tmp_path / "b"
    mk(a, "a/b")
    mk(a, "a-c")
    mk(b, "a-c")
    mk(b, "a/b")
    mk(b, "new/sub/f")
    assert tree_diff(LayerStack([a]), LayerStack([b])) == changes("A /new", "A /new/sub", "A /new/sub/f")
    assert tree_diff(LayerStack([b]), LayerStack([a])) == changes("D /new", "D /new/sub", "D /new/sub/f")


@needs_root
def test_tree_diff_over_stacks_with_shared_layers(tmp_path: Path) -> None:
    base, upper = tmp_path / "base", tmp_path / "upper"
    mk(base, "etc/passwd", b"root")
    mk(base, "bin/sh", b"sh")
    mknull = base / "dev"
    mknull.mkdir()
    os.mknod(mknull / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    mkdir(upper, "dev")
    os.mknod(upper / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    wh(upper, "bin/sh")
    mk(upper, "etc/group", b"g")
    assert tree_diff(LayerStack([base]), LayerStack([upper, base])) == changes(
        "D /bin/sh", "C /dev/null", "A /etc/group"
    )
