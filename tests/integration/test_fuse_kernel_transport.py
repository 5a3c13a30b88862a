"""The kernel FUSE transport of ``layerfs-fuse`` (``--transport kernel``): what is new.

What both transports share (union semantics, the program's lifecycle) is covered by the
conformance suite and ``test_fuse_program`` run with ``LAYERFS_FUSE_TRANSPORT=kernel``;
here: the wire format, and on real mounts what only this transport does -- the request
counters (``--stats``, written on SIGUSR1), kernel caching (a warm ``find`` sends the daemon
no READDIR and no LOOKUP; negative entries), passthrough (reads of a backing file never
reach the daemon), ``st_ino`` apart from the node id, and the daemon's end on unmount.

Every mount and daemon a test starts is recorded by the ``daemons`` fixture, whose
finalizer unmounts what is still mounted and fails the test if a daemon then outlives its
mount (it kills that one, by pid). Mounts need root, /dev/fuse and fusermount3 (skipped otherwise).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from layerfs.errors import UsageError
from layerfs.fuse import main as fuse_main
from layerfs.fuse import protocol as p
from layerfs.fuse import session
from layerfs.fuse.dispatch import Answer, CachePolicy, Dispatcher, Reply, Request
from layerfs.linux.mountinfo import mount_table
from layerfs.union.api import Attr, Ctx, DirEntry, SetAttr
from layerfs.union.fs import UnionFS

FUSERMOUNT = "/usr/bin/fusermount3"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount(2) of /dev/fuse, passthrough)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing"
    if not os.path.exists(FUSERMOUNT):
        return "fusermount3 not installed (Debian package fuse3)"
    return None


needs_fuse = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
pytestmark = pytest.mark.timeout(120)


class OffsetInoFS(UnionFS):
    """The real model, but every ``st_ino`` it reports is its inode number + ``OFFSET``
    (``Attr.inode`` keeps the number): the transport must show ``st_ino``, use ``inode``."""

    OFFSET = 1 << 40

    def _wrap(self, a: Attr) -> Attr:
        return dataclasses.replace(a, st_ino=a.st_ino + self.OFFSET, inode=a.st_ino)

    def lookup(self, parent: int, name: bytes) -> Attr:
        return self._wrap(super().lookup(parent, name))

    def getattr(self, inode: int) -> Attr:
        return self._wrap(super().getattr(inode))

    def setattr(self, inode: int, changes: SetAttr, fh: int | None, ctx: Ctx) -> Attr:
        return self._wrap(super().setattr(inode, changes, fh, ctx))

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        return self._wrap(super().mkdir(parent, name, mode, ctx))

    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Ctx) -> tuple[int, Attr]:
        fh, attr = super().create(parent, name, mode, flags, ctx)
        return fh, self._wrap(attr)

    def readdir(self, fh: int, offset: int) -> list[DirEntry]:
        return [DirEntry(e.name, self._wrap(e.attr), e.next_offset) for e in super().readdir(fh, offset)]


# --- no mount ----------------------------------------------------------------------------------


def test_wire_structs_have_the_kernels_sizes() -> None:
    assert (p.IN_HEADER.size, p.OUT_HEADER.size, p.ATTR.size, p.ENTRY_OUT.size) == (40, 16, 88, 128)
    assert (p.OPEN_OUT.size, p.INIT_OUT.size, p.SETATTR_IN.size, p.STATFS_OUT.size) == (16, 64, 88, 80)
    assert p.dirent_size(b"abc") == 32 and p.direntplus_size(b"abc") == 160
    rec = p.dirent(7, 3, stat.S_IFDIR | 0o755, b"abc")
    assert len(rec) == 32 and p.DIRENT.unpack_from(rec) == (7, 3, 3, 4) and rec[24:27] == b"abc"
    negative = p.negative_entry(2.5)
    assert p.ENTRY_OUT.unpack_from(negative)[:6] == (0, 0, 2, 0, 500_000_000, 0)
    note = p.inval_entry(5, b"name")
    assert p.OUT_HEADER.unpack_from(note) == (len(note), p.Notify.INVAL_ENTRY, 0) and note.endswith(b"name\0")
    assert p.op_name(1) == "LOOKUP" and p.op_name(999) == "OP_999"


def test_transport_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fuse_main.TRANSPORT_ENV, raising=False)
    monkeypatch.delenv(fuse_main.STATS_ENV, raising=False)
    opts = fuse_main.parse_args(["-o", "lowerdir=/l", "/mp"])
    assert not isinstance(opts, str) and (opts.transport, opts.passthrough, opts.stats) == ("kernel", "auto", None)
    assert opts.dir_cache == "on"
    opts = fuse_main.parse_args(["--transport", "pyfuse3", "--passthrough", "off", "--dir-cache", "off",
                                 "--stats", "s.json", "-o", "lowerdir=/l", "/mp"])
    assert not isinstance(opts, str) and (opts.transport, opts.passthrough, opts.dir_cache) == ("pyfuse3", "off", "off")
    assert opts.stats == os.path.abspath("s.json")
    monkeypatch.setenv(fuse_main.TRANSPORT_ENV, "pyfuse3")
    monkeypatch.setenv(fuse_main.STATS_ENV, "/tmp/x.json")
    opts = fuse_main.parse_args(["-o", "lowerdir=/l", "/mp"])
    assert not isinstance(opts, str) and (opts.transport, opts.stats) == ("pyfuse3", "/tmp/x.json")
    for bad in (["--transport", "libfuse"], ["--passthrough", "on"], ["--dir-cache", "auto"]):
        with pytest.raises(UsageError):
            fuse_main.parse_args([*bad, "-o", "lowerdir=/l", "/mp"])


class CountingFS(UnionFS):
    """Keeps the lookup count of every inode the way the kernel would see it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts: dict[int, int] = {}

    def _count(self, attr: Attr) -> Attr:
        self.counts[attr.st_ino] = self.counts.get(attr.st_ino, 0) + 1
        return attr

    def lookup(self, parent: int, name: bytes) -> Attr:
        return self._count(super().lookup(parent, name))

    def readdir(self, fh: int, offset: int) -> list[DirEntry]:
        entries = super().readdir(fh, offset)
        if self.readdir_counts_lookups:  # the model counted one lookup per entry returned
            for e in entries:
                self._count(e.attr)
        return entries

    def forget(self, inode: int, nlookup: int) -> None:
        self.counts[inode] = self.counts.get(inode, 0) - nlookup
        super().forget(inode, nlookup)


