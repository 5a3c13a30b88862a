"""The ``layerfs-fuse`` program, the FUSE adapter and the FUSE mount backend.

Option parsing and backend choice are pure unit tests. Everything else mounts for real
(root, /dev/fuse, fusermount3; skipped with the reason otherwise). The ``fuse`` fixture
records every mount point and daemon pid a test makes; its finalizer lazily unmounts what
is still mounted (``fusermount3 -uz``), SIGKILLs daemons still running, reaps them (the
test process is their child subreaper) and then fails the test if anything was left.

The daemons serve the real model, ``layerfs.union.fs.UnionFS`` (``SlowCopyUpFS``, a slow
subclass, is loaded from this file with ``--model`` to show that a long copy-up does not
stall other requests).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from layerfs import mounting
from layerfs.errors import InvalidArgument, LayerfsError, UsageError
from layerfs.fuse import main as fuse_main
from layerfs.linux.mountinfo import MountEntry, mount_table
from layerfs.linux.proc import pid_alive
from layerfs.mount import fuse as fuse_backend
from layerfs.mount.backend import choose_backend
from layerfs.mount.spec import MountSpec
from layerfs.union.api import ROOT_INODE, Attr, UnionOps
from layerfs.union.fs import UnionFS

# --- a slow variant of the model ---------------------------------------------------------


class SlowCopyUpFS(UnionFS):
    """Opening for write takes a while (a large copy-up, say). Daemons load it by file."""

    def open(self, inode: int, flags: int) -> int:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            time.sleep(1.5)
        return super().open(inode, flags)


# --- environment ---------------------------------------------------------------------------

IS_ROOT = os.geteuid() == 0
FUSERMOUNT = shutil.which("fusermount3") or "/usr/bin/fusermount3"


def _fuse_missing() -> str | None:
    if not IS_ROOT:
        return "needs root (FUSE mounts with allow_other, device-node whiteouts, trusted.* xattrs)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing"
    if not os.path.exists(FUSERMOUNT):
        return "fusermount3 not installed (Debian package fuse3)"
    return None


needs_fuse = pytest.mark.skipif(_fuse_missing() is not None,
                                reason=str(_fuse_missing()))
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(autouse=True)
def _model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemons (also those the CLI starts) serve the real model, whatever the environment says."""
    monkeypatch.delenv(fuse_main.MODEL_ENV, raising=False)


def is_mounted(path: Path | str) -> bool:
    real = os.path.realpath(path)
    return any(e.mount_point == real for e in mount_table())


