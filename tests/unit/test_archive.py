"""layerfs.layer.apply (safe layer tar application) and layerfs.layer.compression (bounded decompression).

The hostile corpus (tests/support/hostile_corpus.py) is applied in a sandbox; each case must be refused
with an error naming the offending entry, and nothing outside the layer may change. The golden
tests apply well-formed tars and check the resulting tree field by field.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from layerfs.digest import Digest, VerifyingReader
from layerfs.errors import InvalidArgument, LimitExceeded, UnsafeArchive
from layerfs.layer import compression
from layerfs.layer.apply import ApplyStats, apply_layer
from layerfs.layer.compression import Limits, detect, open_decompressed
from layerfs.union import whiteout
from layerfs.union.whiteout import PRIVILEGED, UNPRIVILEGED_FILES, LayerFormat
from tests.support.hostile_corpus import (
    ANY,
    CASES,
    T0,
    Case,
    dev,
    dir_,
    fifo,
    gnu_sparse,
    gz,
    hard,
    make_sandbox,
    reg,
    snapshot,
    sym,
    tar,
    tar_bytes,
    zstd,
)
from tests.support.markers import needs_root

FORMATS = [
    pytest.param(PRIVILEGED, id="dev", marks=needs_root),
    pytest.param(UNPRIVILEGED_FILES, id="files"),
]


class OneWay:
    """A forward-only stream: no seek, no tell, reads of at most what was asked."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)
        self.closed = False
        self.largest_read = 0
        self.consumed = 0

    def read(self, n: int = -1) -> bytes:
        self.largest_read = max(self.largest_read, n)
        data = self._buf.read(n)
        self.consumed += len(data)
        return data

    def seek(self, *a: object) -> int:
        raise io.UnsupportedOperation("seek")

    def tell(self) -> int:
        raise io.UnsupportedOperation("tell")

    def close(self) -> None:
        self.closed = True


def apply(data: bytes, dest: Path, **kw: object) -> ApplyStats:
    return apply_layer(OneWay(data), str(dest), **kw)  # type: ignore[arg-type]


# -- the hostile corpus ------------------------------------------------------------------------


def _corpus_params() -> list[object]:
    out = []
    for case in CASES:
        fmts = [PRIVILEGED, UNPRIVILEGED_FILES] if case.limits is None else [PRIVILEGED]
        for fmt in fmts:
            root = case.needs_root or fmt is PRIVILEGED
            marks = [needs_root] if root else []
            out.append(
                pytest.param(
                    case, fmt, id=f"{case.id}-{'dev' if fmt.device_whiteouts else 'files'}", marks=marks
                )
            )
    return out


def test_corpus_is_large_and_distinct() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


@pytest.mark.parametrize(("case", "fmt"), _corpus_params())
def test_hostile(case: Case, fmt: LayerFormat, tmp_path: Path) -> None:
    sb = make_sandbox(tmp_path)
    if case.lower is not None:
        case.lower(sb)
    data = case.build(sb)
    before = snapshot(sb.root, exclude=sb.dest)
    lowers = [str(sb.lower)] if case.lower is not None else []
    with pytest.raises(UnsafeArchive) as info:
        stream = OneWay(data)
        src = open_decompressed(stream, "layer", case.limits) if case.limits is not None else stream
        apply_layer(src, str(sb.dest), lowers=lowers, fmt=fmt, what="layer")  # type: ignore[arg-type]
        # as the importer does: the rest of the stream is drained (and so fully checked)
        while src.read(1 << 16):
            pass
    exc = info.value
    expected = case.entry(sb) if callable(case.entry) else case.entry
    if expected is ANY:
        assert exc.entry is None or repr(exc.entry) in str(exc)
    else:
        assert exc.entry == expected, str(exc)
        if expected is not None:
            assert repr(expected) in str(exc)
    assert str(exc).startswith("layer: ")
    if case.id.startswith(("gzip-bomb", "zstd-bomb")):
        assert isinstance(exc, LimitExceeded)
    assert snapshot(sb.root, exclude=sb.dest) == before, "something outside the layer changed"


# -- golden trees ----------------------------------------------------------------------------