def _req(op: p.Op, nodeid: int, arg: bytes = b"") -> Request:
    return Request(1, op, nodeid, 0, 0, 0, arg)


def _body(answer: Answer) -> bytes:
    assert answer is not None
    return answer.body if isinstance(answer, Reply) else answer


def _entries(body: bytes, plus: bool) -> list[tuple[bytes, int, int, int]]:
    """(name, node id, ino, offset) of every record of a READDIR(PLUS) reply."""
    out = []
    at = 0
    while at < len(body):
        nodeid = p.ENTRY_OUT.unpack_from(body, at)[0] if plus else 0
        start = at + (p.ENTRY_OUT.size if plus else 0)
        ino, off, namelen, _ = p.DIRENT.unpack_from(body, start)
        name = body[start + p.DIRENT.size:start + p.DIRENT.size + namelen]
        out.append((name, nodeid, ino, off))
        at += p.direntplus_size(name) if plus else p.dirent_size(name)
    return out


@pytest.mark.parametrize("zero_message", [True, False], ids=["no-opendir", "opendir"])
def test_dispatcher_lists_in_pages_and_counts_one_lookup_per_entry(tmp_path: Path, zero_message: bool) -> None:
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    names = [f"entry-{i:03d}".encode() for i in range(150)]
    for n in names:
        (lower / "d" / os.fsdecode(n)).write_text("x")
    fs = CountingFS([str(lower)])
    try:
        d = Dispatcher(fs, CachePolicy(zero_message_opendir=zero_message))
        dnode = fs.lookup(1, b"d").st_ino
        if zero_message:
            with pytest.raises(OSError) as e:
                d.opendir(_req(p.Op.OPENDIR, dnode, p.OPEN_IN.pack(0, 0)))
            assert e.value.errno == errno.ENOSYS  # the kernel opens directories itself from now on
            fh = 0
        else:
            opened = d.opendir(_req(p.Op.OPENDIR, dnode, p.OPEN_IN.pack(0, 0)))
            fh, flags, _ = p.OPEN_OUT.unpack_from(_body(opened))
            assert flags == p.FOPEN_CACHE_DIR | p.FOPEN_KEEP_CACHE
        listed: list[bytes] = []
        offset, pages = 0, 0
        while True:  # READDIRPLUS pages of 4 KiB, then plain READDIR ones (READDIRPLUS_AUTO does that)
            op = p.Op.READDIRPLUS if pages < 3 else p.Op.READDIR
            handler = d.readdirplus if op == p.Op.READDIRPLUS else d.readdir
            body = _body(handler(_req(op, dnode, p.READ_IN.pack(fh, offset, 4096, 0, 0, 0, 0))))
            if not body:
                break
            assert len(body) <= 4096
            pages += 1
            for name, nodeid, ino, off in _entries(body, op == p.Op.READDIRPLUS):
                listed.append(name)
                offset = off
                if op == p.Op.READDIRPLUS and name not in (b".", b".."):
                    assert nodeid == ino and fs.counts[nodeid] == 1  # the kernel takes this lookup
                else:
                    assert nodeid == 0  # "." and "..", and plain entries: no lookup
        assert listed[:2] == [b".", b".."] and sorted(listed[2:]) == names and pages >= 4
        assert {c for n, c in fs.counts.items() if n != dnode} == {0, 1}  # nothing counted twice
        # rewinddir lists again from a fresh model handle; a reply the kernel never got is undone
        again = d.readdirplus(_req(p.Op.READDIRPLUS, dnode, p.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)))
        assert isinstance(again, Reply) and again.undo is not None
        nodes = [nodeid for _, nodeid, _, _ in _entries(again.body, True) if nodeid]
        assert all(fs.counts[n] >= 1 for n in nodes)
        before = {n: fs.counts[n] for n in nodes}
        again.undo()
        assert all(fs.counts[n] == before[n] - 1 for n in nodes)
        if zero_message:
            # two readers at once, each in a stream of its own; an unknown stream resumes anew
            first = _entries(_body(d.readdir(_req(p.Op.READDIR, dnode, p.READ_IN.pack(0, 0, 512, 0, 0, 0, 0)))),
                             False)
            second = _entries(_body(d.readdir(_req(p.Op.READDIR, dnode, p.READ_IN.pack(0, 0, 512, 0, 0, 0, 0)))),
                              False)
            assert [e[0] for e in first] == [e[0] for e in second]
            assert first[-1][3] >> 32 != second[-1][3] >> 32
            rest = _entries(_body(d.readdir(_req(p.Op.READDIR, dnode,
                                                 p.READ_IN.pack(0, first[-1][3], 1 << 20, 0, 0, 0, 0)))), False)
            gone = (12345 << 32) | (first[-1][3] & 0xFFFFFFFF)
            resumed = _entries(_body(d.readdir(_req(p.Op.READDIR, dnode, p.READ_IN.pack(0, gone, 1 << 20, 0, 0, 0, 0)))),
                               False)
            assert [e[0] for e in rest] == [e[0] for e in resumed] and len(first) + len(rest) == 152
        else:
            assert d.releasedir(_req(p.Op.RELEASEDIR, dnode, p.RELEASE_IN.pack(fh, 0, 0, 0))) == b""
        d.close()
    finally:
        fs.destroy()


