"""Random operation sequences on kernel overlayfs and another backend, compared step by step.

A hypothesis ``RuleBasedStateMachine`` builds two identical copies of ``layers.small``,
mounts one with kernel overlayfs and the other with the backend under test (the FUSE
program, or the model in-process), and applies the same random operations to both over a
small name space whose names start out in the lower layers (files, whiteouts, an opaque
directory, a hardlink pair, a symlink). Every result — return value or errno — must be
the kernel's. At teardown the merged trees and the uppers on disk are compared, then each
upper is cross-mounted: the kernel mounts the other backend's upper and the other backend
mounts the kernel's, and both must show the tree they were written with.

``other=kernel`` runs the same machine with the kernel on both sides, a self-check.

Bounded for CI: 25 examples of up to 30 steps, no deadline, derandomized when ``CI`` is
set (reproducible), shrinking capped at 40 s. Every mount is unmounted in ``teardown``
(hypothesis runs it after failures too) and, as a last resort, by the test's ``finally``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from .backends import (
    Backend,
    FuseBackend,
    KernelBackend,
    ModelBackend,
    Mounted,
    fuse_unavailable,
    kernel_unavailable,
    model_unavailable,
    params_for,
)
from .facade import RENAME_NOREPLACE, Node, call_logged, dump_upper
from .layers import small
from .runner import LOWER_HARDLINK_ALIASES, diff_trees, new_workspace, normalize

# a FUSE request that never returns must not hold the whole run for pytest's default 600 s
pytestmark = pytest.mark.timeout(300)

CI = bool(os.environ.get("CI"))
SHRINK_SECONDS = 40

NAMES = ["a", "b", "n", "s", "hl", "d", "d/a", "d/b", "d/c", "d/n", "d/hl", "d/e", "d/e/a", "e", "e/a", "e/b", "e/n"]
paths = st.sampled_from(NAMES)
payloads = st.binary(max_size=24)
WRITE_FLAGS = {
    "create": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "append": os.O_WRONLY | os.O_APPEND,
    "excl": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "overwrite": os.O_WRONLY,
}

SETTINGS = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    derandomize=CI,
    database=None if CI else DirectoryBasedExampleDatabase("/tmp/layerfs-conformance-hypothesis"),
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


class UnionComparison(RuleBasedStateMachine):
    """Kernel overlay vs ``make_other()`` on identical layers; subclasses set the two hooks."""

    root: Path
    other_name = "?"
    created: list[Backend] = []

    @classmethod
    def make_other(cls, base: Path) -> Backend:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self.base = new_workspace(self.root, self.other_name)
        self.kernel = KernelBackend()
        self.created.append(self.kernel)
        self.other = self.make_other(self.base)
        self.created.append(self.other)
        # index=on: the FUSE model keeps lower hardlinks one file across copy-up, as this does
        self.k_params = params_for(self.base / "kernel", small(self.base / "kernel" / "layers"), index=True)
        self.o_params = params_for(self.base / "other", small(self.base / "other" / "layers"), index=True)
        self.k: Mounted = self.kernel.mount(self.k_params)
        self.o: Mounted = self.other.mount(self.o_params)
        self.steps = 0
        # the lower hardlink's st_ino (index=on keeps it): its names are found by it at the end
        self.hl_ino = call_logged(self.k.facade.ino, "hl")

    # -- running one operation on both --

    def both(self, op: str, *args: Any) -> None:
        self.steps += 1
        expected = normalize(call_logged(getattr(self.k.facade, op), *args))
        actual = normalize(call_logged(getattr(self.o.facade, op), *args))
        if actual != expected:
            raise AssertionError(f"step {self.steps}: {op}{args!r}: kernel {expected!r}, {self.other_name} {actual!r}")

    # -- rules --

    @rule(path=paths, data=payloads, how=st.sampled_from(sorted(WRITE_FLAGS)))
    def write(self, path: str, data: bytes, how: str) -> None:
        self.both("write_file", path, data, WRITE_FLAGS[how])

    @rule(path=paths)
    def read(self, path: str) -> None:
        self.both("read_file", path)

    @rule(path=paths, size=st.integers(0, 30))
    def truncate(self, path: str, size: int) -> None:
        self.both("truncate", path, size)

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self.both("unlink", path)

    @rule(path=paths, mode=st.sampled_from([0o755, 0o700]))
    def mkdir(self, path: str, mode: int) -> None:
        self.both("mkdir", path, mode)

    @rule(path=paths)
    def rmdir(self, path: str) -> None:
        self.both("rmdir", path)

    @rule(src=paths, dst=paths, noreplace=st.booleans())
    def rename(self, src: str, dst: str, noreplace: bool) -> None:
        self.both("rename", src, dst, RENAME_NOREPLACE if noreplace else 0)

    @rule(src=paths, dst=paths)
    def link(self, src: str, dst: str) -> None:
        self.both("link", src, dst)

    # relative targets that stay inside the union from any directory of the name space
    @rule(dest=st.sampled_from(["a", "d", "n", "d/a", "missing"]), path=paths)
    def symlink(self, dest: str, path: str) -> None:
        self.both("symlink", dest, path)

    @rule(path=paths, mode=st.sampled_from([0o600, 0o644, 0o755, 0o4755, 0o1777]))
    def chmod(self, path: str, mode: int) -> None:
        self.both("chmod", path, mode)

    @rule(path=paths, name=st.sampled_from(["user.k", "trusted.k"]), value=st.binary(max_size=8))
    def setxattr(self, path: str, name: str, value: bytes) -> None:
        self.both("setxattr", path, name, value)

    @rule(path=paths, name=st.sampled_from(["user.k", "trusted.k", "user.color"]))
    def removexattr(self, path: str, name: str) -> None:
        self.both("removexattr", path, name)

    @rule(path=paths, uid=st.sampled_from([-1, 0, 1000]), gid=st.sampled_from([-1, 0, 1000]))
    def chown(self, path: str, uid: int, gid: int) -> None:
        self.both("chown", path, uid, gid)

    @rule()
    def remount(self) -> None:
        """Unmount both and mount the same layers and uppers again: state must persist, and
        which names keep their st_ino must be the same on both sides."""
        self.steps += 1
        k_before = {p: call_logged(self.k.facade.ino, p) for p in NAMES}
        o_before = {p: call_logged(self.o.facade.ino, p) for p in NAMES}
        self.k = self.kernel.remount(self.k)
        self.o = self.other.remount(self.o)
        names = list(NAMES)
        k_kept = {p: k_before[p] == call_logged(self.k.facade.ino, p) for p in names}
        o_kept = {p: o_before[p] == call_logged(self.o.facade.ino, p) for p in names}
        if k_kept != o_kept:
            diff = {p: (k_kept[p], o_kept[p]) for p in names if k_kept[p] != o_kept[p]}
            raise AssertionError(f"step {self.steps}: remount: st_ino kept (kernel, {self.other_name}): {diff}")

    @rule(path=paths)
    def observe(self, path: str) -> None:
        self.both("lstat", path)
        self.both("listdir", path)
        self.both("listxattr", path)

    # -- the end of one example --

    def teardown(self) -> None:
        try:
            self._compare_at_end()
        finally:
            for backend in (self.other, self.kernel):
                backend.close()

    def _compare_at_end(self) -> None:
        k_tree, o_tree = self.k.facade.tree(), self.o.facade.tree()
        problems = diff_trees(k_tree, o_tree, self.other_name)
        # the lower hardlink's names wherever they are now (below a renamed directory too)
        aliases = set(LOWER_HARDLINK_ALIASES) | {
            p for p in k_tree if p and call_logged(self.k.facade.ino, p) == self.hl_ino}
        self.kernel.unmount(self.k)
        self.other.unmount(self.o)
        assert self.k_params.upper and self.o_params.upper
        # The kernel keeps a copied-up lower hardlink's other names in work/index (and counts
        # those links), the model links them in the upper: see _comparable.
        k_upper, o_upper = dump_upper(str(self.k_params.upper)), dump_upper(str(self.o_params.upper))
        problems += diff_trees(_comparable(k_upper, aliases),
                               _comparable(_without_alias_parents(o_upper, k_upper, aliases), aliases),
                               self.other_name, "upper")
        # cross-mount: each upper read by the other backend, fresh workdirs
        k_reads = self.kernel.mount(params_for(self.base / "other", self.o_params.lowers,
                                               upper=self.o_params.upper, tag="-x", index=True))
        try:
            # (an index=on kernel upper keeps the hardlinks it copied up in its old work/index,
            # which a mount with a fresh workdir cannot see: see _cross)
            problems += diff_trees(_comparable(o_tree, aliases), _comparable(k_reads.facade.tree(), aliases),
                                   f"kernel reading {self.other_name}'s upper", "cross", left=self.other_name)
        finally:
            self.kernel.unmount(k_reads)
        o_reads = self.other.mount(params_for(self.base / "kernel", self.k_params.lowers,
                                              upper=self.k_params.upper, tag="-x", index=True))
        try:
            problems += diff_trees(_comparable(k_tree, aliases), _comparable(o_reads.facade.tree(), aliases),
                                   f"{self.other_name} reading kernel's upper", "cross")
        finally:
            self.other.unmount(o_reads)
        if problems:
            raise AssertionError(f"after {self.steps} steps:\n" + "\n".join(problems))


def _without_aliases(tree: dict[str, Any], aliases: set[str]) -> dict[str, Any]:
    return {p: n for p, n in tree.items() if p not in aliases}


def _without_alias_parents(upper: dict[str, Any], kernel_upper: dict[str, Any], aliases: set[str]) -> dict[str, Any]:
    """``upper`` without the directories that only the copies of lower-hardlink names made
    (the model links them in the upper, copying their directories up; the kernel does not)."""
    extra = {p for p, n in upper.items() if p not in kernel_upper and isinstance(n, Node) and n.type == "dir"}
    drop = {d for d in extra
            if all(q in aliases or q in extra for q in upper if q.startswith(d + "/"))}
    return {p: n for p, n in upper.items() if p not in drop}


def _comparable(tree: dict[str, Any], aliases: set[str]) -> dict[str, Any]:
    """An upper, or a tree seen through a mount with a fresh workdir, as compared: without the
    lower-hardlink names and without link counts of non-directories (an index=on kernel keeps
    and counts links in its work/index; the merged trees compare both in full)."""
    return {p: dataclasses.replace(n, nlink=None) if isinstance(n, Node) else n
            for p, n in _without_aliases(tree, aliases).items()}


def _machine(other: str, root: Path) -> type[UnionComparison]:
    if other == "fuse":
        def make(cls: type[UnionComparison], base: Path) -> Backend:
            return FuseBackend(base)
    elif other == "fuse-kernel":
        def make(cls: type[UnionComparison], base: Path) -> Backend:
            return FuseBackend(base, "kernel")
    elif other == "kernel":
        def make(cls: type[UnionComparison], base: Path) -> Backend:
            return KernelBackend()
    else:
        def make(cls: type[UnionComparison], base: Path) -> Backend:
            return ModelBackend()
    return type(f"KernelVs{other.title().replace('-', '')}", (UnionComparison,), {
        "root": root, "other_name": other, "created": [], "make_other": classmethod(make),
    })


@pytest.mark.parametrize("other", ["kernel", "fuse", "fuse-kernel", "model"])
def test_random_operations_match_kernel(other: str, conformance_root: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Random sequences: every result equal to the kernel's; trees, uppers, cross-mounts too.

    ``other=kernel`` compares the oracle with itself: it must always pass, and shows that the
    comparison holds nothing nondeterministic."""
    unavailable = {"kernel": lambda: None, "fuse": fuse_unavailable, "fuse-kernel": fuse_unavailable,
                   "model": model_unavailable}[other]
    reason = kernel_unavailable() or unavailable()
    if reason:
        pytest.skip(reason)
    from hypothesis.internal.conjecture import engine

    # a failing FUSE example costs seconds; keep a red run within minutes, not 5 minutes of shrinking
    if hasattr(engine, "MAX_SHRINKING_SECONDS"):
        monkeypatch.setattr(engine, "MAX_SHRINKING_SECONDS", SHRINK_SECONDS)
    machine = _machine(other, conformance_root)
    try:
        run_state_machine_as_test(machine, settings=SETTINGS)
    finally:
        leftovers = []
        for backend in machine.created:
            try:
                backend.close()
            except AssertionError as e:
                leftovers.append(str(e))
        assert not leftovers, "\n".join(leftovers)
