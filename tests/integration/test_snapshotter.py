"""The snapshotter's Python API, ``snapshotter.core.Snapshotter``.

containerd's snapshotter testsuite behaviours run here through ``TestPythonAPI``, the binding
of the shared suite (``tests.support.snapshotter_suite``; the gRPC service runs the same suite
in ``test_snapshotter_grpc.py``), with the kernel backend and with the FUSE backend. Below it,
what only the Python API has: ``close``, mount descriptions per backend, namespaces.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.errors import FailedPrecondition, InvalidArgument
from layerfs.mount import fuse as fuse_backend
from layerfs.mount.spec import is_fuse_type
from layerfs.store import Store
from snapshotter.core import Snapshotter
from tests.support.markers import needs_root
from tests.support.snapshotter_suite import Mounter, SnapshotterBehaviours

pytestmark = [needs_root]


class TestPythonAPI(SnapshotterBehaviours):
    """The shared behaviours on ``Snapshotter`` over a ``Store`` in this process."""

    @contextlib.contextmanager
    def snapshotter(self, root: Path, backend: str) -> Iterator[Snapshotter]:
        store = Store(str(root))
        sn = Snapshotter(store, backend=backend)
        try:
            yield sn
        finally:
            sn.close()
            store.close()

    def test_close_twice(self, env: tuple[Snapshotter, Mounter]) -> None:
        sn, m = env
        target = m.mount(sn.prepare("k", ""))
        m.unmount(target)
        sn.close()
        sn.close()
        with pytest.raises(FailedPrecondition):
            sn.stat("k")


def test_mount_descriptions(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    sn = Snapshotter(store)
    (spec,) = sn.prepare("a", "")
    assert spec.type == "bind" and "rw" in spec.options
    sn.commit("c", "a")
    (spec,) = sn.view("v", "c")
    assert spec.type == "bind" and "ro" in spec.options
    (spec,) = sn.prepare("b", "c")
    assert spec.type == "overlay" and spec.upper and spec.work and len(spec.lowers) == 1
    assert "redirect_dir=on" in spec.options
    sn.commit("c2", "b")
    (spec,) = sn.view("v2", "c2")
    assert spec.type == "overlay" and spec.readonly and len(spec.lowers) == 2
    fuse = Snapshotter(store, backend="fuse")
    (spec,) = fuse.prepare("b2", "c2")
    # the program named absolutely: mount.fuse3 (run by containerd, its shims, ctr) needs no PATH
    program = fuse_backend.program_path()
    assert spec.type == f"fuse3.{program}" and spec.lowers and spec.upper
    assert os.path.isabs(program) and os.access(program, os.X_OK) and is_fuse_type(spec.type)
    (spec,) = Snapshotter(store, backend="fuse", fuse_program="/opt/x.y/bin/layerfs-fuse").view("v3", "c2")
    assert spec.type == "fuse3./opt/x.y/bin/layerfs-fuse"
    (spec,) = fuse.view("v4", "c")  # one layer: a bind mount, whatever the backend
    assert spec.type == "bind"
    with pytest.raises(InvalidArgument):
        Snapshotter(store, backend="zfs")
    # keys are never file names: odd keys work
    sn.prepare("../../etc/passwd weird key/with spaces", "")
    assert sn.stat("../../etc/passwd weird key/with spaces").kind == "active"
    store.close()


def test_namespaces_do_not_mix(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    Snapshotter(store, namespace="k8s").prepare("x", "")
    Snapshotter(store, namespace="k8s_other").prepare("y", "")
    assert Snapshotter(store, namespace="K8S").infos() == []
    assert [i.name for i in Snapshotter(store, namespace="k8s").infos()] == ["x"]
    store.close()
