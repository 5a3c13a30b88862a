"""Issue 14 (errors on a user's path): an export whose destination is on another, full
filesystem fails in one line that names the destination and the room left on *its*
filesystem, not the store's, and leaves nothing there; on a read-only one the line names
the destination, not the hidden temp file written beside it.

The full filesystem is a 64 KiB tmpfs mounted below tmp_path (root only); the finalizer
unmounts it with umount(8).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import imagebuild as ib
from tests.support.cliresult import mounted_under, one_line_error
from tests.support.markers import needs_root


def lf(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs at tmp_path/small, unmounted at the end."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        for point in reversed(mounted_under(mnt)):
            subprocess.run(["umount", "-l", point], check=False)


@needs_root
def test_export_to_a_full_filesystem_names_the_destination(tmp_path: Path, small: Path) -> None:
    root = tmp_path / "store"
    layout = tmp_path / "layout"
    big = os.urandom(512 << 10)  # incompressible: the gzip output does not fit either
    desc = ib.add_image(layout, [ib.layer_tar({"data/big": big})])
    ib.set_index(layout, [(desc, {ib.REF_NAME: "t"})])
    r = lf(root, "import", str(layout), "--name", "demo/big:1")
    assert r.returncode == 0, r.stderr
    for name in ("image.tar", "image.tgz"):
        out = small / name
        line = one_line_error(lf(root, "export", "demo/big:1", str(out)))
        assert "No space left on device" in line and str(out) in line, line
        assert f"free now on the filesystem of {small}" in line, line
        assert str(root) not in line, line  # the store's filesystem had room: not its fault
        assert list(small.iterdir()) == [], name  # no partial file left
    # a read-only destination: the error names the user's path, not the temp file beside it
    subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
    for name in ("image.tar", "image.tgz"):
        out = small / name
        line = one_line_error(lf(root, "export", "demo/big:1", str(out)))
        assert line.endswith(f"export: Read-only file system: {out}"), line