def describe(root: Path) -> dict[str, tuple[object, ...]]:
    """path -> (kind, mode, uid, gid, nlink, content | target | rdev, xattrs) of every entry."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                extra = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            xattrs = {
                n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)
            }
            kind_name = {
                stat.S_IFREG: "f",
                stat.S_IFDIR: "d",
                stat.S_IFLNK: "l",
                stat.S_IFIFO: "p",
                stat.S_IFCHR: "c",
                stat.S_IFBLK: "b",
            }[kind]
            out[str(p.relative_to(root))] = (
                kind_name,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_nlink,
                extra,
                xattrs,
            )
    return out


CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # cap_net_raw+ep
BIN = b"\x00\xff\x80 binary\x00"
BIG = os.urandom(3 << 20)  # more than one copy buffer


def _x(value: bytes) -> str:
    """A PAX xattr value as tarfile wants it: str carrying the bytes via surrogateescape."""
    return value.decode("utf-8", "surrogateescape")


@needs_root
def test_golden_every_kind(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    data = tar(
        dir_("./", mode=0o755, mtime=T0 + 1),
        dir_("etc", mtime=T0 + 100),
        reg("etc/passwd", b"root:x:0:0\n"),
        reg("etc/.wh.shadow"),
        dir_("home/user", mode=0o700, uid=1000, gid=1000),
        reg("home/user/.profile", b"PS1=$\n", mode=0o600, uid=1000, gid=1000),
        reg("bin/busybox", b"\x7fELF", mode=0o755),
        hard("bin/ls", "bin/busybox"),
        hard("bin/cat", "./bin/busybox"),
        hard("/bin/echo", "/bin/busybox"),
        sym("bin/sh", "busybox"),
        sym("abs", "/etc/passwd", uid=1000, gid=1000),
        sym("dangling", "../../../nowhere"),
        reg("bin/su", b"su", mode=0o4755),
        reg("bin/wall", b"wall", mode=0o2755, gid=5),
        dir_("tmp", mode=0o1777),
        fifo("run/fifo", mode=0o620),
        dev("dev/null", "c", 1, 3, mode=0o666),
        dev("dev/sda", "b", 8, 0, mode=0o660, gid=6),
        reg(
            "caps/ping",
            b"ping",
            mode=0o755,
            pax={"SCHILY.xattr.security.capability": _x(CAP), "SCHILY.xattr.user.bin": _x(BIN)},
        ),
        dir_("xd", pax={"SCHILY.xattr.user.dir": "x", "SCHILY.xattr.trusted.t": _x(BIN)}),
        reg("var/.wh..wh..opq"),
        reg("var/lib/x", b"x"),
        dir_("opt"),
        reg("opt/a", b"a"),
        reg("opt/.wh..wh..opq"),
        reg("dup", b"one", mode=0o644),
        reg("dup", b"two", mode=0o600),
        reg("fd", b"file first"),
        dir_("fd", mode=0o711),
        reg("fd/child", b"c"),
        dir_("df"),
        reg("df/child", b"c"),
        reg("df", b"file last"),
        dir_("dd", mode=0o755),
        reg("dd/keep", b"k"),
        dir_("dd", mode=0o750, uid=1000, gid=1000),
        reg("precise", b"p", pax={"mtime": "1600000000.123456789", "atime": "1500000000.5"}),
        reg("big", BIG),
        reg("empty"),
    )
    stats = apply(data, dest)
    p = os.lstat(dest / "precise")  # before describe() reads it (and relatime moves atime)
    assert (p.st_mtime_ns, p.st_atime_ns) == (1600000000123456789, 1500000000500000000)
    tree = describe(dest)
    root_dirs = {
        "etc",
        "home",
        "home/user",
        "bin",
        "tmp",
        "run",
        "dev",
        "caps",
        "xd",
        "var",
        "var/lib",
        "opt",
        "fd",
        "dd",
    }
    opq = {"trusted.overlay.opaque": b"y"}
    expected = {
        "etc": ("d", 0o755, 0, 0, 2, None, {}),
        "etc/passwd": ("f", 0o644, 0, 0, 1, b"root:x:0:0\n", {}),
        "etc/shadow": ("c", 0o000, 0, 0, 1, (0, 0), {}),
        "home": ("d", 0o755, 0, 0, 3, None, {}),
        "home/user": ("d", 0o700, 1000, 1000, 2, None, {}),
        "home/user/.profile": ("f", 0o600, 1000, 1000, 1, b"PS1=$\n", {}),
        "bin": ("d", 0o755, 0, 0, 2, None, {}),
        "bin/busybox": ("f", 0o755, 0, 0, 4, b"\x7fELF", {}),
        "bin/ls": ("f", 0o755, 0, 0, 4, b"\x7fELF", {}),
        "bin/cat": ("f", 0o755, 0, 0, 4, b"\x7fELF", {}),
        "bin/echo": ("f", 0o755, 0, 0, 4, b"\x7fELF", {}),
        "bin/sh": ("l", 0o777, 0, 0, 1, "busybox", {}),
        "abs": ("l", 0o777, 1000, 1000, 1, "/etc/passwd", {}),
        "dangling": ("l", 0o777, 0, 0, 1, "../../../nowhere", {}),
        "bin/su": ("f", 0o4755, 0, 0, 1, b"su", {}),
        "bin/wall": ("f", 0o2755, 0, 5, 1, b"wall", {}),
        "tmp": ("d", 0o1777, 0, 0, 2, None, {}),
        "run": ("d", 0o755, 0, 0, 2, None, {}),
        "run/fifo": ("p", 0o620, 0, 0, 1, None, {}),
        "dev": ("d", 0o755, 0, 0, 2, None, {}),
        "dev/null": ("c", 0o666, 0, 0, 1, (1, 3), {}),
        "dev/sda": ("b", 0o660, 0, 6, 1, (8, 0), {}),
        "caps": ("d", 0o755, 0, 0, 2, None, {}),
        "caps/ping": ("f", 0o755, 0, 0, 1, b"ping", {"security.capability": CAP, "user.bin": BIN}),
        "xd": ("d", 0o755, 0, 0, 2, None, {"user.dir": b"x", "trusted.t": BIN}),
        "var": ("d", 0o755, 0, 0, 3, None, opq),
        "var/lib": ("d", 0o755, 0, 0, 2, None, {}),
        "var/lib/x": ("f", 0o644, 0, 0, 1, b"x", {}),
        "opt": ("d", 0o755, 0, 0, 2, None, opq),
        "opt/a": ("f", 0o644, 0, 0, 1, b"a", {}),
        "dup": ("f", 0o600, 0, 0, 1, b"two", {}),
        "fd": ("d", 0o711, 0, 0, 2, None, {}),
        "fd/child": ("f", 0o644, 0, 0, 1, b"c", {}),
        "df": ("f", 0o644, 0, 0, 1, b"file last", {}),
        "dd": ("d", 0o750, 1000, 1000, 2, None, {}),
        "dd/keep": ("f", 0o644, 0, 0, 1, b"k", {}),
        "precise": ("f", 0o644, 0, 0, 1, b"p", {}),
        "big": ("f", 0o644, 0, 0, 1, BIG, {}),
        "empty": ("f", 0o644, 0, 0, 1, b"", {}),
    }
    assert set(tree) == set(expected)
    for path, want in expected.items():
        assert tree[path] == want, path
    # times: every explicit entry keeps its own; directories too, though children came later
    st = os.lstat(dest)
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o755, (T0 + 1) * 10**9)
    for path in (
        set(expected) - {"etc", "precise", "etc/shadow"} - (root_dirs - {"tmp", "xd", "opt", "fd", "dd"})
    ):
        assert os.lstat(dest / path).st_mtime_ns == T0 * 10**9, path
    assert os.lstat(dest / "etc").st_mtime_ns == (T0 + 100) * 10**9
    assert os.lstat(dest / "home/user").st_mtime_ns == T0 * 10**9
    unique = [
        b"root:x:0:0\n",
        b"PS1=$\n",
        b"\x7fELF",
        b"su",
        b"wall",
        b"ping",
        b"x",
        b"a",
        b"two",
        b"c",
        b"file last",
        b"k",
        b"p",
        BIG,
    ]
    assert stats == ApplyStats(entries=40, size=sum(map(len, unique)))


def _tree_fmt(dest: Path, fmt: LayerFormat) -> dict[str, str]:
    """path -> 'file' | 'dir' | 'dir+opaque' | 'whiteout' in the given format's terms."""
    out = {}
    for path, (kind, _m, _u, _g, _n, extra, xattrs) in describe(dest).items():
        name = os.path.basename(path)
        if kind == "c" and extra == (0, 0):
            out[path] = "whiteout"
        elif kind == "d":
            out[path] = "dir+opaque" if xattrs.get(fmt.opaque_xattr) == b"y" else "dir"
        elif not fmt.device_whiteouts and name == whiteout.OPAQUE_MARKER:
            continue  # checked through the xattr
        elif not fmt.device_whiteouts and name.startswith(whiteout.WHITEOUT_PREFIX):
            out[os.path.join(os.path.dirname(path), name[4:])] = "whiteout"
        else:
            out[path] = {"f": "file", "l": "link", "p": "fifo"}.get(str(kind), str(kind))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_whiteout_semantics(fmt: LayerFormat, tmp_path: Path) -> None:
    data = tar(
        reg("kept", b"x"),
        reg(".wh.kept"),  # only lower layers are hidden: the file stays
        dir_("d"),
        reg("d/c", b"c"),
        reg(".wh.d"),  # a directory of this layer stays, opaque
        reg(".wh.y"),
        reg("y", b"y"),  # an entry after a whiteout replaces it
        reg(".wh.z"),
        dir_("z"),  # a directory replacing a whiteout: opaque (the lower one was deleted)
        reg(".wh.p"),
        reg("p/q", b"q"),  # so is an implicit parent
        reg(".wh.w"),
        reg(".wh.w"),
        reg("sub/.wh.gone"),
        dev("cw", "c", 0, 0),  # an overlay whiteout already: written in the store's format
        reg("m/.wh..wh..opq"),  # marker first, directory entry later
        dir_("m", mode=0o700),
        reg("m/child", b"m"),
        reg("late/child", b"l"),
        reg("late/.wh..wh..opq"),  # marker after the children
        reg(".wh..wh..opq"),  # the root itself
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    apply(data, dest, fmt=fmt)
    assert _tree_fmt(dest, fmt) == {
        "kept": "file",
        "d": "dir+opaque",
        "d/c": "file",
        "y": "file",
        "z": "dir+opaque",
        "p": "dir+opaque",
        "p/q": "file",
        "w": "whiteout",
        "sub": "dir",
        "sub/gone": "whiteout",
        "cw": "whiteout",
        "m": "dir+opaque",
        "m/child": "file",
        "late": "dir+opaque",
        "late/child": "file",
    }
    assert whiteout.is_opaque(str(dest))
    assert stat.S_IMODE(os.lstat(dest / "m").st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(dest / "p").st_mode) == 0o755
    if not fmt.device_whiteouts:
        for d in ("d", "z", "p", "m", "late", ""):
            assert (dest / d / whiteout.OPAQUE_MARKER).is_file()
        assert not (dest / ".wh.y").exists() and not (dest / "y").is_char_device()


@needs_root
def test_whiteout_device_is_0_0(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    apply(tar(reg("a/.wh.b")), dest)
    st = os.lstat(dest / "a/b")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and whiteout.is_whiteout_stat(st)


@pytest.mark.parametrize("fmt", FORMATS)
def test_overlay_private_xattrs_never_enter(fmt: LayerFormat, tmp_path: Path) -> None:
    private = {
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.trusted.overlay.redirect": "/elsewhere",
        "SCHILY.xattr.user.overlay.opaque": "y",
        "SCHILY.xattr.user.overlay.origin": _x(BIN),
    }
    dest = tmp_path / "dest"
    dest.mkdir()
    apply(
        tar(dir_("d", pax={**private, "SCHILY.xattr.user.ok": "1"}), reg("f", b"f", pax=private)),
        dest,
        fmt=fmt,
    )
    for p in (dest / "d", dest / "f"):
        names = os.listxattr(p, follow_symlinks=False)
        assert not [n for n in names if whiteout.is_overlay_private_xattr(n)]
    assert os.getxattr(dest / "d", "user.ok") == b"1"
    assert not whiteout.is_opaque(str(dest / "d"))


def test_xattr_values_are_binary_safe(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    weird = bytes(range(256))  # every byte value, invalid UTF-8 included
    data = tar(
        reg("f", b"f", pax={"SCHILY.xattr.user.bin": _x(BIN), "SCHILY.xattr.user.all": _x(weird)}),
        dir_("d", pax={"SCHILY.xattr.user.bin": _x(BIN)}),
        sym("s", "f", pax={"SCHILY.xattr.user.bin": _x(BIN)}),  # user.* cannot go on a symlink: dropped
    )
    apply(data, dest, fmt=UNPRIVILEGED_FILES)
    assert os.getxattr(dest / "f", "user.bin") == BIN
    assert os.getxattr(dest / "f", "user.all") == weird
    assert os.getxattr(dest / "d", "user.bin") == BIN
    assert os.listxattr(dest / "s", follow_symlinks=False) == []


@needs_root
def test_xattrs_on_symlinks_and_specials(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    x = {"SCHILY.xattr.trusted.x": _x(BIN)}
    apply(tar(sym("s", "/etc/passwd", pax=x), fifo("p", pax=x), dev("n", pax=x)), dest)
    for name in ("s", "p", "n"):
        assert os.getxattr(dest / name, "trusted.x", follow_symlinks=False) == BIN
    assert b"trusted.x" not in os.listxattr("/etc/passwd")  # type: ignore[comparison-overlap]


@needs_root
def test_chown_then_chmod_keeps_setuid_and_caps(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    cap = {"SCHILY.xattr.security.capability": _x(CAP)}
    apply(tar(reg("suid", b"s", mode=0o6755, uid=1000, gid=1000, pax=cap)), dest)
    st = os.lstat(dest / "suid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o6755, 1000, 1000)
    assert os.getxattr(dest / "suid", "security.capability") == CAP


@needs_root
def test_implicit_parents_are_0755_root(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    apply(tar(dir_("g", mode=0o2775, gid=1000), reg("g/a/b/c", b"c", uid=7, gid=7)), dest)
    for d in ("g/a", "g/a/b"):
        st = os.lstat(dest / d)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0), d
    st = os.lstat(dest / "g/a/b/c")
    assert (st.st_uid, st.st_gid) == (7, 7)
    assert stat.S_IMODE(os.lstat(dest / "g").st_mode) == 0o2775


def test_directory_times_are_set_last(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    apply(
        tar(
            dir_("a", mtime=T0 + 1),
            dir_("a/b", mtime=T0 + 2),
            reg("a/b/c", b"c"),
            reg("a/b/.wh.gone"),
            dir_("a", mtime=T0 + 3),
            reg("a/late", b"l"),
        ),
        dest,
        fmt=UNPRIVILEGED_FILES,
    )
    for d, t in (("a", T0 + 3), ("a/b", T0 + 2)):
        st = os.lstat(dest / d)
        assert (st.st_mtime_ns, st.st_atime_ns) == (t * 10**9, t * 10**9)


def test_metadata_of_removed_directories_is_forgotten(tmp_path: Path) -> None:
    data = tar(
        dir_("a/b", mode=0o700, mtime=T0 + 7),
        reg("a", b"file"),  # removes a and a/b
        dir_("a", mode=0o711),
        reg("a/b/c", b"c"),  # a/b again, implicit this time: 0755, not the old 0700
    )
    apply(data, tmp_path, fmt=UNPRIVILEGED_FILES)
    assert stat.S_IMODE(os.lstat(tmp_path / "a/b").st_mode) == 0o755
    assert os.lstat(tmp_path / "a/b").st_mtime_ns != (T0 + 7) * 10**9
    assert stat.S_IMODE(os.lstat(tmp_path / "a").st_mode) == 0o711


def test_deep_names_with_lowers(tmp_path: Path) -> None:
    lower, dest = tmp_path / "lower", tmp_path / "dest"
    deep = "/".join(["d"] * 300)
    (lower / deep).mkdir(parents=True)
    (lower / deep / "s").symlink_to("/")
    dest.mkdir()
    apply(
        tar(reg(deep + "/f", b"f"), reg(deep + "/t/g", b"g")),
        dest,
        lowers=[str(lower)],
        fmt=UNPRIVILEGED_FILES,
    )
    assert (dest / deep / "t/g").read_bytes() == b"g"
    with pytest.raises(UnsafeArchive, match="symlink in a lower layer"):
        apply(tar(reg(deep + "/s/x", b"x")), dest, lowers=[str(lower)], fmt=UNPRIVILEGED_FILES)


def test_readonly_directory_still_filled(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    apply(
        tar(dir_("ro", mode=0o555), reg("ro/f", b"f"), dir_("ro/sub", mode=0o500), reg("ro/sub/g", b"g")),
        dest,
        fmt=UNPRIVILEGED_FILES,
    )
    assert (dest / "ro/sub/g").read_bytes() == b"g"
    assert stat.S_IMODE(os.lstat(dest / "ro").st_mode) == 0o555
    os.chmod(dest / "ro", 0o755)  # let tmp_path cleanup in when not root
    os.chmod(dest / "ro/sub", 0o755)


def test_replacing_entries(tmp_path: Path) -> None:
    sb = make_sandbox(tmp_path)
    before = snapshot(sb.root, exclude=sb.dest)
    data = tar(
        sym("s", "../outside/victim"),
        hard("h", "s"),  # a hardlink to a symlink is a symlink
        reg("h", b"replaced"),  # replaces the link, writes nothing through it
        sym("t", "../outside/victim"),
        reg("t", b"t"),
        reg("f", b"f"),
        hard("g", "f"),
        reg("f", b"new f"),  # does not write through the other name
        dir_("d"),
        reg("d/x", b"x"),
        hard("d", "f"),  # a hardlink replacing a directory tree
        sym("e", "../outside"),
        dir_("e"),  # a directory replacing a symlink: written inside the layer
        reg("e/victim", b"mine"),
    )
    apply(data, sb.dest, fmt=UNPRIVILEGED_FILES)
    assert snapshot(sb.root, exclude=sb.dest) == before
    assert os.readlink(sb.dest / "s") == "../outside/victim"
    assert (sb.dest / "h").read_bytes() == b"replaced" and not (sb.dest / "h").is_symlink()
    assert (sb.dest / "t").read_bytes() == b"t"
    assert (sb.dest / "g").read_bytes() == b"f" and (sb.dest / "f").read_bytes() == b"new f"
    assert (sb.dest / "d").read_bytes() == b"new f" and os.lstat(sb.dest / "d").st_nlink == 2
    assert (sb.dest / "e/victim").read_bytes() == b"mine"


# -- lower layers ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_lower_symlink_replaced_explicitly_is_fine(fmt: LayerFormat, tmp_path: Path) -> None:
    sb = make_sandbox(tmp_path)
    (sb.lower / "etc").symlink_to("../outside")
    (sb.lower / "a").mkdir()
    (sb.lower / "a" / "etc").symlink_to("../../outside")
    (sb.lower / "usr").mkdir()
    (sb.lower / "usr" / "old").write_bytes(b"o")
    before = snapshot(sb.root, exclude=sb.dest)
    data = tar(
        dir_("etc"),  # this layer's directory hides the lower symlink
        reg("etc/victim", b"mine"),
        reg(".wh.etc2"),
        reg("a/.wh..wh..opq"),  # a is opaque here: the lower a/etc is not seen
        reg("a/etc/x", b"x"),
        reg("usr/new", b"n"),  # an implicit parent over a lower directory merges
    )
    apply(data, sb.dest, lowers=[str(sb.lower)], fmt=fmt)
    assert snapshot(sb.root, exclude=sb.dest) == before
    tree = _tree_fmt(sb.dest, fmt)
    assert tree["etc"] == "dir" and tree["usr"] == "dir" and tree["a/etc"] == "dir"
    assert (sb.dest / "etc/victim").read_bytes() == b"mine"


@pytest.mark.parametrize("fmt", FORMATS)
def test_lower_symlink_whited_out_first_is_fine(fmt: LayerFormat, tmp_path: Path) -> None:
    sb = make_sandbox(tmp_path)
    (sb.lower / "etc").symlink_to("../outside")
    apply(tar(reg(".wh.etc"), reg("etc/x", b"x")), sb.dest, lowers=[str(sb.lower)], fmt=fmt)
    assert _tree_fmt(sb.dest, fmt) == {"etc": "dir+opaque", "etc/x": "file"}


def test_lower_stack_order_matters(tmp_path: Path) -> None:
    top, bottom, dest = tmp_path / "top", tmp_path / "bottom", tmp_path / "dest"
    for d in (top, bottom, dest):
        d.mkdir()
    (bottom / "lib").symlink_to("/usr/lib")
    (top / "lib").mkdir()  # the upper lower layer turned it into a directory
    apply(tar(reg("lib/x", b"x")), dest, lowers=[str(top), str(bottom)], fmt=UNPRIVILEGED_FILES)
    (tmp_path / "dest2").mkdir()
    with pytest.raises(UnsafeArchive, match="symlink in a lower layer"):
        apply(
            tar(reg("lib/y", b"y")),
            tmp_path / "dest2",
            lowers=[str(bottom), str(top)],
            fmt=UNPRIVILEGED_FILES,
        )


# -- archive framing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data", [b"\0" * 1024, b"\0" * 10240, b"\0" * 512], ids=["eof", "record", "lone-zero-block"]
)
def test_empty_archives(data: bytes, tmp_path: Path) -> None:
    assert apply(data, tmp_path) == ApplyStats(0, 0)
    assert os.listdir(tmp_path) == []


def test_archive_without_end_blocks_is_accepted(tmp_path: Path) -> None:
    # Go's archive/tar (containerd, docker) accepts this; the diffID is what catches a cut blob
    data = tar_bytes([reg("a", b"a"), reg("b", b"b")], eof=False)
    assert apply(data, tmp_path, fmt=UNPRIVILEGED_FILES).entries == 2


def test_stream_is_left_open_and_drainable(tmp_path: Path) -> None:
    data = tar(reg("a", b"a" * 10000)) + b"\0" * 50000 + b"trailing"
    stream = OneWay(data)
    reader = VerifyingReader(stream, "layer", Digest.of(data), len(data))  # type: ignore[arg-type]
    apply_layer(reader, str(tmp_path), fmt=UNPRIVILEGED_FILES)
    assert not stream.closed
    reader.drain()
    assert reader.verify() == Digest.of(data)
    assert stream.largest_read <= 1 << 20


def test_gnu_and_ustar_formats(tmp_path: Path) -> None:
    long = "d" * 80 + "/" + "e" * 80 + "/" + "f" * 120
    for i, fmt in enumerate((tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT)):
        dest = tmp_path / str(i)
        dest.mkdir()
        name = long if fmt != tarfile.USTAR_FORMAT else "d" * 80 + "/" + "e" * 80
        apply(
            tar(reg(name, b"x"), sym("l", "t" * 200 if fmt != tarfile.USTAR_FORMAT else "t"), fmt=fmt),
            dest,
            fmt=UNPRIVILEGED_FILES,
        )
        assert (dest / name).read_bytes() == b"x"


def test_sparse_files_keep_holes(tmp_path: Path) -> None:
    size = 64 << 20
    data = gnu_sparse("sp", [(4096, b"a" * 10), (1 << 20, b"b" * 5000)], size)
    stats = apply(data, tmp_path, fmt=UNPRIVILEGED_FILES)
    st = os.lstat(tmp_path / "sp")
    assert st.st_size == size
    assert st.st_blocks * 512 < 1 << 20  # holes, not 64 MiB of zeros
    with open(tmp_path / "sp", "rb") as f:
        assert f.read(4106) == b"\0" * 4096 + b"a" * 10
        f.seek(1 << 20)
        assert f.read(5001) == b"b" * 5000 + b"\0"
    assert stats == ApplyStats(1, size)


def test_stats_count_each_inode_once(tmp_path: Path) -> None:
    data = tar(
        reg("a", b"12345"),
        hard("b", "a"),
        hard("c", "b"),
        reg("d", b"xx"),
        reg("d", b"yyy"),
        dir_("e"),
        reg("e/f", b"1"),
        reg("e", b"22"),
        sym("s", "a"),
        reg(".wh.gone"),
    )
    assert apply(data, tmp_path, fmt=UNPRIVILEGED_FILES) == ApplyStats(entries=10, size=5 + 3 + 2)


def test_error_names_entry_and_layer(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchive) as info:
        apply(tar(reg("ok", b"1"), reg("../bad", b"2")), tmp_path, what="sha256:abc", fmt=UNPRIVILEGED_FILES)
    assert info.value.entry == "../bad"
    assert str(info.value).startswith("sha256:abc: '../bad': ")


def test_dest_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(OSError):
        apply(tar(reg("a")), tmp_path / "link")


def test_unprivileged_devices_skipped_and_owners_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without root (simulated: EPERM from mknod and chown), devices are skipped and owners left."""

    def eperm(*a: object, **kw: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "mknod", eperm)
    monkeypatch.setattr(os, "chown", eperm)
    stats = apply(tar(dev("null"), reg("f", b"f", uid=0, gid=0), fifo("p")), tmp_path, fmt=UNPRIVILEGED_FILES)
    assert stats.entries == 3
    assert not (tmp_path / "null").exists()
    assert (tmp_path / "f").read_bytes() == b"f" and (tmp_path / "p").is_fifo()


@needs_root
def test_root_entry_metadata(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    apply(
        tar(reg("a", b"a"), dir_("./", mode=0o750, uid=1000, gid=1001, pax={"SCHILY.xattr.user.r": "1"})),
        dest,
    )
    st = os.lstat(dest)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o750, 1000, 1001, T0 * 10**9)
    assert os.getxattr(dest, "user.r") == b"1"


# -- compression -------------------------------------------------------------------------------


def test_detect() -> None:
    assert detect(gz(b"x")[:6]) == "gzip"
    assert detect(zstd(b"x")[:6]) == "zstd"
    assert detect(b"\x50\x2a\x4d\x18\x00\x00") == "zstd"  # a skippable frame first
    assert detect(tar(reg("a"))[:6]) == "plain"
    assert detect(b"") == "plain"
    for head in (b"BZh91A", b"\xfd7zXZ\x00"):
        with pytest.raises(UnsafeArchive, match="unsupported compression"):
            detect(head)


def test_limits_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERFS_MAX_LAYER_BYTES", raising=False)
    monkeypatch.delenv("LAYERFS_MAX_RATIO", raising=False)
    assert Limits.from_env() == Limits()
    monkeypatch.setenv("LAYERFS_MAX_LAYER_BYTES", "12345")
    monkeypatch.setenv("LAYERFS_MAX_RATIO", "7.5")
    lim = Limits.from_env()
    assert (lim.max_bytes, lim.max_ratio, lim.min_ratio_bytes) == (12345, 7.5, Limits().min_ratio_bytes)
    monkeypatch.setenv("LAYERFS_MAX_RATIO", "lots")
    with pytest.raises(InvalidArgument, match="LAYERFS_MAX_RATIO"):
        Limits.from_env()
    monkeypatch.setenv("LAYERFS_MAX_RATIO", "-1")
    with pytest.raises(InvalidArgument):
        Limits.from_env()


PAYLOAD = os.urandom(200_000) + b"z" * 300_000


@pytest.mark.parametrize(
    ("blob", "kind"),
    [
        (PAYLOAD, "plain"),
        (gz(PAYLOAD), "gzip"),
        (gz(PAYLOAD[:1000]) + gz(PAYLOAD[1000:]), "gzip"),  # multi-member
        (zstd(PAYLOAD), "zstd"),
        (zstd(PAYLOAD[:1000]) + zstd(PAYLOAD[1000:]), "zstd"),  # multi-frame
        (b"\x50\x2a\x4d\x18\x03\x00\x00\x00abc" + zstd(PAYLOAD), "zstd"),  # skippable frame
    ],
    ids=["plain", "gzip", "gzip-multi", "zstd", "zstd-multi", "zstd-skippable"],
)
def test_roundtrip(blob: bytes, kind: str) -> None:
    raw = OneWay(blob)
    r = open_decompressed(raw, "blob", Limits())  # type: ignore[arg-type]
    assert r.compression == kind
    out = b"".join(iter(lambda: r.read(7919), b""))
    assert out == PAYLOAD
    assert (r.decompressed_bytes, r.compressed_bytes) == (len(PAYLOAD), len(blob))
    assert raw.largest_read <= compression.CHUNK and not raw.closed


def test_reads_are_bounded_and_streaming() -> None:
    blob = b"p" * (32 << 20)
    raw = OneWay(blob)
    r = open_decompressed(raw, "blob", Limits())  # type: ignore[arg-type]
    assert len(r.read(4096)) == 4096
    assert raw.consumed < 1 << 20  # nothing read ahead beyond a chunk
    z = OneWay(zstd(blob))
    rz = open_decompressed(z, "blob", Limits(max_ratio=1e9))  # type: ignore[arg-type]
    assert len(rz.read(1 << 20)) == 1 << 20
    assert rz.decompressed_bytes == 1 << 20  # never more than asked for


def test_ratio_only_enforced_past_min_bytes() -> None:
    small = gz(b"\0" * (1 << 20))  # ratio ~1000:1, but only 1 MiB
    r = open_decompressed(io.BytesIO(small), "blob", Limits(max_ratio=10, min_ratio_bytes=2 << 20))
    assert len(r.read()) == 1 << 20
    r = open_decompressed(io.BytesIO(small), "blob", Limits(max_ratio=10, min_ratio_bytes=1 << 10))
    with pytest.raises(LimitExceeded, match="ratio"):
        r.read()


def test_plain_streams_obey_max_bytes() -> None:
    r = open_decompressed(io.BytesIO(b"x" * 5000), "blob", Limits(max_bytes=4096))
    with pytest.raises(LimitExceeded, match="blob: decompressed layer exceeds"):
        r.read()


@pytest.mark.parametrize("cut", [4, 10, 100, 1000, -100, -9, -1])
@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_truncation_detected(kind: str, cut: int) -> None:
    blob = gz(PAYLOAD) if kind == "gzip" else zstd(PAYLOAD)
    r = open_decompressed(io.BytesIO(blob[:cut]), "blob", Limits())
    with pytest.raises(UnsafeArchive, match=f"blob: corrupt or truncated {kind} stream"):
        r.read()


def test_underlying_errors_pass_through() -> None:
    class Failing(OneWay):
        def read(self, n: int = -1) -> bytes:
            if self.consumed > 100:
                raise OSError(5, "disk on fire")
            return super().read(min(n, 60))

    r = open_decompressed(Failing(gz(PAYLOAD)), "blob", Limits())  # type: ignore[arg-type]
    with pytest.raises(OSError, match="disk on fire"):
        r.read()


@pytest.mark.parametrize("compress", [gz, zstd, gzip.compress], ids=["gzip", "zstd", "gzip-default"])
def test_apply_compressed_layer(compress: object, tmp_path: Path) -> None:
    data = tar(dir_("a"), reg("a/b", BIG[:100_000]))
    blob = compress(data)  # type: ignore[operator]
    stream = open_decompressed(OneWay(blob), "layer", Limits())  # type: ignore[arg-type]
    stats = apply_layer(stream, str(tmp_path), fmt=UNPRIVILEGED_FILES)
    assert stats.size == 100_000
    assert hashlib.sha256((tmp_path / "a/b").read_bytes()).digest() == hashlib.sha256(BIG[:100_000]).digest()
