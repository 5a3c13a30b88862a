"""``UnionFS.readdir`` counting one lookup per returned entry (``readdir_counts_lookups``),
as the kernel transport's dispatcher asks it to, so a READDIRPLUS entry needs no ``lookup``."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from layerfs.fuse.dispatch import Dispatcher
from layerfs.union.api import DirEntry
from layerfs.union.fs import UnionFS


def _layers(tmp_path: Path) -> list[str]:
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    for layer, names in ((top, ("a", "b")), (bottom, ("b", "c"))):
        (layer / "d").mkdir(parents=True)
        for n in names:
            (layer / "d" / n).write_text(n)
    return [str(top), str(bottom)]


def _list(fs: UnionFS, inode: int) -> list[DirEntry]:
    fh = fs.opendir(inode)
    try:
        out: list[DirEntry] = []
        offset = 0
        while batch := fs.readdir(fh, offset):
            out.extend(batch)
            offset = batch[-1].next_offset
        return out
    finally:
        fs.releasedir(fh)


def _known(fs: UnionFS, inode: int) -> bool:
    try:
        fs.getattr(inode)
    except OSError as e:
        assert e.errno == errno.ESTALE  # forgotten
        return False
    return True


@pytest.mark.parametrize("counting", [False, True], ids=["lookups", "counted"])
def test_readdir_counts_one_lookup_per_entry_only_when_asked(tmp_path: Path, counting: bool) -> None:
    fs = UnionFS(_layers(tmp_path))
    try:
        fs.readdir_counts_lookups = counting
        d = fs.lookup(1, b"d")
        entries = _list(fs, d.st_ino)
        assert sorted(e.name for e in entries) == [b"a", b"b", b"c"]
        inodes = [e.attr.inode or e.attr.st_ino for e in entries]
        # counted entries outlive the listing, as after a lookup each; uncounted ones do not
        assert [_known(fs, i) for i in inodes] == [counting] * 3
        if counting:
            for i, e in zip(inodes, entries, strict=True):
                assert fs.getattr(i) == e.attr
                fs.forget(i, 1)
            assert not any(_known(fs, i) for i in inodes)  # one forget each gave the count back
    finally:
        fs.destroy()


def test_the_kernel_transport_asks_unionfs_to_count(tmp_path: Path) -> None:
    fs = UnionFS(_layers(tmp_path))
    try:
        assert not fs.readdir_counts_lookups  # the pyfuse3 adapter and direct users: no counting
        d = Dispatcher(fs)
        assert fs.readdir_counts_lookups and d.counts_lookups
        d.close()
    finally:
        fs.destroy()