def test_dispatcher_lookups_and_xattr_sizes(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_text("x")
    os.setxattr(lower / "f", "user.k", b"value")
    fs = CountingFS([str(lower)])
    try:
        d = Dispatcher(fs)
        found = d.lookup(_req(p.Op.LOOKUP, 1, b"f\0"))
        assert isinstance(found, Reply) and found.undo is not None
        nodeid, _, entry_valid, attr_valid = p.ENTRY_OUT.unpack_from(found.body)[:4]
        assert fs.counts[nodeid] == 1 and entry_valid == attr_valid == 3600  # lower-only: cached long
        found.undo()
        assert fs.counts[nodeid] == 0
        assert p.ENTRY_OUT.unpack_from(_body(d.lookup(_req(p.Op.LOOKUP, 1, b"f\0"))))[0] == nodeid
        negative = _body(d.lookup(_req(p.Op.LOOKUP, 1, b"nope\0")))
        assert p.ENTRY_OUT.unpack_from(negative)[:3] == (0, 0, 3600)
        getx = p.GETXATTR_IN.pack
        assert _body(d.getxattr(_req(p.Op.GETXATTR, nodeid, getx(0, 0) + b"user.k\0"))) == p.GETXATTR_OUT.pack(5, 0)
        assert _body(d.getxattr(_req(p.Op.GETXATTR, nodeid, getx(64, 0) + b"user.k\0"))) == b"value"
        with pytest.raises(OSError) as e:
            d.getxattr(_req(p.Op.GETXATTR, nodeid, getx(2, 0) + b"user.k\0"))
        assert e.value.errno == errno.ERANGE
        assert _body(d.listxattr(_req(p.Op.LISTXATTR, nodeid, getx(0, 0)))) == p.GETXATTR_OUT.pack(7, 0)
        assert _body(d.listxattr(_req(p.Op.LISTXATTR, nodeid, getx(7, 0)))) == b"user.k\0"
        attr = p.ATTR_OUT.unpack_from(_body(d.getattr(_req(p.Op.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0)))))
        assert attr[0] == 3600 and attr[3] == nodeid and attr[4] == 1  # valid, ino, size
    finally:
        fs.destroy()


