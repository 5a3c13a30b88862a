"""Runners of the conformance suite: ``kernel``, ``fuse`` and ``model`` backends as fixtures.

Each fixture yields a fresh ``Backend`` (see ``backends``) for one test; its finalizer
unmounts everything the test left mounted, reaps FUSE daemons and asserts that nothing is
left, also when the test failed. ``fuse`` and ``model`` skip with a stated reason while
``layerfs.union.fs`` / ``layerfs.mount.fuse`` have not landed; ``kernel`` skips without root
or overlayfs.

All work happens below one world-traversable directory in /tmp (pytest's own tmp dirs are
0700, and the access cases run helpers as other users that must reach the mounts). It is
removed at the end unless ``LAYERFS_CONFORMANCE_KEEP`` is set, and never while anything is
mounted below it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.linux.mountinfo import mount_table

from .backends import (
    FuseBackend,
    KernelBackend,
    ModelBackend,
    fuse_unavailable,
    kernel_unavailable,
    model_unavailable,
)
from .facade import UMASK
from .runner import new_workspace

KEEP = bool(os.environ.get("LAYERFS_CONFORMANCE_KEEP"))


def _mounts_below(path: Path) -> list[str]:
    prefix = os.path.realpath(path) + "/"
    return [e.mount_point for e in mount_table() if e.mount_point.startswith(prefix)]


@pytest.fixture(scope="session", autouse=True)
def _fixed_umask() -> Iterator[None]:
    """Every backend sees the same umask (the model is told it explicitly)."""
    old = os.umask(UMASK)
    yield
    os.umask(old)


@pytest.fixture(scope="session")
def conformance_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="layerfs-conformance-", dir="/tmp"))
    os.chmod(root, 0o755)
    yield root
    left = _mounts_below(root)
    assert not left, f"mounts left below {root}: {left}"
    if not KEEP:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workspace(conformance_root: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory for this test; backends depend on it, so they are torn down first."""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:40]
    path = new_workspace(conformance_root, tag)
    yield path
    if not KEEP and not _mounts_below(path):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def kernel(workspace: Path) -> Iterator[KernelBackend]:
    """Kernel overlayfs (redirect_dir=on, index=off): the oracle."""
    reason = kernel_unavailable()
    if reason:
        pytest.skip(reason)
    backend = KernelBackend()
    yield backend
    backend.close()


@pytest.fixture
def fuse(workspace: Path) -> Iterator[FuseBackend]:
    """The layerfs-fuse program, detached daemon and all."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    backend = FuseBackend(workspace)
    yield backend
    backend.close()


@pytest.fixture
def fuse_kernel(workspace: Path) -> Iterator[FuseBackend]:
    """The layerfs-fuse program on its kernel-protocol transport (``--transport kernel``)."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    backend = FuseBackend(workspace, "kernel")
    yield backend
    backend.close()


@pytest.fixture
def model(workspace: Path) -> Iterator[ModelBackend]:
    """layerfs.union.fs.UnionFS driven in-process through the ModelFacade."""
    reason = model_unavailable()
    if reason:
        pytest.skip(reason)
    backend = ModelBackend()
    yield backend
    backend.close()
