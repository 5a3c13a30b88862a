"""``layerfs-fuse`` run by Debian's ``mount.fuse3`` the way others run it, with a default PATH.

containerd (its shims, ``ctr``) executes a ``fuse3.X`` mount as ``mount.fuse3 SOURCE TARGET
-o OPT ... -t X`` (it strips exactly ``fuse3.``), and mount.fuse3 runs ``'X' 'SOURCE' 'TARGET'
-o 'OPTS'`` through /bin/sh, quoting each word. So the snapshotter's FUSE type names the
program absolutely (``fuse3./abs/path/to/layerfs-fuse``): checked here with the real program
path (a venv's, ``.venv`` has a dot) and a path with a quote, a blank and dots. mount(8) cuts
a type at its last dot to find its helper, so from mount(8) the program goes into the source
instead: ``mount -t fuse3 '/abs/path#SOURCE'``. Whatever the program path, the mount is
``fuse.layerfs-fuse`` in mountinfo (the program sets the subtype). Mounts are undone in
finalizers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.linux.mountinfo import mount_table
from layerfs.mount import fuse
from tests.support.markers import IS_ROOT

DEFAULT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # a stock containerd's; nothing of ours
MOUNT_FUSE3 = shutil.which("mount.fuse3", path=DEFAULT_PATH)

pytestmark = pytest.mark.skipif(
    not IS_ROOT or not os.path.exists("/dev/fuse") or MOUNT_FUSE3 is None or shutil.which("fusermount3") is None,
    reason="needs root, /dev/fuse, mount.fuse3 and fusermount3 (Debian package fuse3)")


def daemon_of(target: Path) -> int | None:
    """The layerfs-fuse daemon serving ``target`` (found by its command line)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and fuse.is_daemon(int(entry), str(target)):
            return int(entry)
    return None


@pytest.fixture
def lowers(tmp_path: Path) -> str:
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    top.mkdir()
    bottom.mkdir()
    (top / "a").write_text("top\n")
    (bottom / "a").write_text("bottom\n")
    (bottom / "b").write_text("bottom\n")
    return f"lowerdir={top}:{bottom}"


@pytest.fixture
def targets(tmp_path: Path) -> Iterator[list[Path]]:
    """Mount points; whatever is mounted on them at the end is unmounted, its daemon waited for."""
    made: list[Path] = []
    yield made
    for target in made:
        pid = daemon_of(target)
        if os.path.ismount(target) or pid is not None:
            fuse.unmount(str(target), pid)


def new_target(targets: list[Path], base: Path) -> Path:
    target = base / f"mp{len(targets)}"
    target.mkdir()
    targets.append(target)
    return target


def check_mounted(target: Path, source: str) -> None:
    (entry,) = [e for e in mount_table() if e.mount_point == str(target)]
    assert (entry.fs_type, entry.source) == ("fuse.layerfs-fuse", source)
    assert (target / "a").read_text() == "top\n" and (target / "b").read_text() == "bottom\n"
    with pytest.raises(OSError):
        (target / "new").write_text("x")  # no upperdir: read-only


def run(argv: list[str]) -> None:
    r = subprocess.run(argv, env={"PATH": DEFAULT_PATH}, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{argv}: {r.returncode}\n{r.stdout}\n{r.stderr}"


def odd_program_path(base: Path) -> str:
    """The program behind a path with a quote, a blank and dots (a symlink to the real one)."""
    odd = base / "it's a.dir" / "v1.2"
    odd.mkdir(parents=True)
    (odd / "layerfs-fuse").symlink_to(fuse.program_path())
    return str(odd / "layerfs-fuse")


def test_mount_fuse3_runs_the_program_named_in_the_type(tmp_path: Path, lowers: str, targets: list[Path]) -> None:
    """containerd's command line for a ``fuse3./abs/path/layerfs-fuse`` mount, with its default PATH."""
    assert MOUNT_FUSE3 is not None
    for program in (fuse.program_path(), odd_program_path(tmp_path)):
        assert os.path.dirname(program) not in DEFAULT_PATH.split(":")
        target = new_target(targets, tmp_path)
        run([MOUNT_FUSE3, "layerfs", str(target), "-o", lowers, "-o", "ro", "-t", program])
        check_mounted(target, "layerfs")
        assert daemon_of(target) is not None
        fuse.unmount(str(target), daemon_of(target))
        assert not os.path.ismount(target) and daemon_of(target) is None


def test_mount8_takes_the_program_in_the_source(tmp_path: Path, lowers: str, targets: list[Path]) -> None:
    """``mount -t fuse3 '/abs/path/layerfs-fuse#SOURCE'`` (the README's advice for mount(8)),
    a program path with dots included."""
    mount = shutil.which("mount", path=DEFAULT_PATH)
    if mount is None:
        pytest.skip("mount(8) not installed")
    for program in (fuse.program_path(), odd_program_path(tmp_path)):
        target = new_target(targets, tmp_path)
        run([mount, "-t", "fuse3", "-o", lowers, f"{program}#mysrc", str(target)])
        check_mounted(target, "mysrc")
        fuse.unmount(str(target), daemon_of(target))
        assert not os.path.ismount(target) and daemon_of(target) is None
