"""layerfs-fuse itself refuses an upperdir another live mount writes into (issue 15):
whoever made the first mount (kernel overlay by hand, ``layerfs mount``, another
layerfs-fuse started by hand or by podman's ``mount_program``), the second exits 1 with one
line naming the first mount, and mounts nothing. ``layerfs.mount.users`` is the one home of
the detection; ``layerfs mount`` uses the same one (tests/integration/test_hardening.py).

Every mount is undone in a finalizer (lazy unmount of anything below the test directory),
every FUSE daemon the test started is killed by pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.linux.proc import pid_alive
from tests.support.cliresult import mounted_under, ok
from tests.support.markers import needs_root
from tests.support.tarbuild import write_layer

pytestmark = [needs_root, pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
              pytest.mark.skipif("overlay" not in open("/proc/filesystems").read(), reason="no kernel overlayfs")]

MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
PROG = os.path.join(os.path.dirname(sys.executable), "layerfs-fuse")


class Env:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.lower, self.upper, self.work, self.work2 = (base / n for n in ("lower", "upper", "work", "work2"))
        for d in (self.lower, self.upper, self.work, self.work2):
            d.mkdir()
        (self.lower / "motd").write_text("hello\n")
        self.daemons: list[int] = []

    def mnt(self, name: str) -> Path:
        p = self.base / name
        p.mkdir()
        return p

    def fuse(self, target: Path, upper: Path | None = None, work: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
        opts = f"lowerdir={self.lower},upperdir={upper or self.upper},workdir={work or self.work}"
        r = subprocess.run([PROG, "--print-pid", "-o", opts, str(target)], capture_output=True, text=True,
                           timeout=60)
        if r.returncode == 0:
            self.daemons.append(int(r.stdout.split()[-1]))
        return r


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        for mp in sorted(mounted_under(tmp_path), key=len, reverse=True):
            _libc.umount2(mp.encode(), MNT_DETACH)
        for pid in e.daemons:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _refused(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_second_layerfs_fuse_on_one_upper_is_refused(env: Env) -> None:
    a, b = env.mnt("a"), env.mnt("b")
    first = env.fuse(a)
    assert first.returncode == 0, first.stderr
    line = _refused(env.fuse(b, work=env.work2))
    assert line.startswith("layerfs-fuse: error: upperdir ") and str(env.upper) in line, line
    assert f"already mounted read-write at {a} (fuse, pid {env.daemons[0]})" in line, line
    assert not mounted_under(b)
    (a / "new").write_text("written\n")  # the first mount still serves
    assert (env.upper / "new").read_text() == "written\n"


def test_layerfs_fuse_over_a_kernel_overlay_upper_is_refused(env: Env) -> None:
    a, b = env.mnt("a"), env.mnt("b")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={env.lower},upperdir={env.upper},workdir={env.work}", str(a)], check=True)
    line = _refused(env.fuse(b, work=env.work2))
    assert f"already mounted read-write at {a} (kernel, pid -)" in line, line
    assert not mounted_under(b)


def test_other_uppers_and_a_free_upper_mount(env: Env) -> None:
    """Not over-broad: a different upper mounts beside the first, and the first's upper
    mounts again once it is unmounted (the daemon does not count itself or its parent)."""
    a, b, c = env.mnt("a"), env.mnt("b"), env.mnt("c")
    assert env.fuse(a).returncode == 0
    other, other_work = env.base / "upper2", env.base / "work3"
    other.mkdir()
    other_work.mkdir()
    r = env.fuse(b, upper=other, work=other_work)
    assert r.returncode == 0, r.stderr
    assert _libc.umount2(str(a).encode(), 0) == 0
    for _ in range(100):  # the daemon exits once its mount is gone
        if not pid_alive(env.daemons[0]):
            break
        import time

        time.sleep(0.05)
    r = env.fuse(c)
    assert r.returncode == 0, r.stderr
    assert (c / "motd").read_text() == "hello\n"


def test_layerfs_fuse_refuses_a_container_layerfs_mounted(env: Env, tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    lf = [sys.executable, "-m", "layerfs", "--root", root, "-q"]
    layer = write_layer(str(tmp_path / "l.tar"), {"etc": None, "etc/motd": b"hi\n"})
    ok(subprocess.run([*lf, "import-layer", layer, "--name", "base:1"], capture_output=True, text=True))
    ok(subprocess.run([*lf, "create", "c1", "--from", "base:1"], capture_output=True, text=True))
    from layerfs import containers
    from layerfs.store import Store

    with Store(root) as s:
        upper = Path(containers.upper(s, containers.get(s, "c1")))
    a, b = env.mnt("a"), env.mnt("b")
    try:
        ok(subprocess.run([*lf, "mount", "c1", str(a), "--backend", "fuse"], capture_output=True, text=True))
        line = _refused(env.fuse(b, upper=upper, work=env.work2))
        assert f"already mounted read-write at {a} (fuse, pid " in line, line
        assert not mounted_under(b)
    finally:
        subprocess.run([*lf, "umount", str(a)], capture_output=True)
