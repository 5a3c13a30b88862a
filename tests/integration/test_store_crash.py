"""kill -9 at every step of an import: the store must open, fsck must repair it to clean,
and nothing committed before may change.

The import runs as a real ``layerfs`` subprocess; ``LAYERFS_FAILPOINT_KILL=N`` makes it
SIGKILL itself at the N-th crash point (layerfs.failpoint), and a second series kills it
from outside after random delays while it is unpacking a larger layer.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from layerfs.store import Store
from layerfs.store.fsck import fsck
from tests.support.tarbuild import tree_fingerprint, write_layer

pytestmark = pytest.mark.slow


def run_layerfs(root: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "layerfs", "--root", root, "-q", *args],
                          capture_output=True, text=True, env=full_env, timeout=120)


def image_tree(root: str, name: str) -> dict[str, tuple]:
    with Store(root) as s:
        return tree_fingerprint(s.layer_dirs(s.get_image(name).top_chain_id))


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("layers")
    return {
        "base": write_layer(str(d / "base.tar"), {"etc": None, "etc/os-release": b"base\n", "bin": None,
                                                   "bin/sh": b"#!sh\n" * 100}),
        "l1": write_layer(str(d / "l1.tar.gz"), {"app": None, "app/main": os.urandom(50_000),
                                                  "etc/os-release": b"changed\n"}, "gzip"),
        "l2": write_layer(str(d / "l2.tar.zst"), {"etc": None, "etc/os-release": ("whiteout",),
                                                   "app": None, "app/data": b"x" * 20_000}, "zstd"),
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, layers: dict[str, str]) -> tuple[str, dict[str, tuple], dict[str, tuple]]:
    """A store holding base:1, plus the tree app:1 must have when its import completes."""
    root = str(tmp_path_factory.mktemp("pristine") / "store")
    r = run_layerfs(root, "import-layer", layers["base"], "--name", "base:1")
    assert r.returncode == 0, r.stderr
    ref_root = str(tmp_path_factory.mktemp("reference") / "store")
    r = run_layerfs(ref_root, "import-layer", layers["base"], layers["l1"], layers["l2"], "--name", "app:1")
    assert r.returncode == 0, r.stderr
    return root, image_tree(root, "base:1"), image_tree(ref_root, "app:1")


def copy_store(src: str, dst: str) -> None:
    # cp -a keeps whiteout device nodes and xattrs
    subprocess.run(["cp", "-a", src, dst], check=True)


def check_after_crash(root: str, base_tree: dict[str, tuple], app_tree: dict[str, tuple], layers: dict[str, str]) -> None:
    with Store(root) as s:  # opens
        fsck(s, repair=True)
        report = fsck(s)
        assert report.clean, [f.problem for f in report.findings]
        names = {i.name for i in s.list_images()}
    assert "base:1" in names
    assert image_tree(root, "base:1") == base_tree
    if "app:1" in names:  # killed after the commit: the image must be whole
        assert image_tree(root, "app:1") == app_tree
    r = run_layerfs(root, "import-layer", layers["base"], layers["l1"], layers["l2"], "--name", "app:1")
    assert r.returncode == 0, r.stderr
    assert image_tree(root, "app:1") == app_tree
    with Store(root) as s:
        assert fsck(s).clean


def test_kill_at_every_failpoint(tmp_path, pristine, layers) -> None:
    root, base_tree, app_tree = pristine
    trace = tmp_path / "trace"
    work = str(tmp_path / "trace-store")
    copy_store(root, work)
    r = run_layerfs(work, "import-layer", layers["base"], layers["l1"], layers["l2"], "--name", "app:1",
                    env={"LAYERFS_FAILPOINT_TRACE": str(trace)})
    assert r.returncode == 0, r.stderr
    points = trace.read_text().split()
    # at least: per new layer apply + blob, manifest, transaction steps, renames
    assert len(points) >= 12, points
    for k in range(1, len(points) + 1):
        work = str(tmp_path / f"kill-{k}")
        copy_store(root, work)
        r = run_layerfs(work, "import-layer", layers["base"], layers["l1"], layers["l2"], "--name", "app:1",
                        env={"LAYERFS_FAILPOINT_KILL": str(k)})
        assert r.returncode == -signal.SIGKILL, f"point {k} ({points[k - 1]}) was not reached: {r.stderr}"
        check_after_crash(work, base_tree, app_tree, layers)


def test_kill_at_random_times(tmp_path, pristine, layers) -> None:
    root, base_tree, _ = pristine
    big = write_layer(str(tmp_path / "big.tar.gz"),
                      {"data": None, **{f"data/f{i:04d}": os.urandom(4096) for i in range(1500)}}, "gzip")
    ref = str(tmp_path / "ref")
    assert run_layerfs(ref, "import-layer", layers["base"], big, "--name", "big:1").returncode == 0
    big_tree = image_tree(ref, "big:1")
    rng = random.Random(42)
    for i in range(6):
        work = str(tmp_path / f"rand-{i}")
        copy_store(root, work)
        proc = subprocess.Popen([sys.executable, "-m", "layerfs", "--root", work, "-q", "import-layer",
                                 layers["base"], big, "--name", "big:1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Store(work) as s:
            fsck(s, repair=True)
            assert fsck(s).clean
            names = {img.name for img in s.list_images()}
        assert image_tree(work, "base:1") == base_tree
        if "big:1" in names:
            assert image_tree(work, "big:1") == big_tree
