"""Hardening (issue 15): one read-write mount per container whatever the backend and
whoever mounted first, and small error-message rules.

Every test that mounts unmounts in a finalizer (``layerfs umount`` for what the store
recorded, then a lazy unmount of anything left below the test directory, then SIGKILL to
any FUSE daemon the test's mounts had, by pid).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.linux.proc import pid_alive
from tests.support.cliresult import mounted_under, ok, one_line_error
from tests.support.markers import needs_root
from tests.support.tarbuild import write_layer

pytestmark = [needs_root, pytest.mark.skipif(
    "overlay" not in open("/proc/filesystems").read(), reason="kernel overlayfs not available")]

MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
HAS_FUSE = os.path.exists("/dev/fuse")
needs_fuse = pytest.mark.skipif(not HAS_FUSE, reason="no /dev/fuse")


def lf(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Path]:
    """A store (``tmp_path/store``) with image base:1 and container c1; every mount is
    undone in the finalizer, every FUSE daemon stopped by pid."""
    root = tmp_path / "store"
    layer = write_layer(str(tmp_path / "l.tar"), {"etc": None, "etc/motd": b"hello\n"})
    ok(lf(root, "import-layer", layer, "--name", "base:1"))
    ok(lf(root, "create", "c1", "--from", "base:1"))
    daemons: set[int] = set()
    try:
        yield tmp_path
    finally:
        r = lf(root, "mounts", "--format", "json")
        recs = json.loads(r.stdout) if r.returncode == 0 else []
        daemons.update(rec["pid"] for rec in recs if rec["pid"])
        for rec in recs:
            lf(root, "umount", rec["target"])
        left = mounted_under(tmp_path)
        for mp in sorted(left, key=len, reverse=True):
            _libc.umount2(mp.encode(), MNT_DETACH)
        for pid in daemons:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _mnt(base: Path, name: str) -> Path:
    p = base / name
    p.mkdir()
    return p


def _upper(root: Path) -> str:
    from layerfs import containers
    from layerfs.store import Store

    with Store(str(root)) as s:
        return containers.upper(s, containers.get(s, "c1"))


@pytest.mark.parametrize("first,second", [
    ("kernel", "kernel"),
    pytest.param("kernel", "fuse", marks=needs_fuse),
    pytest.param("fuse", "kernel", marks=needs_fuse),
    pytest.param("fuse", "fuse", marks=needs_fuse),
])
def test_second_read_write_mount_is_refused(env: Path, first: str, second: str) -> None:
    root, a, b = env / "store", _mnt(env, "a"), _mnt(env, "b")
    ok(lf(root, "mount", "c1", str(a), "--backend", first))
    line = one_line_error(lf(root, "mount", "c1", str(b), "--backend", second))
    assert "container c1 is already mounted read-write" in line and str(a) in line, line
    assert f"({first}, pid " in line, line
    assert not mounted_under(b)
    recs = json.loads(ok(lf(root, "mounts", "--format", "json")))
    assert [r["target"] for r in recs] == [str(a)]
    # the first mount still works, and once it is gone the container mounts again
    assert (a / "etc" / "motd").read_text() == "hello\n"
    ok(lf(root, "umount", str(a)))
    ok(lf(root, "mount", "c1", str(b), "--backend", second))
    assert (b / "etc" / "motd").read_text() == "hello\n"


def test_mount_made_by_hand_is_seen(env: Path) -> None:
    """A kernel overlay over the container's upper that layerfs did not record (made by
    hand, or by containerd from a description) is found in mountinfo."""
    root, a, b = env / "store", _mnt(env, "a"), _mnt(env, "b")
    upper = _upper(root)
    lower, work = env / "lower", env / "work"
    lower.mkdir()
    work.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(a)], check=True)
    line = one_line_error(lf(root, "mount", "c1", str(b)))
    assert f"already mounted read-write at {a} (kernel" in line, line
    assert not mounted_under(b)


@needs_fuse
def test_fuse_daemon_started_by_hand_is_seen(env: Path) -> None:
    root, a, b = env / "store", _mnt(env, "a"), _mnt(env, "b")
    upper = _upper(root)
    lower, work = env / "lower", env / "work"
    lower.mkdir()
    work.mkdir()
    prog = os.path.join(os.path.dirname(sys.executable), "layerfs-fuse")
    r = subprocess.run([prog, "--print-pid", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(a)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.split()[-1])
    try:
        line = one_line_error(lf(root, "mount", "c1", str(b), "--backend", "kernel"))
        assert f"already mounted read-write at {a} (fuse, pid {pid})" in line, line
    finally:
        _libc.umount2(str(a).encode(), MNT_DETACH)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_read_only_views_are_not_limited(env: Path) -> None:
    root = env / "store"
    targets = [_mnt(env, f"v{i}") for i in range(3)]
    for t in targets:
        ok(lf(root, "mount", "base:1", str(t)))
    assert all((t / "etc" / "motd").read_text() == "hello\n" for t in targets)


def test_concurrent_mounts_of_one_container_one_wins(env: Path) -> None:
    root = env / "store"
    targets = [_mnt(env, f"m{i}") for i in range(4)]
    results: list[subprocess.CompletedProcess[str]] = []
    lock = threading.Lock()

    def run(t: Path) -> None:
        r = lf(root, "mount", "c1", str(t), "--backend", "kernel")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wins = [r for r in results if r.returncode == 0]
    assert len(wins) == 1, [(r.returncode, r.stderr) for r in results]
    for r in results:
        if r.returncode:
            assert "already mounted read-write" in one_line_error(r)
    assert sum(bool(mounted_under(t)) for t in targets) == 1


def test_rm_force_of_a_busy_container_suggests_lazy_umount(env: Path) -> None:
    root, a = env / "store", _mnt(env, "a")
    ok(lf(root, "mount", "c1", str(a), "--backend", "kernel"))
    with open(a / "etc" / "motd"):  # keeps the mount busy
        line = one_line_error(lf(root, "rm", "-f", "c1"))
    assert "umount --lazy" in line and str(a) in line, line
    assert "detach=True" not in line and "unmount(" not in line, line
    # nothing was removed: the container is still there, still mounted
    assert "c1" in ok(lf(root, "ps"))
    assert mounted_under(a)
