"""A real containerd runs a real container on layerfs, through ``layerfs snapshotter serve``.

Per backend (kernel overlayfs mounts; ``fuse3./abs/path/to/layerfs-fuse`` mounts when the FUSE
backend works): a private containerd (Debian's, its own root/state/socket under the test's tmp dir, CRI
off, ``[proxy_plugins.layerfs]`` pointing at our server) imports a two-layer busybox image built
by umoci (layer 2 deletes a file of layer 1: a whiteout) with ``ctr images import --snapshotter
layerfs``, runs ``ctr run --snapshotter layerfs --rm`` on it (runc), drives ``ctr snapshots``,
survives a restart of containerd and one of our server, and removes the images: containerd's
garbage collector reaches our Remove and Cleanup and the store ends up empty. containerd, its
shims and ctr run with a minimal default environment (``PATH=/usr/sbin:/usr/bin:/sbin:/bin``, no
venv directory): with the FUSE backend, their ``mount.fuse3`` finds layerfs-fuse by the absolute
path in the mount type, and the test checks that the container's rootfs is a layerfs-fuse mount
served by that program, started without our PATH. Finalizers stop
every process by PID and unmount everything under the tmp dir; the test asserts nothing was left.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerfs.mount import fuse
from layerfs.store import Store
from layerfs.store.fsck import fsck
from tests.support.containerd_util import (
    DEFAULT_PATH,
    Containerd,
    SnapshotterServer,
    Teardown,
    argv_of,
    containerd_version,
    environ_of,
    mount_fstype,
    pids_mentioning,
    retry,
    wait_until,
)
from tests.support.imagebuild import Layer, build_busybox_image, to_docker_archive, to_oci_archive
from tests.support.markers import needs_root, needs_skopeo, needs_umoci

MIN_CONTAINERD = (1, 6, 0)
VERSION = containerd_version()
needs_containerd = pytest.mark.skipif(
    VERSION is None or VERSION < MIN_CONTAINERD or shutil.which("ctr") is None or shutil.which("runc") is None
    or shutil.which("containerd-shim-runc-v2") is None,
    reason=f"needs containerd >= {'.'.join(map(str, MIN_CONTAINERD))} with ctr, runc and containerd-shim-runc-v2 "
           f"(Debian packages containerd and runc; found containerd {VERSION})",
)
pytestmark = [needs_root, needs_umoci, needs_skopeo, needs_containerd, pytest.mark.slow]

VENV_BIN = os.path.dirname(sys.executable)  # where layerfs-fuse is installed: never on containerd's PATH
REPO_NAME = "docker.io/layerfs-test/busybox"
IMAGE = f"{REPO_NAME}:v1"
DOCKER_IMAGE = "docker.io/layerfs-test/busybox-docker:v1"
LAYERS = (
    Layer(busybox=True, dirs=["etc", "tmp", "proc", "sys", "dev"],
          files={"etc/doomed.txt": "deleted in layer 2\n", "etc/kept.txt": "kept\n"}, created_by="base"),
    Layer(files={"etc/hello.txt": "hello from layer 2\n"}, delete=["etc/doomed.txt"], created_by="whiteout"),
)
SCRIPT = (
    "cat /etc/hello.txt /etc/kept.txt; "
    "if [ -e /etc/doomed.txt ]; then echo doomed-present; else echo doomed-absent; fi; "
    "echo written-inside > /tmp/new.txt && cat /tmp/new.txt; "
    "echo changed > /etc/kept.txt && cat /etc/kept.txt; "
    "rm /etc/hello.txt && ls /etc"
)
EXPECTED = ["hello from layer 2", "kept", "doomed-absent", "written-inside", "changed", "kept.txt"]


def fuse_unavailable() -> str | None:
    """Why the FUSE backend cannot run here (None when it can). Only missing pieces skip:
    a FUSE backend that is there but misbehaves fails the test."""
    if not os.path.exists("/dev/fuse") or shutil.which("mount.fuse3", path="/usr/sbin:/sbin:/usr/bin") is None:
        return "needs /dev/fuse and mount.fuse3 (Debian package fuse3)"
    return None


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The test image as an OCI archive and as a docker archive (same layers)."""
    work = tmp_path_factory.mktemp("image")
    layout = build_busybox_image(work, layers=LAYERS, tag="v1")
    oci = to_oci_archive(layout, "v1", work / "busybox.oci.tar")
    docker = to_docker_archive(layout, "v1", work / "busybox.docker.tar", DOCKER_IMAGE.removeprefix("docker.io/"))
    return oci, docker