def mount_entry(path: Path | str) -> MountEntry:
    real = os.path.realpath(path)
    return [e for e in mount_table() if e.mount_point == real][-1]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Fuse:
    """Starts ``layerfs-fuse`` and remembers every mount point and daemon pid for cleanup."""

    def __init__(self) -> None:
        self.points: list[Path] = []
        self.pids: list[int] = []

    def track(self, mp: Path | str, pid: int | None = None) -> None:
        self.points.append(Path(mp))
        if pid is not None:
            self.pids.append(pid)

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """The program, as ``python -m layerfs.fuse.main ARGS`` (the last arg is recorded)."""
        self.points.append(Path(args[-1]))
        return subprocess.run([sys.executable, "-m", "layerfs.fuse.main", *args], capture_output=True,
                              text=True, timeout=60, env=env)

    def mount(self, options: str, mp: Path, *extra: str) -> int:
        """Mount and return the daemon pid; asserts the mount is live the moment we return."""
        r = self.run("--print-pid", *extra, "-o", options, str(mp))
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mp), "layerfs-fuse returned before the mount was live"
        pid = int(r.stdout.split()[-1])
        self.pids.append(pid)
        return pid

    def daemon_of(self, mp: Path) -> int:
        """The pid of the daemon serving ``mp`` (for mounts made by mount(8) or the CLI)."""
        for entry in os.listdir("/proc"):
            if entry.isdigit() and fuse_backend.is_daemon(int(entry), str(mp)):
                self.pids.append(int(entry))
                return int(entry)
        raise AssertionError(f"no layerfs-fuse daemon serves {mp}")

    def close(self) -> None:
        left: list[str] = []
        for mp in reversed(self.points):
            for _ in range(5):  # stacked mounts, one at a time
                if not is_mounted(mp):
                    break
                left.append(f"mount {mp}")
                if subprocess.run([FUSERMOUNT, "-uz", str(mp)], capture_output=True).returncode != 0:
                    subprocess.run(["/usr/bin/umount", "-l", str(mp)], capture_output=True)
        for pid in self.pids:
            if pid_alive(pid) and not fuse_backend.wait_gone(pid, 5):
                left.append(f"daemon {pid}")
                os.kill(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        assert not left, f"the test left these behind: {left}"


@pytest.fixture
def fuse() -> Iterator[Fuse]:
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphaned daemons become ours to reap
    f = Fuse()
    try:
        yield f
    finally:
        try:
            f.close()
        finally:
            _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def unmount(mp: Path, pid: int, how: str = "fusermount3") -> None:
    """Unmount and check that the daemon ends by itself."""
    cmd = [FUSERMOUNT, "-u", str(mp)] if how == "fusermount3" else ["/usr/bin/umount", str(mp)]
    subprocess.run(cmd, check=True, capture_output=True)
    assert not is_mounted(mp)
    assert fuse_backend.wait_gone(pid, 10), f"daemon {pid} still runs after {how}"


def two_lowers(base: Path) -> tuple[Path, Path]:
    """top: a, c (0/0 whiteout), d/y, o (opaque dir) with o/new; bottom: b, c, d/x, o/old, .wh. style."""
    top, bottom = base / "top", base / "bottom"
    for d in (top / "d", top / "o", bottom / "d", bottom / "o"):
        d.mkdir(parents=True)
    (top / "a").write_text("top\n")
    os.mknod(top / "c", stat.S_IFCHR, 0)
    (top / "d/y").write_text("y\n")
    (top / "o/new").write_text("new\n")
    os.setxattr(top / "o", "trusted.overlay.opaque", b"y")
    (top / ".wh.e").write_text("")
    (bottom / "b").write_text("bottom\n")
    (bottom / "c").write_text("deleted\n")
    (bottom / "e").write_text("deleted too\n")
    (bottom / "d/x").write_text("x\n")
    (bottom / "o/old").write_text("hidden\n")
    return top, bottom


# --- option parsing (no mount) ----------------------------------------------------------------


def test_parse_fuse_overlayfs_command_line() -> None:
    o = fuse_main.parse_args(["-o", "lowerdir=/l/a:/l/b,upperdir=/u", "-o", "workdir=/w", "-f", "/mnt/x"])
    assert isinstance(o, fuse_main.Options)
    assert (o.lowers, o.upper, o.work, o.mountpoint) == (["/l/a", "/l/b"], "/u", "/w", "/mnt/x")
    assert o.foreground and not o.readonly and o.source is None and not o.warnings
    ro = fuse_main.parse_args(["-olowerdir=/l/a\\:1:/l/b\\,2,nodev,rw,suid", "mp"])
    assert isinstance(ro, fuse_main.Options)
    assert ro.lowers == ["/l/a:1", "/l/b,2"] and ro.readonly and ro.flags == ["nodev"]
    assert ro.mountpoint == os.path.abspath("mp")
    d = fuse_main.parse_args(["-d", "-o", "lowerdir=/a", "/m"])
    assert isinstance(d, fuse_main.Options) and d.debug and d.foreground


def test_parse_mount_fuse3_order_quotes_and_warnings() -> None:
    # mount.fuse3 runs: PROG SOURCE MOUNTPOINT -o OPTIONS (with dev,suid appended)
    o = fuse_main.parse_args(["src", "/m", "-o", 'ro,lowerdir=/a:/b,context="s0:c1,c2",dev,suid,'
                              "redirect_dir=on,index=off,userxattr,timeout=2.5,fsync=0,bogus"])
    assert isinstance(o, fuse_main.Options)
    assert (o.source, o.mountpoint, o.lowers, o.flags) == ("src", "/m", ["/a", "/b"], ["ro"])
    assert o.userxattr and o.timeout == 2.5
    assert [w.split()[0:2] for w in o.warnings] == [["ignoring", "context=:"], ["ignoring", "option"],
                                                    ["ignoring", "unknown"]]
    assert fuse_main.split_options('a,b\\,c,"d,e",f') == ["a", "b\\,c", '"d,e"', "f"]


@pytest.mark.parametrize("argv, match", [
    ([], "MOUNTPOINT"),
    (["/m"], "lowerdir"),
    (["-o", "lowerdir=/a,upperdir=/u", "/m"], "together"),
    (["-o", "lowerdir=/a::/b", "/m"], "empty layer"),
    (["-o", "lowerdir=/a,squash_to_root", "/m"], "owner squashing"),
    (["-o", "lowerdir=/a,uidmapping=0:1000:1", "/m"], "uid mapping"),
    (["-o", "lowerdir=/a,xattr_permissions=2", "/m"], "xattr"),
    (["-o", "lowerdir=/a,timeout=soon", "/m"], "timeout"),
    (["--bogus", "/m"], "unknown argument"),
    (["a", "b", "c"], "too many"),
])
def test_parse_refuses(argv: list[str], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        fuse_main.parse_args(argv)


def test_fuse_options() -> None:
    o = fuse_main.parse_args(["-o", "lowerdir=/a,nosuid,noexec", "-d", "/m"])
    assert isinstance(o, fuse_main.Options)
    assert fuse_main.fuse_options(o, euid=0) == {
        "fsname=layerfs-fuse", "subtype=layerfs-fuse", "default_permissions", "allow_other",
        "nosuid", "noexec", "dev", "debug"}
    src = fuse_main.parse_args(["my,src\\x", "/m", "-o", "lowerdir=/a,ro"])
    assert isinstance(src, fuse_main.Options)
    opts = fuse_main.fuse_options(src, euid=0)
    assert "fsname=my\\,src\\\\x" in opts and {"ro", "dev", "suid"} <= opts


def test_program_help_and_usage_exit_codes() -> None:
    def prog(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "layerfs.fuse.main", *args], capture_output=True, text=True)

    h = prog("--help")
    assert h.returncode == 0
    for word in ("lowerdir=", "upperdir=", "workdir=", "-f", "fusermount3 -u", "mount -t fuse.layerfs-fuse",
                 "context=", "squash_to_root", "Exit status"):
        assert word in h.stdout, word
    assert prog("/m").returncode == 2
    r = prog("-o", "lowerdir=/a,squash_to_uid=1", "/m")
    assert r.returncode == 2 and "owner squashing" in r.stderr


def test_mount_backend_program_options() -> None:
    spec = MountSpec.overlay(["/l/a:b", "/l/c"], "/u", "/w", extra=["redirect_dir=on"])
    assert fuse_backend.program_options(spec) == list(spec.options)
    assert fuse_backend.program_options(spec.as_fuse()) == list(spec.options)
    assert fuse_backend.program_options(MountSpec.bind("/l/one", readonly=True)) == ["lowerdir=/l/one", "ro"]
    with pytest.raises(InvalidArgument, match="kernel backend"):
        fuse_backend.program_options(MountSpec.bind("/u", readonly=False))
    argv = fuse_backend.command(spec, "rel")
    assert argv[:5] == [sys.executable, "-P", "-m", "layerfs.fuse.main", "--print-pid"]
    assert fuse_backend.program_env()["PYTHONPATH"].split(os.pathsep)[0] == str(Path(mounting.__file__).parent.parent)
    assert argv[-1] == os.path.abspath("rel")


def test_auto_backend_choice(tmp_path: Path) -> None:
    from layerfs.mount.probe import probe

    deep = MountSpec.overlay([f"/l/{i}" for i in range(501)])
    assert choose_backend("fuse", deep) == ("fuse", None)
    assert choose_backend("fuse", MountSpec.bind("/u", readonly=False)) == ("kernel", None)
    chosen, why = choose_backend("auto", deep, str(tmp_path))
    assert chosen == "fuse" and why is not None and "500" in why
    if probe().overlay_available and IS_ROOT:
        assert choose_backend("auto", MountSpec.overlay(["/a", "/b"]), str(tmp_path)) == ("kernel", None)
    with pytest.raises(InvalidArgument):
        choose_backend("nfs", deep)


def test_adapter_errnos_and_cache_timeouts() -> None:
    import pyfuse3

    from layerfs.fuse.ops import CachePolicy, UnionOperations, errno_of

    assert errno_of(OSError(errno.EXDEV, "x")) == errno.EXDEV
    assert errno_of(InvalidArgument("bad")) == errno.EINVAL
    assert errno_of(OSError("no errno")) == errno.EIO
    assert errno_of(ValueError("bug")) == errno.EIO
    assert errno_of(pyfuse3.FUSEError(errno.ENOENT)) == errno.ENOENT
    ops = UnionOperations(cast(UnionOps, object()), CachePolicy(immutable=100, mutable=0.5))
    attr = Attr(7, stat.S_IFREG | 0o644, 1, 0, 0, 0, 3, 8, 4096, 1, 2, 3, immutable=True)
    e = ops.entry(attr)
    assert (e.st_ino, e.entry_timeout, e.attr_timeout, e.st_size) == (7, 100, 100, 3)
    attr.immutable = False
    assert ops.entry(attr).attr_timeout == 0.5


def test_adapter_answers_every_failure_with_an_errno(tmp_path: Path) -> None:
    import types

    import pyfuse3
    import trio

    from layerfs.fuse.ops import UnionOperations

    (tmp_path / "f").write_text("data")
    ctx = cast(pyfuse3.RequestContext, types.SimpleNamespace(uid=0, gid=0, umask=0o022, pid=1))

    class Broken(UnionFS):
        def getattr(self, inode: int) -> Attr:
            raise ValueError("a bug in the model")

        def readlink(self, inode: int) -> bytes:
            raise InvalidArgument("not a symlink")

    broken, ops = UnionOperations(Broken([str(tmp_path)])), UnionOperations(UnionFS([str(tmp_path)]))

    async def requests() -> None:
        for call, code in [(broken.getattr(ROOT_INODE, ctx), errno.EIO), (broken.readlink(ROOT_INODE, ctx), errno.EINVAL),
                           (broken.lookup(ROOT_INODE, b"nope", ctx), errno.ENOENT)]:
            with pytest.raises(pyfuse3.FUSEError) as e:
                await call
            assert e.value.errno == code
        negative = await ops.lookup(ROOT_INODE, b"nope", ctx)  # a read-only union: cached
        assert negative.st_ino == 0 and negative.entry_timeout == ops.cache.negative
        f = await ops.lookup(ROOT_INODE, b"f", ctx)
        info = await ops.open(f.st_ino, os.O_RDONLY, ctx)
        assert info.keep_cache and not info.direct_io
        assert await ops.read(info.fh, 1, 10) == b"ata"
        await ops.release(info.fh)

    trio.run(requests)
    assert broken.statistics().errors == 3 and broken.statistics().unexpected == 1
    assert ops.statistics().offloaded == 2 and ops.statistics().errors == 0


# --- real mounts --------------------------------------------------------------------------


@needs_fuse
def test_readonly_union_of_two_lowers(tmp_path: Path, fuse: Fuse) -> None:
    top, bottom = two_lowers(tmp_path)
    mp = tmp_path / "mp"
    mp.mkdir()
    pid = fuse.mount(f"lowerdir={top}:{bottom}", mp)
    assert sorted(os.listdir(mp)) == ["a", "b", "d", "o"]  # c and e whited out, markers hidden
    assert (mp / "a").read_text() == "top\n" and (mp / "b").read_text() == "bottom\n"
    assert sorted(os.listdir(mp / "d")) == ["x", "y"]  # merged
    assert os.listdir(mp / "o") == ["new"]  # opaque
    assert not (mp / "c").exists() and not (mp / "o/old").exists()
    names = subprocess.run(["/bin/ls", "-a", str(mp)], capture_output=True, text=True, check=True).stdout.split()
    assert names[:2] == [".", ".."]
    devs = {os.lstat(p).st_dev for p in (mp, mp / "a", mp / "b", mp / "d", mp / "d/x", mp / "o/new")}
    assert devs == {os.stat(mp).st_dev} and os.stat(mp).st_dev != os.stat(tmp_path).st_dev
    entry = mount_entry(mp)
    assert entry.fs_type == "fuse.layerfs-fuse" and entry.source == "layerfs-fuse"
    assert {"default_permissions", "allow_other"} <= set(entry.super_options)
    with pytest.raises(OSError) as e:
        (mp / "new").write_text("x")
    assert e.value.errno in (errno.EROFS, errno.EACCES)
    assert os.statvfs(mp).f_namemax == 255
    unmount(mp, pid)


@needs_fuse
def test_readwrite_mount_writes_land_in_upper_and_survive_an_immediate_remount(tmp_path: Path, fuse: Fuse) -> None:
    top, bottom = two_lowers(tmp_path)
    upper, work, mp = tmp_path / "upper", tmp_path / "work", tmp_path / "mp"
    for d in (upper, work, mp):
        d.mkdir()
    # as containers/storage runs a mount_program (context= is ignored), -o split in two
    options = f'lowerdir={top}:{bottom},context="system_u:object_r:container_file_t:s0:c1,c2"'
    layers = ("-o", f"upperdir={upper},workdir={work}")
    pid = fuse.mount(options, mp, *layers)
    fd = os.open(mp / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert sorted(os.listdir(fd)) == ["x", "y"]
        (mp / "d/z").write_text("z\n")
        assert sorted(os.listdir(fd)) == ["x", "y", "z"]  # rewinddir shows the directory as it is now
    finally:
        os.close(fd)
    (mp / "fresh").write_text("fresh\n")
    with open(mp / "b", "a") as f:
        f.write("appended\n")
    (mp / "d/x").unlink()
    os.mkdir(mp / "newdir", 0o750)
    assert (upper / "fresh").read_text() == "fresh\n"
    assert (upper / "b").read_text() == "bottom\nappended\n" and (bottom / "b").read_text() == "bottom\n"
    assert stat.S_ISCHR(os.lstat(upper / "d/x").st_mode) and (bottom / "d/x").exists()
    assert stat.S_IMODE(os.stat(upper / "newdir").st_mode) == 0o750  # the daemon's umask is 0
    assert os.stat(mp / "fresh").st_ino == os.stat(mp / "fresh").st_ino
    subprocess.run([FUSERMOUNT, "-u", str(mp)], check=True)
    pid2 = fuse.mount(options, mp, *layers)  # at once: the old daemon may still be on its way out
    assert fuse_backend.wait_gone(pid, 10)
    assert (mp / "fresh").read_text() == "fresh\n" and (mp / "b").read_text() == "bottom\nappended\n"
    assert sorted(os.listdir(mp / "d")) == ["y", "z"] and (mp / "newdir").is_dir()
    unmount(mp, pid2, how="umount")


@needs_fuse
def test_foreground_mode_and_sigterm(tmp_path: Path, fuse: Fuse) -> None:
    top, bottom = two_lowers(tmp_path)
    mp = tmp_path / "mp"
    mp.mkdir()
    fuse.track(mp)
    proc = subprocess.Popen([sys.executable, "-m", "layerfs.fuse.main", "-f", "-o", f"lowerdir={top}:{bottom}",
                             str(mp)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fuse.pids.append(proc.pid)
    try:
        assert wait_for(lambda: is_mounted(mp)), f"not mounted (exit status {proc.poll()})"
        assert (mp / "a").read_text() == "top\n"
        subprocess.run([FUSERMOUNT, "-u", str(mp)], check=True)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    # a daemon stopped by SIGTERM unmounts itself
    pid = fuse.mount(f"lowerdir={top}:{bottom}", mp)
    os.kill(pid, signal.SIGTERM)
    assert fuse_backend.wait_gone(pid, 10) and wait_for(lambda: not is_mounted(mp))


@needs_fuse
def test_failures_are_reported_and_leave_nothing_mounted(tmp_path: Path, fuse: Fuse) -> None:
    top, _ = two_lowers(tmp_path)
    mp = tmp_path / "mp"
    mp.mkdir()
    r = fuse.run("-o", f"lowerdir={top}:{tmp_path / 'missing'}", str(mp))
    assert r.returncode == 1 and "missing" in r.stderr and not is_mounted(mp), r.stderr
    r = fuse.run("-o", f"lowerdir={top}", str(tmp_path / "nomp"))
    assert r.returncode == 1 and "nomp" in r.stderr
    r = fuse.run("--model", "no.such.module:Model", "-o", f"lowerdir={top}", str(mp))
    assert r.returncode == 1 and "no.such.module" in r.stderr and not is_mounted(mp)
    r = fuse.run("-o", f"lowerdir={top},context=x", str(mp / "a"))  # not a directory
    assert r.returncode == 1 and "warning: ignoring context=" in r.stderr


@needs_fuse
def test_symlinked_layers_as_containers_storage_names_them(tmp_path: Path, fuse: Fuse) -> None:
    """containers/storage passes ``overlay/l/<id>`` links to ``../<layer>/diff`` (and ``,,volatile``):
    resolved at mount; inside the layers no symlink is followed."""
    top, bottom = two_lowers(tmp_path / "layers")
    links = tmp_path / "l"
    links.mkdir()
    (links / "TOP").symlink_to(top)
    (links / "BOTTOM").symlink_to(os.path.relpath(bottom, links))
    (top / "escape").symlink_to("/etc")  # a symlink inside a layer stays a symlink
    upper, work, mp = tmp_path / "c/diff", tmp_path / "c/work", tmp_path / "c/merged"
    for d in (upper, work, mp):
        d.mkdir(parents=True)
    (tmp_path / "upper-link").symlink_to(upper)
    r = fuse.run("-o", f"lowerdir={links / 'TOP'}:{links / 'BOTTOM'},upperdir={tmp_path / 'upper-link'},"
                       f"workdir={work},,volatile", str(mp))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    assert sorted(os.listdir(mp)) == ["a", "b", "d", "escape", "o"] and (mp / "b").read_text() == "bottom\n"
    assert os.readlink(mp / "escape") == "/etc" and (mp / "escape").is_symlink()
    (mp / "new").write_text("new\n")
    assert (upper / "new").read_text() == "new\n"
    fuse.daemon_of(mp)
    subprocess.run([FUSERMOUNT, "-u", str(mp)], check=True)


@needs_fuse
def test_access_checks_as_another_uid(fuse: Fuse) -> None:
    base = Path(tempfile.mkdtemp(prefix="layerfs-fuse-uid-"))
    try:
        base.chmod(0o755)
        top, bottom = two_lowers(base)
        (top / "secret").write_text("root only\n")
        (top / "secret").chmod(0o600)
        mp = base / "mp"
        mp.mkdir()
        pid = fuse.mount(f"lowerdir={top}:{bottom}", mp)

        def as_user(path: Path) -> subprocess.CompletedProcess[str]:
            def drop() -> None:
                os.setgroups([])
                os.setgid(1000)
                os.setuid(1000)
            return subprocess.run(["/bin/cat", str(path)], capture_output=True, text=True, preexec_fn=drop)

        assert as_user(mp / "a").stdout == "top\n"
        denied = as_user(mp / "secret")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        assert (mp / "secret").read_text() == "root only\n"
        unmount(mp, pid)
    finally:
        shutil.rmtree(base)


@needs_fuse
def test_mount_dot_fuse3_helper(tmp_path: Path, fuse: Fuse) -> None:
    """mount(8) runs mount.fuse3, which runs ``TYPE SOURCE MOUNTPOINT -o OPTS`` through
    /bin/sh with no PATH of its own: ``fuse.layerfs-fuse`` needs the program in a default
    PATH directory, so here the type names it absolutely (``fuse./abs/path``), and the
    ``fuse`` type takes ``/abs/path#SOURCE``."""
    top, bottom = two_lowers(tmp_path)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    prog = bindir / "layerfs-fuse"
    prog.write_text(f"#!{sys.executable}\nfrom layerfs.fuse.main import main\nmain()\n")
    prog.chmod(0o755)
    for i, (fstype, source) in enumerate([(f"fuse.{prog}", "mysrc"), ("fuse", f"{prog}#mysrc")]):
        mp = tmp_path / f"mp{i}"
        mp.mkdir()
        fuse.track(mp)
        r = subprocess.run(["/usr/bin/mount", "-t", fstype, "-o", f"lowerdir={top}:{bottom}", source, str(mp)],
                           capture_output=True, text=True, timeout=60, env={"LANG": "C", **{
                               k: v for k, v in os.environ.items() if k == fuse_main.MODEL_ENV}})
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mp)
        entry = mount_entry(mp)
        assert (entry.fs_type, entry.source) == ("fuse.layerfs-fuse", "mysrc")
        assert (mp / "b").read_text() == "bottom\n"
        unmount(mp, fuse.daemon_of(mp), how="umount")


@needs_fuse
def test_cli_mounts_images_and_containers_over_fuse(tmp_path: Path, fuse: Fuse) -> None:
    from tests.support.tarbuild import write_layer

    def lf(*args: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"layerfs {' '.join(args)}: {r.stderr}"
        return r

    root = tmp_path / "store"
    l1 = write_layer(str(tmp_path / "l1.tar"), {"etc": None, "etc/motd": b"v1\n", "etc/gone": b"x\n",
                                                 "cache": None, "cache/old": b"old\n"})
    l2 = write_layer(str(tmp_path / "l2.tar"), {"etc": None, "etc/motd": b"v2\n", "etc/gone": ("whiteout",),
                                                 "cache": ("opaque",), "cache/new": b"new\n"})
    lf("import-layer", l1, l2, "--name", "base:1")
    mp = tmp_path / "mp"
    mp.mkdir()
    fuse.track(mp)
    lf("mount", "--backend", "fuse", "base:1", str(mp))
    assert os.path.ismount(mp) and mount_entry(mp).fs_type == "fuse.layerfs-fuse"
    assert {"ro", "nodev", "nosuid"} <= set(mount_entry(mp).options)
    assert (mp / "etc/motd").read_text() == "v2\n" and not (mp / "etc/gone").exists()
    assert os.listdir(mp / "cache") == ["new"]
    listed = json.loads(lf("mounts", "--format", "json").stdout)
    assert [(m["target"], m["backend"]) for m in listed] == [(str(mp), "fuse")]
    from layerfs.store import Store

    with Store(str(root)) as store:
        (rec,) = mounting.records(store)
    assert rec.backend == "fuse" and rec.pid is not None and fuse_backend.is_daemon(rec.pid, str(mp))
    fuse.pids.append(rec.pid)
    lf("umount", str(mp))
    assert not is_mounted(mp) and not pid_alive(rec.pid)
    assert json.loads(lf("mounts", "--format", "json").stdout) == []

    lf("create", "c1", "--from", "base:1")
    lf("mount", "--backend", "fuse", "c1", str(mp))
    pid = fuse.daemon_of(mp)
    (mp / "etc/motd").write_text("changed\n")
    (mp / "etc/added").write_text("added\n")
    lf("umount", str(mp))
    assert not pid_alive(pid)
    # the other backend reads what FUSE wrote
    lf("mount", "--backend", "kernel", "c1", str(mp))
    try:
        assert (mp / "etc/motd").read_text() == "changed\n" and (mp / "etc/added").read_text() == "added\n"
    finally:
        lf("umount", str(mp))


@needs_fuse
def test_mount_backend_api_errors(tmp_path: Path, fuse: Fuse) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    fuse.track(mp)
    with pytest.raises(LayerfsError, match="missing"):
        fuse_backend.mount(MountSpec.overlay([str(tmp_path / "missing"), str(tmp_path)]), str(mp))
    assert not is_mounted(mp)
    with pytest.raises(InvalidArgument, match="owner squashing"):
        fuse_backend.mount(MountSpec("overlay", "overlay", ("lowerdir=/a", "squash_to_root")), str(mp))


@needs_fuse
def test_auto_falls_back_to_fuse_when_the_kernel_refuses(tmp_path: Path, fuse: Fuse,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from layerfs import importer
    from layerfs.errors import Unsupported
    from layerfs.mount import kernel
    from layerfs.store import Store
    from tests.support.tarbuild import write_layer

    def refuse(*args: object, **kwargs: object) -> None:
        raise Unsupported("mounting overlay needs CAP_SYS_ADMIN (EPERM)")

    monkeypatch.setattr(kernel, "mount", refuse)
    tars = [write_layer(str(tmp_path / f"l{i}.tar"), {"f": f"{i}\n".encode(), f"only{i}": b"x"}) for i in (1, 2)]
    mp = tmp_path / "mp"
    mp.mkdir()
    with Store(str(tmp_path / "store")) as store:
        importer.import_layers(store, tars, "two:1")
        rec = mounting.mount_ref(store, "two:1", str(mp), "auto")
        fuse.track(mp, rec.pid)
        assert rec.backend == "fuse" and rec.pid is not None and is_mounted(mp)
        assert (mp / "f").read_text() == "2\n" and sorted(os.listdir(mp)) == ["f", "only1", "only2"]
        assert [(r.backend, r.pid) for r in mounting.records(store)] == [("fuse", rec.pid)]
        mounting.umount(store, str(mp))
        assert not is_mounted(mp) and not pid_alive(rec.pid)
        assert mounting.records(store) == []


@needs_fuse
def test_a_slow_copy_up_does_not_stall_other_requests(tmp_path: Path, fuse: Fuse) -> None:
    top, bottom = two_lowers(tmp_path)
    upper, work, mp = tmp_path / "upper", tmp_path / "work", tmp_path / "mp"
    for d in (upper, work, mp):
        d.mkdir()
    pid = fuse.mount(f"lowerdir={top}:{bottom},upperdir={upper},workdir={work}", mp,
                     "--model", f"{__file__}:SlowCopyUpFS")
    writer = threading.Thread(target=lambda: (mp / "b").open("a").close())
    writer.start()
    time.sleep(0.2)  # the writer's open is now inside the model
    started = time.monotonic()
    assert (mp / "a").read_text() == "top\n" and sorted(os.listdir(mp / "d")) == ["x", "y"]
    assert time.monotonic() - started < 1.0, "a metadata request waited for the slow open"
    writer.join(10)
    assert not writer.is_alive()
    unmount(mp, pid)


# --- daemon life and resources, on both transports ---------------------------------------------

TRANSPORTS = pytest.mark.parametrize("transport", fuse_main.TRANSPORTS)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rw_mount(tmp_path: Path, fuse: Fuse, transport: str) -> tuple[Path, int]:
    top, bottom = two_lowers(tmp_path)
    upper, work, mp = tmp_path / "upper", tmp_path / "work", tmp_path / "mp"
    for d in (upper, work, mp):
        d.mkdir()
    pid = fuse.mount(f"lowerdir={top}:{bottom},upperdir={upper},workdir={work}", mp, "--transport", transport)
    return mp, pid


@needs_fuse
@TRANSPORTS
def test_daemon_exits_promptly_after_umount(tmp_path: Path, fuse: Fuse, transport: str) -> None:
    mp, pid = _rw_mount(tmp_path, fuse, transport)
    assert sorted(os.listdir(mp / "d")) == ["x", "y"]
    started = time.monotonic()
    subprocess.run(["/usr/bin/umount", str(mp)], check=True, capture_output=True)
    assert fuse_backend.wait_gone(pid, 5), f"daemon {pid} still runs 5 s after umount"
    assert time.monotonic() - started < 2, "the daemon took seconds to notice the unmount"


@needs_fuse
@TRANSPORTS
def test_daemon_exits_when_a_lazily_unmounted_mount_loses_its_last_user(tmp_path: Path, fuse: Fuse,
                                                                       transport: str) -> None:
    """``umount -l`` with a file still open: the connection lives while the file is open
    (the daemon still serves it), and ends with the last reference: the daemon goes at once."""
    mp, pid = _rw_mount(tmp_path, fuse, transport)
    fd = os.open(mp / "b", os.O_RDWR)
    try:
        subprocess.run(["/usr/bin/umount", "-l", str(mp)], check=True, capture_output=True)
        assert not is_mounted(mp)
        time.sleep(0.3)
        assert pid_alive(pid), "the daemon left while a file on its mount was still open"
        assert os.pwrite(fd, b"still served\n", 0) == 13
        assert os.pread(fd, 13, 0) == b"still served\n"
    finally:
        os.close(fd)
    started = time.monotonic()
    assert fuse_backend.wait_gone(pid, 5), f"daemon {pid} still runs 5 s after its last user went"
    assert time.monotonic() - started < 2, "the daemon took seconds to notice the connection end"
    assert (tmp_path / "upper/b").read_bytes().startswith(b"still served\n")


@needs_fuse
@TRANSPORTS
def test_walking_many_directories_keeps_the_daemon_fds_bounded(tmp_path: Path, fuse: Fuse, transport: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A walk of more directories than the daemon caches: the fd and listing caches evict
    (LRU) instead of holding one fd per directory, and the walk still sees everything."""
    cap = 64
    monkeypatch.setenv("LAYERFS_FD_CACHE", str(cap))
    monkeypatch.setenv("LAYERFS_DIR_CACHE", "32")
    lower, upper, work, mp = (tmp_path / n for n in ("lower", "upper", "work", "mp"))
    for d in (upper, work, mp):
        d.mkdir()
    for i in range(30):
        for j in range(30):
            (lower / f"d{i}/s{j}").mkdir(parents=True)
            (lower / f"d{i}/s{j}/f").write_text(f"{i}.{j}\n")
    pid = fuse.mount(f"lowerdir={lower},upperdir={upper},workdir={work}", mp, "--transport", transport)
    baseline = _open_fds(pid)
    seen = peak = 0
    for _ in range(2):  # the second walk re-reads evicted directories
        for root, dirs, files in os.walk(mp):
            seen += len(dirs)
            peak = max(peak, _open_fds(pid))
            if "f" in files:
                i, j = (Path(root).parent.name[1:], Path(root).name[1:])
                assert (Path(root) / "f").read_text() == f"{i}.{j}\n"
    assert seen == 2 * (30 + 30 * 30)
    after = _open_fds(pid)
    assert peak <= baseline + cap + 16, (baseline, peak, after)
    (mp / "d3/s4/g").write_text("new\n")  # an evicted directory still merges with the upper
    assert sorted(os.listdir(mp / "d3/s4")) == ["f", "g"]
    unmount(mp, pid, how="umount")
