"""Uppers are interchangeable: what one backend writes, the other reads as the same tree.

For a set of cases that leave the on-disk format at its most varied (whiteouts, opaque and
redirected directories, hardlinks, devices, xattrs, escaped overlay xattrs, long paths):

- ``test_upper_read_by_kernel[writer]``: the case runs on FUSE (or the model), which is
  unmounted; kernel overlayfs mounts the same lowers and that upper (fresh workdir) and must
  show exactly the tree the writer showed last.
- ``test_kernel_upper_read_by[reader]``: the other way round.
- ``test_upper_as_lower_layer[backend]``: the backend's upper becomes the top lower layer of
  a new read-only mount (by the same backend, and by the kernel): the tree is unchanged.

The ``kernel`` parameter of each is the oracle checked against itself: it shows that what
the other parameters expect is what kernel overlayfs does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from . import cases
from .backends import Backend, MountParams, params_for
from .facade import Node, Tree
from .layers import LAYER_SETS
from .runner import CASE_HARDLINK_NAMES, CASES, Case, Session, diff_trees

# a FUSE request that never returns must not hold the whole run for pytest's default 600 s
pytestmark = pytest.mark.timeout(120)

assert cases.__name__  # the import registers the cases

CROSS_CASES = (
    "create_exclusive",
    "unlink_special_entries",
    "mkdir_after_rmdir_is_opaque",
    "rmdir_dirs_with_whiteouts",
    "rename_lower_dir",
    "rename_nested_lower_dir",
    "rename_dir_then_modify",
    "rename_into_whiteouts_and_opaque",
    "lower_hardlinks",
    "link_new_file_survives_remount",
    "mkfifo_and_mknod",
    "chown_lower_files",
    "setxattr_copies_up",
    "overlay_private_xattrs_hidden",
    "deep_tree_copy_up",
    "paths_beyond_path_max",
)
SELECTED = [c for c in CASES if c.name in CROSS_CASES]
assert len(SELECTED) == len(CROSS_CASES), "a cross-mount case name does not exist"


def _write(case: Case, backend: Backend, base: Path) -> tuple[MountParams, Tree]:
    """Run ``case`` on ``backend``; return the mount's parameters and its final tree (unmounted)."""
    if backend.name == "model" and case.os_only:
        pytest.skip(case.os_only)
    lowers = LAYER_SETS[case.layers](base / "layers")
    params = params_for(base, lowers)
    session = Session(backend, backend.mount(params))
    try:
        case.run(session)
        tree = session.fs.tree()
    finally:
        backend.unmount(session.mounted)
    return params, tree


def _read(backend: Backend, params: MountParams) -> Tree:
    m = backend.mount(params)
    try:
        return m.facade.tree()
    finally:
        backend.unmount(m)


def _counted(case: Case, tree: Tree) -> Tree:
    """``tree`` as compared: for the lower-hardlink cases without the link counts of those
    names (the FUSE model's index in the workdir holds one more link of their copy, which a
    mount with a fresh workdir, or of the upper as a lower layer, counts)."""
    if not case.index:
        return tree
    return {p: dataclasses.replace(n, nlink=None) if p in CASE_HARDLINK_NAMES and isinstance(n, Node) else n
            for p, n in tree.items()}


def _check(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(what + ":\n" + "\n".join(problems), pytrace=False)


@pytest.mark.parametrize("writer", ["kernel", "fuse", "fuse_kernel", "model"])
@pytest.mark.parametrize("case", SELECTED, ids=[c.name for c in SELECTED])
def test_upper_read_by_kernel(case: Case, writer: str, request: pytest.FixtureRequest, workspace: Path) -> None:
    backend: Backend = request.getfixturevalue(writer)
    kernel: Backend = request.getfixturevalue("kernel")
    params, written = _write(case, backend, workspace)
    seen = _read(kernel, params_for(workspace, params.lowers, upper=params.upper, tag="-kernel"))
    _check(diff_trees(_counted(case, written), _counted(case, seen), "kernel", left=writer),
           f"kernel reads {writer}'s upper differently")


@pytest.mark.parametrize("reader", ["kernel", "fuse", "fuse_kernel", "model"])
@pytest.mark.parametrize("case", SELECTED, ids=[c.name for c in SELECTED])
def test_kernel_upper_read_by(case: Case, reader: str, request: pytest.FixtureRequest, workspace: Path) -> None:
    if reader == "model" and case.os_only:
        pytest.skip(case.os_only)
    backend: Backend = request.getfixturevalue(reader)
    kernel: Backend = request.getfixturevalue("kernel")
    params, written = _write(case, kernel, workspace)
    seen = _read(backend, params_for(workspace, params.lowers, upper=params.upper, tag="-" + reader))
    _check(diff_trees(_counted(case, written), _counted(case, seen), reader),
           f"{reader} reads the kernel's upper differently")


@pytest.mark.parametrize("backend_name", ["kernel", "fuse", "fuse_kernel", "model"])
@pytest.mark.parametrize("case", SELECTED, ids=[c.name for c in SELECTED])
def test_upper_as_lower_layer(case: Case, backend_name: str, request: pytest.FixtureRequest,
                              workspace: Path) -> None:
    backend: Backend = request.getfixturevalue(backend_name)
    kernel: Backend = request.getfixturevalue("kernel")
    params, written = _write(case, backend, workspace)
    assert params.upper is not None
    stack = (params.upper, *params.lowers)
    again = _read(backend, params_for(workspace, stack, readonly=True, tag="-ro"))
    by_kernel = _read(kernel, params_for(workspace, stack, readonly=True, tag="-ro-kernel"))
    written, again, by_kernel = (_counted(case, t) for t in (written, again, by_kernel))
    problems = diff_trees(written, again, f"{backend_name} (upper as lower)", left=f"{backend_name} (writing)")
    problems += diff_trees(by_kernel, again, f"{backend_name} (upper as lower)", left="kernel (upper as lower)")
    _check(problems, f"{backend_name} reads its own upper as a lower layer differently")
