"""A full disk (issue 15): the store lives on a small loop-mounted ext4; the disk is filled
mid-import, mid-commit and mid-export (each fails in one line, saying how much space it
needed, and leaves the store as it was), and then every command that reads or frees
space (images, ps, mounts, umount, rm, rmi, gc, fsck --repair) runs at 0 bytes free, the
disk refilled to 0 before each one.

The filesystem is made with ``-m 0`` (no blocks kept for root), so 0 free means 0 for
this root-run test too. The finalizer unmounts every mount below the test directory and
the loop filesystem (whose loop device is detached with it: ``mount -o loop`` sets
autoclear), and detaches the device by name if it is still attached.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.store import Store
from layerfs.store.fsck import fsck
from tests.support.cliresult import mounted_under, ok, one_line_error
from tests.support.markers import needs_root
from tests.support.tarbuild import tree_fingerprint, write_layer

pytestmark = [needs_root, pytest.mark.skipif(not os.path.exists("/dev/loop-control"), reason="no loop devices")]

MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def lf(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 mounted on tmp_path/disk."""
    image, mnt = tmp_path / "fs.img", tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
                   check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        for mp in sorted(mounted_under(tmp_path), key=len, reverse=True):
            if _libc.umount2(mp.encode(), 0) != 0:
                _libc.umount2(mp.encode(), MNT_DETACH)
        r = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize  # (-m 0: nothing kept for root; f_bfree counts ext4's own reserve)


def fill(path: Path, name: str = "filler") -> Path:
    """Write into ``path/name`` until the disk is full: 0 bytes free afterwards."""
    target = path / name
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 64 << 10, 4096, 512, 1):
            block = b"\xa5" * chunk
            while True:
                try:
                    os.write(fd, block)
                except OSError as e:
                    assert e.errno in (errno.ENOSPC, errno.EDQUOT), e
                    break
        try:
            os.fsync(fd)
        except OSError:
            pass
    finally:
        os.close(fd)
    return target


def _refill(disk: Path) -> None:
    fill(disk, f"filler-{len(list(disk.glob('filler-*')))}")
    assert free_bytes(disk) < 64 << 10, free_bytes(disk)


def _store_state(root: Path) -> dict[str, object]:
    with Store(str(root)) as s:
        images = {i.name: tree_fingerprint(s.layer_dirs(i.top_chain_id)) for i in s.list_images()}
        return {"images": images, "snapshots": [x.key for x in s.list_snapshots()],
                "tmp": os.listdir(s.tmp_dir)}


@pytest.fixture
def store(disk: Path, tmp_path: Path) -> Path:
    root = disk / "store"
    layer = write_layer(str(tmp_path / "base.tar"), {"etc": None, "etc/motd": b"hello\n",
                                                     "data": os.urandom(200_000)})
    ok(lf(root, "import-layer", layer, "--name", "base:1"))
    ok(lf(root, "create", "c1", "--from", "base:1"))
    assert os.path.getsize(root / "reserve") == 8 << 20
    return root


def test_full_disk_mid_import_leaves_the_store_unchanged(store: Path, disk: Path, tmp_path: Path) -> None:
    before = _store_state(store)
    big = write_layer(str(tmp_path / "big.tar.gz"), {"big": None, **{f"big/f{i}": os.urandom(1 << 20)
                                                                     for i in range(60)}}, "gzip")
    line = one_line_error(lf(store, "import-layer", big, "--name", "big:1"))
    assert "import-layer" in line and "no space left on device" in line.lower(), line
    assert "free" in line and "needed more than" in line, line
    assert _store_state(store) == before
    with Store(str(store)) as s:
        assert fsck(s).clean


def test_full_disk_mid_commit_leaves_the_store_unchanged(store: Path, disk: Path, tmp_path: Path) -> None:
    with Store(str(store)) as s:
        from layerfs import containers

        upper = Path(containers.upper(s, containers.get(s, "c1")))
    (upper / "blob").write_bytes(os.urandom(20 << 20))  # committing it needs ~2x: tar + layer
    fill(disk)
    (disk / "filler").write_bytes(b"")  # room again, but not enough for the commit
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free_bytes(disk) - (30 << 20)))
    before = _store_state(store)
    line = one_line_error(lf(store, "commit", "c1", "new:1"))
    assert "commit c1" in line and "no space left on device" in line.lower() and "needs about" in line, line
    assert _store_state(store) == before
    with Store(str(store)) as s:
        assert fsck(s).clean


def test_full_disk_mid_export_leaves_nothing(store: Path, disk: Path, tmp_path: Path) -> None:
    layer = write_layer(str(tmp_path / "big.tar"), {"big": os.urandom(4 << 20)})
    ok(lf(store, "import-layer", layer, "--name", "big:1"))
    before = _store_state(store)
    _refill(disk)
    out = disk / "out.tar"
    line = one_line_error(lf(store, "export", "big:1", str(out)))
    assert "export" in line and "no space left on device" in line.lower() and "needed more than" in line, line
    assert not out.exists() and not [p for p in os.listdir(disk) if p.startswith(".out.tar")]
    assert _store_state(store) == before


def test_every_freeing_command_works_at_zero_bytes_free(store: Path, disk: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok(lf(store, "mount", "c1", str(mnt), "--backend", "kernel"))
    fill(mnt, "written-by-the-container")  # the container fills the disk
    assert free_bytes(disk) < 64 << 10
    for args in (("images",), ("ps",), ("mounts",), ("df",), ("fsck",)):
        _refill(disk)
        out = ok(lf(store, *args))
        if args == ("images",):
            assert "base" in out
        if args == ("ps",):
            assert "c1" in out and str(mnt) in out
    _refill(disk)
    ok(lf(store, "umount", str(mnt)))
    assert not mounted_under(mnt)
    assert json.loads(ok(lf(store, "mounts", "--format", "json"))) == []
    _refill(disk)
    ok(lf(store, "rm", "c1"))  # frees what the container wrote
    assert free_bytes(disk) > 16 << 20
    _refill(disk)
    ok(lf(store, "rmi", "base:1"))
    _refill(disk)
    ok(lf(store, "gc"))
    with Store(str(store)) as s:  # leave garbage for the repair to remove
        os.mkdir(os.path.join(s.tmp_dir, "new-leftover"))
    _refill(disk)
    out = ok(lf(store, "fsck", "--repair"))
    assert "repaired" in out and "tmp/new-leftover" in out
    # space back: the reserve is made whole again by the next command
    for p in disk.glob("filler*"):
        p.unlink()
    ok(lf(store, "images"))
    assert os.lstat(store / "reserve").st_blocks * 512 >= 8 << 20
    with Store(str(store)) as s:
        assert fsck(s).clean and s.list_images() == [] and s.list_snapshots() == []