# --- mounts ------------------------------------------------------------------------------------


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    return any(e.mount_point == real for e in mount_table())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@dataclasses.dataclass
class Daemon:
    mountpoint: Path
    pid: int
    stats_file: Path

    def stats(self) -> dict[str, Any]:
        """The daemon's counters, fresh (SIGUSR1, then wait for the file to appear)."""
        self.stats_file.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not self.stats_file.exists():
            assert time.monotonic() < deadline, "the daemon wrote no statistics"
            time.sleep(0.01)
        data: dict[str, Any] = json.loads(self.stats_file.read_text())
        return data

    def requests(self) -> dict[str, int]:
        counts: dict[str, int] = self.stats()["requests"]
        return counts


class Daemons:
    """Starts kernel-transport daemons and remembers them for cleanup."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[Daemon] = []

    def mount(self, lowers: list[Path], *, upper: bool = False, extra: tuple[str, ...] = ()) -> Daemon:
        n = len(self.started)
        mp = self.base / f"mp{n}"
        mp.mkdir()
        options = "lowerdir=" + ":".join(map(str, lowers))
        if upper:
            (self.base / f"upper{n}").mkdir()
            (self.base / f"work{n}").mkdir()
            options += f",upperdir={self.base / f'upper{n}'},workdir={self.base / f'work{n}'}"
        stats_file = self.base / f"stats{n}.json"
        r = subprocess.run([sys.executable, "-m", "layerfs.fuse.main", "--transport", "kernel", "--print-pid",
                            "--stats", str(stats_file), "--log", str(self.base / f"daemon{n}.log"), *extra,
                            "-o", options, str(mp)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        daemon = Daemon(mp, int(r.stdout.split()[-1]), stats_file)
        self.started.append(daemon)
        assert is_mounted(mp)
        return daemon

    def close(self) -> None:
        """Unmount what is still mounted; fail if a daemon outlives its mount (then kill it)."""
        left = []
        for d in self.started:
            if is_mounted(d.mountpoint):
                if subprocess.run([FUSERMOUNT, "-u", str(d.mountpoint)], capture_output=True).returncode != 0:
                    subprocess.run(["/usr/bin/umount", "-l", str(d.mountpoint)], capture_output=True)
            if not wait_gone(d.pid, 10):
                left.append(f"daemon {d.pid}")
                os.kill(d.pid, signal.SIGKILL)
                wait_gone(d.pid, 5)
            if is_mounted(d.mountpoint):
                left.append(f"mount {d.mountpoint}")
                subprocess.run(["/usr/bin/umount", "-l", str(d.mountpoint)], capture_output=True)
        assert not left, f"still there after unmounting: {left}"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(tmp_path)
    try:
        yield d
    finally:
        d.close()


def make_tree(root: Path, dirs: int = 20, files: int = 30) -> int:
    """``dirs`` directories of ``files`` small files each, one level down; returns the entry count."""
    for i in range(dirs):
        sub = root / f"d{i:02d}" / "sub"
        sub.mkdir(parents=True)
        for j in range(files):
            (sub / f"f{j:02d}").write_bytes(b"x" * j)
    return dirs * (files + 2)


def delta(after: dict[str, int], before: dict[str, int], *ops: str) -> dict[str, int]:
    return {op: after.get(op, 0) - before.get(op, 0) for op in ops}


@needs_fuse
@pytest.mark.parametrize("upper", [False, True], ids=["readonly", "writable"])
def test_a_warm_find_sends_no_readdir_and_no_lookup(tmp_path: Path, daemons: Daemons, upper: bool) -> None:
    lower = tmp_path / "lower"
    entries = make_tree(lower)
    d = daemons.mount([lower], upper=upper)
    assert d.stats()["init"]["granted"] and "readdirplus" in d.stats()["init"]["granted"]

    def find() -> list[str]:
        out = subprocess.run(["/usr/bin/find", str(d.mountpoint)], capture_output=True, text=True, check=True)
        return sorted(out.stdout.split())

    cold = find()
    assert len(cold) == entries + 1
    before = d.requests()
    assert before.get("READDIRPLUS", 0) > 0  # the cold find listed through the daemon
    assert find() == cold
    after = d.requests()
    assert delta(after, before, "READDIR", "READDIRPLUS", "LOOKUP") == {"READDIR": 0, "READDIRPLUS": 0, "LOOKUP": 0}
    if not upper:  # mounted read-only: listing a directory did not expire its atime either
        assert delta(after, before, "GETATTR") == {"GETATTR": 0}
    if upper:
        # a change through the mount drops the kernel's listing of that directory, and only that
        (d.mountpoint / "d03/sub/new").write_text("new\n")
        before = d.requests()
        assert "new" in os.listdir(d.mountpoint / "d03/sub") and len(find()) == entries + 2
        after = d.requests()
        # relisted: d03/sub, and of root and d03 what the copy-up gave a new mtime
        assert 1 <= delta(after, before, "READDIRPLUS")["READDIRPLUS"] <= 3


@needs_fuse
def test_sequential_reads_arrive_in_large_requests(tmp_path: Path, daemons: Daemons) -> None:
    """As root the daemon raises its mount's readahead window from the kernel's 128 KiB to
    one max_write (1 MiB): a sequential read of a lower file of a writable union (served by
    the daemon, not passthrough) takes a few large READs, not one per 128 KiB."""
    lower = tmp_path / "lower"
    lower.mkdir()
    data = os.urandom(8 << 20)
    (lower / "big").write_bytes(data)
    d = daemons.mount([lower], upper=True)
    dev = os.stat(d.mountpoint).st_dev
    window = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text().strip()
    assert window == str(session.MAX_WRITE // 1024)  # 1020: one page short of 1 MiB (splice)
    before = d.requests()
    assert (d.mountpoint / "big").read_bytes() == data
    reads = delta(d.requests(), before, "READ")["READ"]
    assert 1 <= reads <= 24, reads  # 64 with the kernel's default window


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A ``system.posix_acl_access`` value (version 2; entries: tag, perm, id)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
NOBODY = 65534


def _cat_as_nobody(path: Path) -> int:
    r = subprocess.run(["/usr/bin/setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "/bin/cat", str(path)], capture_output=True, text=True, timeout=30)
    return r.returncode


@needs_fuse
def test_posix_acls_are_enforced_as_on_kernel_overlayfs(daemons: Daemons) -> None:
    """Lower-layer ACLs decide access on the FUSE mount as on kernel overlayfs (FUSE_POSIX_ACL:
    the kernel checks them and caches them, so ``ls -l`` does not ask the daemon again)."""
    base = Path(tempfile.mkdtemp(prefix="layerfs-acl-"))
    try:
        base.chmod(0o755)
        lower = base / "lower"
        lower.mkdir()
        lower.chmod(0o755)
        granted, denied = lower / "granted", lower / "denied"
        granted.write_text("secret\n")
        granted.chmod(0o600)  # nobody may read it by mode alone; a named-user entry lets it
        os.setxattr(granted, "system.posix_acl_access",
                    _acl((ACL_USER_OBJ, 6, 0xFFFFFFFF), (ACL_USER, 4, NOBODY), (ACL_GROUP_OBJ, 0, 0xFFFFFFFF),
                         (ACL_MASK, 4, 0xFFFFFFFF), (ACL_OTHER, 0, 0xFFFFFFFF)))
        denied.write_text("public\n")
        denied.chmod(0o644)  # everyone may read it by mode; a named-user entry refuses nobody
        os.setxattr(denied, "system.posix_acl_access",
                    _acl((ACL_USER_OBJ, 6, 0xFFFFFFFF), (ACL_USER, 0, NOBODY), (ACL_GROUP_OBJ, 4, 0xFFFFFFFF),
                         (ACL_MASK, 4, 0xFFFFFFFF), (ACL_OTHER, 4, 0xFFFFFFFF)))
        oracle = base / "kernel"
        oracle.mkdir()
        for d in ("ku", "kw"):
            (base / d).mkdir()
        subprocess.run(["/usr/bin/mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={base / 'ku'},workdir={base / 'kw'}", str(oracle)], check=True)
        try:
            expected = (_cat_as_nobody(oracle / "granted"), _cat_as_nobody(oracle / "denied"))
        finally:
            subprocess.run(["/usr/bin/umount", str(oracle)], check=True)
        assert expected == (0, 1)  # the oracle: ACLs decide
        daemons.base = base
        d = daemons.mount([lower], upper=True)
        assert (_cat_as_nobody(d.mountpoint / "granted"), _cat_as_nobody(d.mountpoint / "denied")) == expected
        assert os.getxattr(d.mountpoint / "granted", "system.posix_acl_access") == \
            os.getxattr(granted, "system.posix_acl_access")
        before = d.requests()
        for _ in range(3):
            os.getxattr(d.mountpoint / "granted", "system.posix_acl_access")
        assert delta(d.requests(), before, "GETXATTR")["GETXATTR"] == 0  # cached by the kernel
    finally:
        daemons.close()
        daemons.started.clear()
        subprocess.run(["/usr/bin/umount", "-l", str(base / "kernel")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@needs_fuse
def test_dir_cache_off_relists_through_the_daemon(tmp_path: Path, daemons: Daemons) -> None:
    """The lever the bench measures: ``--dir-cache off`` sends every warm listing to the daemon."""
    lower = tmp_path / "lower"
    make_tree(lower, dirs=4, files=5)
    d = daemons.mount([lower], extra=("--dir-cache", "off"))
    listed = sorted(os.listdir(d.mountpoint / "d01/sub"))
    before = d.requests()
    assert sorted(os.listdir(d.mountpoint / "d01/sub")) == listed == [f"f{j:02d}" for j in range(5)]
    after = d.requests()
    assert delta(after, before, "OPENDIR")["OPENDIR"] == 1
    assert sum(delta(after, before, "READDIR", "READDIRPLUS").values()) >= 1


@needs_fuse
def test_negative_lookups_are_cached_and_replaced_by_creation(tmp_path: Path, daemons: Daemons) -> None:
    lower = tmp_path / "lower"
    (lower / "dir").mkdir(parents=True)
    d = daemons.mount([lower], upper=True)
    missing = d.mountpoint / "dir" / "missing"
    assert not missing.exists()
    before = d.requests()
    for _ in range(5):
        assert not missing.exists()
    assert delta(d.requests(), before, "LOOKUP") == {"LOOKUP": 0}
    missing.write_text("here\n")  # through the mount: the kernel replaces its negative entry
    assert missing.read_text() == "here\n"
    os.unlink(missing)
    assert not missing.exists()


@needs_fuse
def test_rewinddir_and_moved_directories(tmp_path: Path, daemons: Daemons) -> None:
    lower = tmp_path / "lower"
    (lower / "a" / "inner").mkdir(parents=True)
    (lower / "b").mkdir()
    (lower / "a" / "inner" / "f").write_text("f\n")
    d = daemons.mount([lower], upper=True)
    fd = os.open(d.mountpoint / "a", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(fd) == ["inner"]
        (d.mountpoint / "a" / "g").write_text("g\n")
        assert sorted(os.listdir(fd)) == ["g", "inner"]  # listdir(fd) rewinds: the directory as it is now
    finally:
        os.close(fd)
    assert os.listdir(d.mountpoint / "a" / "inner") == ["f"]  # cached by the kernel now
    os.rename(d.mountpoint / "a" / "inner", d.mountpoint / "b" / "inner")
    assert os.listdir(d.mountpoint / "b" / "inner") == ["f"] and sorted(os.listdir(d.mountpoint / "a")) == ["g"]
    out = subprocess.run(["/bin/ls", "-a", str(d.mountpoint / "b" / "inner")], capture_output=True, text=True)
    assert out.stdout.split() == [".", "..", "f"]
    assert os.stat(d.mountpoint / "b" / "inner" / "..").st_ino == os.stat(d.mountpoint / "b").st_ino


def _read_all(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@needs_fuse
def test_passthrough_reads_and_writes_skip_the_daemon(tmp_path: Path, daemons: Daemons) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    data = os.urandom(1 << 20) * 4
    (lower / "big").write_bytes(data)
    ro = daemons.mount([lower])
    if not ro.stats()["init"]["passthrough"]:
        pytest.skip("the kernel did not offer FUSE passthrough")
    before = ro.stats()
    assert _read_all(ro.mountpoint / "big") == data
    with open(ro.mountpoint / "big", "rb") as f:  # mmap goes to the backing file too
        import mmap

        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[-4096:] == data[-4096:]
    after = ro.stats()
    assert delta(after["requests"], before["requests"], "READ") == {"READ": 0}
    assert after["passthrough_opens"] - before["passthrough_opens"] == 2 and after["backing_failures"] == 0

    # writable union: upper files go through; a lower file does not (a copy-up must show)
    rw = daemons.mount([lower], upper=True)
    before = rw.stats()
    with open(rw.mountpoint / "new", "wb") as f:
        f.write(data)
    assert _read_all(rw.mountpoint / "new") == data
    reader = os.open(rw.mountpoint / "big", os.O_RDONLY)  # a lower file, opened before it is copied up
    try:
        assert os.pread(reader, 4, 0) == data[:4]
        with open(rw.mountpoint / "big", "r+b") as w:  # copies it up
            w.write(b"NEW!")
        assert os.pread(reader, 4, 0) == b"NEW!"  # the earlier reader sees the copy (as in kernel overlayfs)
    finally:
        os.close(reader)
    after = rw.stats()
    moved = delta(after["requests"], before["requests"], "READ", "WRITE")
    assert moved["WRITE"] == 1, moved  # only the write into the copied-up file came to us
    assert after["cached_opens"] - before["cached_opens"] >= 1
    assert (tmp_path / "upper1" / "new").read_bytes() == data


@needs_fuse
def test_st_ino_is_reported_apart_from_the_node_id(tmp_path: Path, daemons: Daemons) -> None:
    lower = tmp_path / "lower"
    (lower / "dir").mkdir(parents=True)
    (lower / "dir" / "file").write_text("x\n")
    plain = daemons.mount([lower])
    shifted = daemons.mount([lower], extra=("--model", f"{__file__}:OffsetInoFS"))
    for rel in ("", "dir", "dir/file"):
        assert os.lstat(shifted.mountpoint / rel).st_ino == os.lstat(plain.mountpoint / rel).st_ino \
            + OffsetInoFS.OFFSET
    with os.scandir(shifted.mountpoint / "dir") as it:
        (ent,) = list(it)
    assert ent.inode() == os.lstat(plain.mountpoint / "dir" / "file").st_ino + OffsetInoFS.OFFSET
    assert (shifted.mountpoint / "dir" / "file").read_text() == "x\n"


@needs_fuse
@pytest.mark.parametrize("how", ["umount", "fusermount3", "SIGTERM"])
def test_the_daemon_ends_with_its_mount(tmp_path: Path, daemons: Daemons, how: str) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_text("f\n")
    d = daemons.mount([lower], upper=True)
    assert (d.mountpoint / "f").read_text() == "f\n"
    started = time.monotonic()
    if how == "umount":
        subprocess.run(["/usr/bin/umount", str(d.mountpoint)], check=True)
    elif how == "fusermount3":
        subprocess.run([FUSERMOUNT, "-u", str(d.mountpoint)], check=True)
    else:
        os.kill(d.pid, signal.SIGTERM)
    assert wait_gone(d.pid, 10), f"daemon still running after {how}"
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while is_mounted(d.mountpoint):
        assert time.monotonic() < deadline, "still mounted"
        time.sleep(0.01)
    stats = json.loads(d.stats_file.read_text())  # written at exit
    assert stats["requests"]["INIT"] == 1 and stats["unexpected_errors"] == 0


@needs_fuse
def test_an_interrupted_open_is_undone(tmp_path: Path, daemons: Daemons) -> None:
    """A process killed while its open waits in the model: the daemon survives and the
    reply the kernel no longer wants releases the handle it opened."""
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_text("f\n")
    model = tmp_path / "slow.py"
    model.write_text("import os, time\nfrom layerfs.union.fs import UnionFS\n\n\nclass Slow(UnionFS):\n"
                     "    def open(self, inode, flags):\n"
                     "        if flags & os.O_ACCMODE != os.O_RDONLY:\n            time.sleep(1.0)\n"
                     "        return super().open(inode, flags)\n")
    d = daemons.mount([lower], upper=True, extra=("--model", f"{model}:Slow"))
    opener = subprocess.Popen([sys.executable, "-c", f"open({str(d.mountpoint / 'f')!r}, 'a')"])
    time.sleep(0.3)
    opener.kill()
    opener.wait(10)
    time.sleep(1.2)  # the open finished in the model meanwhile
    stats = d.stats()
    assert stats["unexpected_errors"] == 0
    with open(d.mountpoint / "f", "a") as f:
        f.write("more\n")
    assert (d.mountpoint / "f").read_text() == "f\nmore\n"
    with pytest.raises(OSError) as e:
        os.getxattr(d.mountpoint / "f", "user.none")
    assert e.value.errno == errno.ENODATA


@needs_fuse
def test_answers_about_lower_files_come_from_the_reply_cache_until_a_change(tmp_path: Path,
                                                                           daemons: Daemons) -> None:
    """``ls -l`` asks the daemon for ``security.selinux`` of every entry, every time: a warm
    listing is answered from the session's reply cache, and a change through the mount
    (setxattr and removexattr copy up, chmod) is seen by the very next request."""
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    for i in range(20):
        (lower / "d" / f"f{i:02d}").write_text(f"{i}\n")
    try:
        os.setxattr(lower / "d" / "f00", "user.color", b"blue")
    except OSError:
        pytest.skip("the test directory's filesystem has no user xattrs")
    d = daemons.mount([lower], upper=True)
    f = d.mountpoint / "d" / "f00"

    def ls() -> str:
        return subprocess.run(["/usr/bin/ls", "-l", str(d.mountpoint / "d")], capture_output=True, text=True,
                              check=True).stdout

    cold = ls()
    before = d.stats()
    assert ls() == cold
    after = d.stats()
    asked = delta(after["requests"], before["requests"], "GETXATTR")["GETXATTR"]
    assert asked >= 20  # one per entry: the kernel does not cache these
    # every file's from the cache (not the directory's: one lower layer, in a writable union
    # it is copied up by a change below it, so it is not immutable)
    assert after["cached_replies"] - before["cached_replies"] == 20

    assert os.getxattr(f, "user.color") == b"blue" and os.getxattr(f, "user.color") == b"blue"
    os.setxattr(f, "user.color", b"red")
    assert os.getxattr(f, "user.color") == b"red" and os.getxattr(f, "user.color") == b"red"
    os.removexattr(f, "user.color")
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.color")
    assert e.value.errno == errno.ENODATA
    g = d.mountpoint / "d" / "f01"
    os.chmod(g, 0o600)
    assert stat.S_IMODE(g.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "upper0" / "d" / "f01").stat().st_mode) == 0o600
    assert os.getxattr(lower / "d" / "f00", "user.color") == b"blue"  # the lower is untouched
    assert d.stats()["unexpected_errors"] == 0
