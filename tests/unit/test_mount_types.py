"""FUSE mount types: the ones layerfs-fuse serves, and finding the program to name in them.

containerd runs a ``fuse3.X`` mount as ``mount.fuse3 SOURCE TARGET -o ... -t X`` (it strips
exactly ``fuse3.``) and mount.fuse3 runs ``X`` through /bin/sh with a default PATH, so the
snapshotter names the program absolutely (``fuse3./abs/path/layerfs-fuse``); the names
without a path stay accepted everywhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from layerfs.errors import InvalidArgument, Unsupported
from layerfs.mount import fuse
from layerfs.mount.spec import FUSE, MountSpec, is_fuse_type


@pytest.mark.parametrize("fstype", [
    "fuse3.layerfs-fuse", "fuse.layerfs-fuse", "fuse3./usr/local/bin/layerfs-fuse",
    "fuse3./opt/layerfs/.venv/bin/layerfs-fuse", "fuse./a b/it's.here/layerfs-fuse",
])
def test_layerfs_fuse_types(fstype: str) -> None:
    assert is_fuse_type(fstype)
    assert fuse.is_union_type(fstype)


@pytest.mark.parametrize("fstype", [
    "overlay", "bind", "fuse3", "fuse", "fuse3.fuse-overlayfs", "fuse3.bin/layerfs-fuse",
    "fuse3./usr/bin/layerfs-fuse-other", "fuse3./usr/bin/fuse-overlayfs", "fuseblk.layerfs-fuse",
    "fuse3.layerfs-fuse/", "layerfs-fuse",
])
def test_other_types(fstype: str) -> None:
    assert not is_fuse_type(fstype)


def test_as_fuse_names_the_program() -> None:
    spec = MountSpec.overlay(["/l/a", "/l/b"], "/u", "/w")
    assert spec.as_fuse().type == FUSE == "fuse3.layerfs-fuse"
    named = spec.as_fuse("/opt/x.y/.venv/bin/layerfs-fuse")
    assert (named.type, named.source, named.options) == ("fuse3./opt/x.y/.venv/bin/layerfs-fuse", "layerfs",
                                                         spec.options)
    assert MountSpec.from_containerd(named.to_containerd()) == named
    assert fuse.program_options(named) == list(spec.options)
    for bad in ("layerfs-fuse", "bin/layerfs-fuse", "/usr/bin/fuse-overlayfs"):
        with pytest.raises(InvalidArgument):
            spec.as_fuse(bad)


def test_program_path_beside_this_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / ".venv" / "bin"
    bindir.mkdir(parents=True)
    python = bindir / "python"
    python.symlink_to(sys.executable)  # a venv's python is a symlink: not resolved
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(Unsupported, match="layerfs-fuse"):
        fuse.program_path()
    prog = bindir / "layerfs-fuse"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o644)
    with pytest.raises(Unsupported):
        fuse.program_path()  # not executable
    prog.chmod(0o755)
    assert fuse.program_path() == str(prog)


def test_program_path_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    onpath = tmp_path / "sbin"
    onpath.mkdir()
    prog = onpath / "layerfs-fuse"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'empty'}{os.pathsep}{onpath}")
    assert fuse.program_path() == str(prog)


def test_program_path_of_this_checkout() -> None:
    path = fuse.program_path()
    assert os.path.isabs(path) and os.path.basename(path) == "layerfs-fuse" and os.access(path, os.X_OK)
