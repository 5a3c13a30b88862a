"""Rootless podman with ``layerfs-fuse`` as its ``mount_program``, beside fuse-overlayfs.

The scenario of ``test_podman`` (run, diff, mount, export, commit, image tree, build,
buildah, ...), run by the unprivileged test user of ``tests.support.rootless`` (subordinate
uid/gid ranges, so podman maps them with ``newuidmap``/``newgidmap``) in a private podman
configuration in its home: first with fuse-overlayfs (the control), then with the user's
layerfs-fuse (from the user's venv, started by containers/storage inside podman's user
namespace). Each check must show what it is about, and layerfs must show what the control
shows.

Teardown: podman's containers and mounts, then podman's pause process (the holder of its
user namespace, by the pid it records) and whatever mentions the podman's directory, by pid;
the ``RootlessSession`` then checks that no process of the user is left.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration import test_podman
from tests.integration.test_podman import (
    CONTROL,
    CONTROL_BUGS,
    EXPECT,
    LAYERFS,
    PROGRAMS,
    TIMEOUT,
    Podman,
    build_image,
    needs_podman,
    scenario,
)
from tests.support.containerd_util import kill_pid, pids_mentioning
from tests.support.markers import needs_root, needs_skopeo, needs_umoci
from tests.support.rootless import RootlessSession, rm

MOUNT_FSTYPE, TREE_LISTING = test_podman.mount_fstype, test_podman.tree_listing  # before any patching
pytestmark = [needs_root, needs_umoci, needs_skopeo, needs_podman, pytest.mark.slow]


@dataclass
class RootlessPodman(Podman):
    """``Podman`` run by the test user (``rl``), with the user's layerfs-fuse."""

    rl: RootlessSession | None = None
    # ``podman mount`` of a rootless podman works only inside ``podman unshare`` (its mount
    # namespace, and a FUSE mount only the user may read): the listing is taken there
    mounted: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # path -> name, fstype, listing

    def __post_init__(self) -> None:
        super().__post_init__()
        assert self.rl is not None
        b = self.base
        if self.program == LAYERFS:
            (b / "layerfs-fuse").write_text(
                f'#!/bin/sh\nexec {self.rl.bin}/python -m layerfs.fuse.main --log {b}/layerfs-fuse.log "$@"\n')
        self.env = {k: v for k, v in self.env.items()
                    if k.startswith("CONTAINERS_") or k == "TMPDIR"}
        self.rl.give(b)

    def _run(self, tool: str | None, args: tuple[str, ...], check: bool, cwd: Path | None
             ) -> subprocess.CompletedProcess[str]:
        assert tool is not None and self.rl is not None
        proc = subprocess.run(self.rl.argv([tool, *args], env=self.env), capture_output=True, text=True,
                              timeout=TIMEOUT, cwd=cwd or self.base)
        if check and proc.returncode != 0:
            raise AssertionError(f"{Path(tool).name} {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stderr[-4000:]}\n{self.fuse_log()}")
        return proc

    def podman(self, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        if len(args) == 2 and args[0] == "mount":
            return self._mount_in_unshare(args[1])
        if len(args) == 2 and args[0] == "unmount" and args[1] in self.unmounted:
            return subprocess.CompletedProcess(["podman", *args], 0, "", "")
        return super().podman(*args, check=check, cwd=cwd)

    @property
    def unmounted(self) -> set[str]:
        return {name for name, _, _ in self.mounted.values()}

    def _mount_in_unshare(self, name: str) -> subprocess.CompletedProcess[str]:
        """``podman mount NAME`` inside ``podman unshare``: the fstype and ``tree_listing``
        of the mount taken there, then ``podman unmount``; ``mount_fstype``/``tree_listing``
        (patched by ``results``) hand them to the scenario by the path printed."""
        assert self.rl is not None
        code = ("import hashlib, json, os, stat, sys\nfrom pathlib import Path\n"
                + inspect.getsource(TREE_LISTING) + inspect.getsource(MOUNT_FSTYPE)
                + "print(json.dumps([mount_fstype(sys.argv[1]), tree_listing(Path(sys.argv[1]))]))\n")
        script = (f'p=$(podman mount {name}) && {self.rl.bin}/python -c "$0" "$p" && echo "$p"; '
                  f'rc=$?; podman unmount {name} >/dev/null; exit $rc')
        r = super().podman("unshare", "sh", "-c", script, code)
        listing, path = r.stdout.strip().splitlines()[-2:]
        fstype, tree = json.loads(listing)
        self.mounted[path] = (name, fstype, tree)
        return subprocess.CompletedProcess(["podman", "mount", name], 0, path + "\n", r.stderr)

    def mount_fstype(self, target: str) -> str:
        return self.mounted[target][1] if target in self.mounted else MOUNT_FSTYPE(target)

    def tree_listing(self, root: Path) -> str:
        return self.mounted[str(root)][2] if str(root) in self.mounted else TREE_LISTING(root)

    def pause_pid(self) -> int | None:
        assert self.rl is not None
        # podman keeps it in its tmp_dir (containers.conf), else under XDG_RUNTIME_DIR
        for path in (self.base / "tmp" / "pause.pid", Path(self.rl.env()["XDG_RUNTIME_DIR"]) / "libpod/tmp/pause.pid"):
            with contextlib.suppress(OSError, ValueError):
                return int(path.read_text().strip())
        return None

    def teardown(self) -> None:
        super().teardown()
        pid = self.pause_pid()
        if pid is not None:
            kill_pid(pid)  # podman's holder of its user namespace, started for this podman
        for pid in pids_mentioning(str(self.base)):
            self.leftovers.append(f"process {pid}")
            kill_pid(pid)


@dataclass
class Results:
    outputs: dict[str, dict[str, str]]
    leftovers: dict[str, list[str]]


@pytest.fixture(scope="module")
def rl() -> Iterator[RootlessSession]:
    with RootlessSession() as session:
        yield session


@pytest.fixture(scope="module")
def results(rl: RootlessSession, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Results]:
    archive = build_image(tmp_path_factory.mktemp("rootless-podman-image"))
    res = Results({}, {})
    for program in PROGRAMS:
        # short paths: podman 4.3 waits 20 s per container when its tmp dir path is long
        base = rl.home / f"pm-{program[:2]}"
        rm(base)
        base.mkdir()
        image = base / "image.oci.tar"
        shutil.copy(archive, image)
        pm = RootlessPodman(base, program, rl=rl)
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(test_podman, "mount_fstype", pm.mount_fstype)
                mp.setattr(test_podman, "tree_listing", pm.tree_listing)
                res.outputs[program] = scenario(pm, image, {})
        finally:
            pm.teardown()
            res.leftovers[program] = pm.leftovers
            # the user's podman storage holds files of its subordinate ids: root removes them
            rm(base)
            for d in (".local/share/containers", ".config/containers", ".run", ".cache/containers"):
                rm(rl.home / d)
    yield res


def _known(check: str, program: str | None) -> list[pytest.MarkDecorator]:
    if check in CONTROL_BUGS and program in (CONTROL, None):
        return [pytest.mark.xfail(strict=True, reason=CONTROL_BUGS[check])]
    return []


@pytest.mark.parametrize("program, check", [pytest.param(p, c, marks=_known(c, p), id=f"{p}-{c}")
                                            for c in EXPECT for p in PROGRAMS])
def test_rootless_check_shows_what_it_must(results: Results, program: str, check: str) -> None:
    got = results.outputs[program][check]
    missing = [want for want in EXPECT[check] if want not in got]
    assert not missing, f"{program}: {check}: missing {missing} in:\n{got}"


@pytest.mark.parametrize("check", [pytest.param(c, marks=_known(c, None), id=c) for c in EXPECT])
def test_rootless_layerfs_matches_fuse_overlayfs(results: Results, check: str) -> None:
    control, got = results.outputs[CONTROL][check], results.outputs[LAYERFS][check]
    assert got == control, f"{check}:\n--- fuse-overlayfs\n{control}\n--- layerfs-fuse\n{got}"


def test_rootless_nothing_left(results: Results) -> None:
    assert results.leftovers == {p: [] for p in PROGRAMS}
    assert os.path.exists("/dev/fuse")
