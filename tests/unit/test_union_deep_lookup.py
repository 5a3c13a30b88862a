"""Name lookups in a merged directory of many layers (``union.dirindex``).

A name looked up past ``dirindex.SCAN_LAYERS`` layers (or found in none of more) makes the
directory's name -> layer map at once, so later lookups stop walking every layer. Both
ways of answering must agree with overlayfs' rule -- the topmost layer that has or hides a
name decides -- whatever order the lookups come in. No mount, no root: whiteouts here are
``.wh.`` files, which every layer format layerfs reads honours.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from layerfs.union import dirindex
from layerfs.union.api import ROOT_INODE
from layerfs.union.fs import UnionFS

DEPTH = 3 * dirindex.SCAN_LAYERS  # top layer 0 ... bottom layer DEPTH-1


def _layers(tmp_path: Path) -> list[str]:
    """``d/`` in every layer; ``d/atK`` only in layer K (holding "K"); ``d/shadow`` in a
    high and a deep layer; ``d/hidden`` deep, whited out above; ``d/sub/`` in two layers."""
    layers = []
    for k in range(DEPTH):
        d = tmp_path / f"l{k}" / "d"
        d.mkdir(parents=True)
        (d / f"at{k}").write_text(str(k))
        layers.append(str(tmp_path / f"l{k}"))
    (tmp_path / "l2" / "d" / "shadow").write_text("top")
    (tmp_path / f"l{DEPTH - 2}" / "d" / "shadow").write_text("deep")
    (tmp_path / f"l{DEPTH - 1}" / "d" / "hidden").write_text("x")
    (tmp_path / f"l{DEPTH // 2}" / "d" / ".wh.hidden").write_text("")
    for k in (1, DEPTH - 1):
        sub = tmp_path / f"l{k}" / "d" / "sub"
        sub.mkdir()
        (sub / f"s{k}").write_text(str(k))
    return layers


def _content(fs: UnionFS, parent: int, name: str) -> str | int:
    """The content of file ``name`` in directory ``parent``, or the errno of its lookup."""
    try:
        attr = fs.lookup(parent, name.encode())
    except OSError as e:
        return e.errno or 0
    fh = fs.open(attr.st_ino if not attr.inode else attr.inode, os.O_RDONLY)
    try:
        return fs.read(fh, 0, 100).decode()
    finally:
        fs.release(fh)


ORDERS = {
    "top-first": ["at0", "at1", "shadow", f"at{DEPTH - 1}", "hidden", "missing", "sub"],
    "bottom-first": [f"at{DEPTH - 1}", "at0", "shadow", "hidden", "missing", "sub"],
    "miss-first": ["missing", "shadow", "at0", "hidden", f"at{DEPTH - 1}", "sub"],
    "whiteout-first": ["hidden", "missing", "shadow", "at0", "sub"],
}


@pytest.mark.parametrize("writable", [False, True], ids=["readonly", "writable"])
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_deep_lookups_follow_the_topmost_layer(tmp_path: Path, order: str, writable: bool) -> None:
    layers = _layers(tmp_path / "layers")
    if writable:
        (tmp_path / "u").mkdir()
        (tmp_path / "w").mkdir()
        fs = UnionFS(layers, str(tmp_path / "u"), str(tmp_path / "w"))
    else:
        fs = UnionFS(layers)
    try:
        d = fs.lookup(ROOT_INODE, b"d")
        d_node = d.inode or d.st_ino
        expected: dict[str, str | int] = {"shadow": "top", "hidden": errno.ENOENT, "missing": errno.ENOENT}
        for name in ORDERS[order]:
            if name == "sub":
                sub = fs.lookup(d_node, b"sub")
                sub_node = sub.inode or sub.st_ino
                # a directory in two layers far apart: both merge
                assert _content(fs, sub_node, "s1") == "1"
                assert _content(fs, sub_node, f"s{DEPTH - 1}") == str(DEPTH - 1)
                continue
            want = expected.get(name, name[2:])
            assert _content(fs, d_node, name) == want, name
        # after the map exists (or not): every name still answers from its own layer
        for k in range(DEPTH):
            assert _content(fs, d_node, f"at{k}") == str(k)
        assert _content(fs, d_node, "shadow") == "top"
        assert _content(fs, d_node, "hidden") == errno.ENOENT
        assert _content(fs, d_node, ".wh.hidden") == errno.ENOENT
    finally:
        fs.destroy()