@dataclass
class Env:
    base: Path
    server: SnapshotterServer
    containerd: Containerd
    ids: tuple[str, str]  # container ids, unique to this run

    def store_keys(self) -> list[str]:
        """Snapshot keys in our store (containerd's namespace), read straight from it."""
        with Store(str(self.server.root)) as store:
            return [s.key for s in store.list_snapshots()]


@pytest.fixture(params=["kernel", "fuse"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    if request.param == "fuse" and (why := fuse_unavailable()):
        pytest.skip(f"FUSE backend: {why}")
    base = tmp_path
    server = SnapshotterServer(base, base / "store", backend=request.param)
    containerd = Containerd(base, server.address)
    teardown = Teardown(base, containerd.address)
    ids = (f"layerfs-e2e-{os.getpid()}-1", f"layerfs-e2e-{os.getpid()}-2")
    try:
        server.start()
        containerd.start()
        yield Env(base, server, containerd, ids)
    finally:
        # containerd and our server by PID; then whatever they left: runc containers, shims
        # and FUSE daemons (found by the paths in their command lines), mounts under base.
        code = containerd.stop()
        server_code = server.stop()
        teardown.runc_containers(containerd.runc_root)
        teardown.processes([str(containerd.address), str(base)])
        teardown.shim_sockets(containerd.namespace, ids)
        teardown.mounts()
        teardown.cgroups(ids)
        teardown.run_dirs()
        leftovers = list(teardown.leftovers)
        logs = f"--- containerd ---\n{containerd.log_tail()}\n--- layerfs ---\n{server.log_text()[-6000:]}"
    assert code == 0, f"containerd exited {code}\n{logs}"
    assert server_code == 0, f"layerfs snapshotter exited {server_code}\n{logs}"
    assert leftovers == [], f"left behind: {leftovers}\n{logs}"


def rows(text: str) -> list[list[str]]:
    """A ctr table without its header, split into columns."""
    return [line.split() for line in text.strip().splitlines()[1:]]


def test_containerd_runs_a_container_on_layerfs(env: Env, archives: tuple[Path, Path]) -> None:
    ctd, server = env.containerd, env.server
    oci, docker = archives
    c1, c2 = env.ids

    # -- import: containerd's unpacker prepares, applies and commits each layer through us
    out = ctd.ctr("images", "import", "--snapshotter", "layerfs", "--base-name", REPO_NAME, str(oci)).stdout
    assert "unpacking" in out and IMAGE in out
    assert IMAGE in ctd.ctr("images", "ls", "-q").stdout
    listing = rows(ctd.snapshots("ls").stdout)
    assert [r[-1] for r in listing] == ["Committed", "Committed"]
    chain = {r[0]: (r[1] if len(r) == 3 else "") for r in listing}
    (bottom,) = [k for k, parent in chain.items() if parent == ""]
    (top,) = [k for k, parent in chain.items() if parent == bottom]
    log = server.log_text()
    assert log.count("DEBUG Prepare") == 2 and log.count("DEBUG Commit") == 2
    # the same layers again, from a docker archive: containerd finds them committed and skips them
    ctd.ctr("images", "import", "--snapshotter", "layerfs", str(docker))
    assert server.log_text().count("DEBUG Commit") == 2
    assert len(env.store_keys()) == 2

    # containerd unpacked layer 2 into our upper: the deleted file is an overlayfs whiteout (0/0)
    with Store(str(server.root)) as store:
        (top_key,) = [k for k in env.store_keys() if k.endswith("/" + top)]
        snap = store.get_snapshot(top_key)
        assert snap is not None and snap.kind == "committed"
        st = os.lstat(Path(store.fs_dir(snap.id), "etc", "doomed.txt"))
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert Path(store.fs_dir(snap.id), "etc", "hello.txt").read_text() == "hello from layer 2\n"

    tree = ctd.snapshots("tree").stdout
    assert tree.index(bottom) < tree.index(top) and "\\_ " + top in tree
    usage = {r[0]: r for r in rows(ctd.snapshots("usage").stdout)}
    assert set(usage) == {bottom, top} and usage[bottom][1] != "0.0"

    # -- run: a container on an active snapshot over the two layers
    result = ctd.run(IMAGE, c1, "/bin/busybox", "sh", "-c", SCRIPT)
    assert result.stdout.splitlines() == EXPECTED, result.stdout + result.stderr
    # the FUSE type names the program absolutely: mount.fuse3 runs it with containerd's PATH
    expected_type = f"fuse3.{fuse.program_path()}" if server.backend == "fuse" else "overlay"
    assert {r[0] for r in rows(ctd.snapshots("ls").stdout)} == {bottom, top}  # --rm: c1's snapshot is gone ...
    wait_until(lambda: not [k for k in env.store_keys() if k.endswith("/" + c1)], "GC to remove c1")  # ours too
    assert "DEBUG Remove 'test/" in server.log_text()

    # -- ctr snapshots: prepare, mounts, info, label, usage, commit, rm
    mount_cmd = ctd.snapshots("prepare", "mine", top).stdout + ctd.snapshots("mounts", "/mnt/x", "mine").stdout
    assert f"-t {expected_type} " in mount_cmd and "upperdir=" in mount_cmd
    ctd.snapshots("label", "mine", "layerfs.test/owner=e2e")
    assert '"layerfs.test/owner": "e2e"' in ctd.snapshots("info", "mine").stdout
    assert "Update 'test/" in server.log_text()
    assert rows(ctd.snapshots("usage", "mine").stdout)[0][0] == "mine"
    ctd.snapshots("commit", "mine-done", "mine")
    assert "mine-done" in {r[0] for r in rows(ctd.snapshots("ls").stdout)}
    removal = ctd.snapshots("rm", top, check=False)
    assert removal.returncode != 0 and "failed precondition" in removal.stderr.lower()  # has children
    ctd.snapshots("rm", "mine-done")
    assert {r[0] for r in rows(ctd.snapshots("ls").stdout)} == {bottom, top}

    # -- containerd restarts: it finds its snapshots (and ours) where they were
    assert ctd.stop() == 0
    ctd.start()
    assert {r[0] for r in rows(ctd.snapshots("ls").stdout)} == {bottom, top}
    # -- our server restarts under a running containerd: the proxy reconnects
    assert server.stop() == 0
    server.start()
    assert {r[0] for r in rows(retry(lambda: ctd.snapshots("ls")).stdout)} == {bottom, top}
    # a running container: its rootfs is our mount type, and what it writes lands in our store
    ctd.run_detached(IMAGE, c2, "/bin/busybox", "sh", "-c", "echo mark > /marker; exec sleep 300")
    fstype = "fuse.layerfs-fuse" if server.backend == "fuse" else "overlay"
    wait_until(lambda: mount_fstype(ctd.rootfs(c2)) == fstype, f"{fstype} mounted at {c2}'s rootfs")
    (shim,) = [p for p in pids_mentioning(str(ctd.address)) if "containerd-shim" in " ".join(argv_of(p))
               and c2 in argv_of(p)]
    # containerd gives its shims its own PATH behind /opt/containerd/bin: no venv directory
    shim_path = environ_of(shim)["PATH"]
    assert shim_path.endswith(DEFAULT_PATH) and VENV_BIN not in shim_path.split(":"), shim_path
    if server.backend == "fuse":
        # the shim mounted the rootfs: mount.fuse3 ran the program named in the type through
        # /bin/sh, with the shim's PATH
        (daemon,) = [p for p in pids_mentioning(str(ctd.rootfs(c2))) if fuse.program_path() in argv_of(p)]
        assert environ_of(daemon)["PATH"] == shim_path
    (key,) = [k for k in env.store_keys() if k.endswith("/" + c2)]
    with Store(str(server.root)) as store:
        snap = store.get_snapshot(key)
        assert snap is not None and snap.kind == "active"
        marker = Path(store.fs_dir(snap.id), "marker")
    wait_until(lambda: marker.exists() and marker.read_text() == "mark\n", "the container's write in our upper")
    ctd.kill_task(c2)
    assert mount_fstype(ctd.rootfs(c2)) is None, "the shim unmounts the rootfs when the task is deleted"
    ctd.ctr("containers", "rm", c2)
    wait_until(lambda: not [k for k in env.store_keys() if k.endswith("/" + c2)], "GC to remove c2's snapshot")

    # -- removing the images: containerd's GC removes the layers through us, then Cleanup
    cleanups = server.log_text().count("DEBUG Cleanup")
    ctd.ctr("images", "rm", "--sync", IMAGE)
    assert len(env.store_keys()) == 2, "the docker-archive image still uses both layers"
    ctd.ctr("images", "rm", "--sync", DOCKER_IMAGE)
    assert ctd.snapshots("ls").stdout.strip().splitlines()[1:] == []
    assert env.store_keys() == []
    assert os.listdir(server.root / "snapshots") == []
    with Store(str(server.root)) as store:
        report = fsck(store)
        assert report.clean, [f.problem for f in report.findings]
    log = server.log_text()
    assert log.count("DEBUG Cleanup") > cleanups, "containerd's GC calls Cleanup after removing snapshots"
    assert "Traceback" not in log and " ERROR " not in log
