"""The kernel transport's data path: READ and WRITE served by data threads, READ replies
spliced from the file to /dev/fuse (``--splice on``, the default) or read into a buffer
(``--splice off``). Behaviour only: the bytes a reader sees, and which path the daemon's
counters say served them.

Every mount is its own (tmp_path), unmounted by the ``daemons`` fixture; no global state.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from layerfs.errors import UsageError
from layerfs.fuse import main as fuse_main
from tests.integration.test_fuse_kernel_transport import Daemons, daemons, needs_fuse

__all__ = ["daemons"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(180)

SIZE = (9 << 20) + 12345  # not a multiple of the page size nor of the READ size


def _lower(tmp_path: Path) -> tuple[Path, bytes]:
    lower = tmp_path / "lower"
    lower.mkdir()
    data = random.Random(11).randbytes(SIZE)
    (lower / "big").write_bytes(data)
    (lower / "empty").write_bytes(b"")
    return lower, data


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _preads(path: Path, data: bytes) -> None:
    """Unaligned preads, reads across and past the end: what the file holds, nothing else."""
    rng = random.Random(5)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(200):
            off = rng.randrange(SIZE + 4096)
            size = rng.choice((1, 511, 4096, 4097, 65536 + 3, 1 << 20))
            assert os.pread(fd, size, off) == data[off:off + size], (off, size)
        assert os.pread(fd, 4096, SIZE) == b""
        assert os.pread(fd, 100, SIZE - 10) == data[-10:]
    finally:
        os.close(fd)


@needs_fuse
@pytest.mark.parametrize("splice", ["on", "off"])
def test_lower_file_reads_return_its_bytes(tmp_path: Path, daemons: Daemons, splice: str) -> None:
    lower, data = _lower(tmp_path)
    d = daemons.mount([lower], upper=True, extra=("--splice", splice))
    big = d.mountpoint / "big"
    assert hashlib.sha256(big.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert (d.mountpoint / "empty").read_bytes() == b""
    _drop_cache(big)  # the preads reach the daemon again
    _preads(big, data)
    stats = d.stats()
    reads = stats["requests"]["READ"]
    assert reads >= SIZE // (1 << 20)
    assert stats["data_requests"] >= reads  # every READ went to a data thread
    if splice == "on":
        assert stats["spliced_reads"] >= SIZE // (1 << 20)  # the big sequential ones at least
    else:
        assert stats["spliced_reads"] == 0
    assert stats["unexpected_errors"] == 0


@needs_fuse
@pytest.mark.parametrize("splice", ["on", "off"])
def test_a_reader_open_before_copy_up_reads_the_upper_copy(tmp_path: Path, daemons: Daemons, splice: str) -> None:
    """As kernel overlayfs >= 4.19: a read-only fd of a lower file sees the copy-up's data
    (both READ paths ask the model for the fd to read, after the copy-up the upper one)."""
    lower, data = _lower(tmp_path)
    d = daemons.mount([lower], upper=True, extra=("--splice", splice))
    big = d.mountpoint / "big"
    ro = os.open(big, os.O_RDONLY)
    try:
        assert os.pread(ro, 100, 0) == data[:100]
        with open(big, "r+b") as w:  # copies the file up
            w.seek(SIZE - 4)
            w.write(b"TAIL")
        # the kernel cached what it read before; the tail was never read through ro
        assert os.pread(ro, 8, SIZE - 8) == data[SIZE - 8:SIZE - 4] + b"TAIL"
    finally:
        os.close(ro)
    assert (d.mountpoint / "big").read_bytes()[-4:] == b"TAIL"


@needs_fuse
def test_writes_through_data_threads_land_in_the_upper(tmp_path: Path, daemons: Daemons) -> None:
    """Without passthrough every WRITE reaches the daemon: big and small, appends and
    overwrites, and the data is in the upper file, byte for byte."""
    lower, data = _lower(tmp_path)
    d = daemons.mount([lower], upper=True, extra=("--passthrough", "off"))
    new = d.mountpoint / "new"
    payload = random.Random(3).randbytes(3 << 20)
    with open(new, "wb") as f:
        f.write(payload)
    with open(new, "ab") as f:
        f.write(b"appended")
    with open(d.mountpoint / "big", "r+b") as f:
        f.seek(4095)
        f.write(b"xy")
    assert (tmp_path / "upper0" / "new").read_bytes() == payload + b"appended"
    upper_big = (tmp_path / "upper0" / "big").read_bytes()
    assert upper_big == data[:4095] + b"xy" + data[4097:]
    stats = d.stats()
    assert stats["requests"]["WRITE"] >= 4 and stats["data_requests"] >= stats["requests"]["WRITE"]
    assert stats["unexpected_errors"] == 0


@needs_fuse
@pytest.mark.parametrize("passthrough", ["auto", "off"])
def test_closing_a_written_file_sends_no_flush(tmp_path: Path, daemons: Daemons, passthrough: str) -> None:
    """``UnionFS`` buffers nothing (``flush_needed`` False): every open is FOPEN_NOFLUSH, so
    create + write + close costs no FLUSH request, and the data is there at once."""
    lower, _ = _lower(tmp_path)
    d = daemons.mount([lower], upper=True, extra=("--passthrough", passthrough))
    before = d.requests()
    for i in range(20):
        fd = os.open(d.mountpoint / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"%d" % i)
        os.close(fd)
    with open(d.mountpoint / "big", "r+b") as f:  # a copy-up, opened for writing
        f.write(b"head")
    after = d.requests()
    assert after.get("CREATE", 0) - before.get("CREATE", 0) == 20
    assert after.get("FLUSH", 0) == before.get("FLUSH", 0)
    assert [(tmp_path / "upper0" / f"f{i}").read_bytes() for i in range(20)] == [b"%d" % i for i in range(20)]
    assert (tmp_path / "upper0" / "big").read_bytes()[:4] == b"head"


def test_splice_and_writeback_levers_reach_the_mount_config(tmp_path: Path) -> None:
    base = ["-o", f"lowerdir={tmp_path}", str(tmp_path / "mnt")]
    opts = fuse_main.parse_args(["--splice", "off", "--writeback", "on", *base])
    assert not isinstance(opts, str)
    config = fuse_main.kernel_mount_config(opts, 0)
    assert (config.splice, config.writeback) == (False, True)
    default = fuse_main.parse_args(base)
    assert not isinstance(default, str)
    config = fuse_main.kernel_mount_config(default, 0)
    assert (config.splice, config.writeback) == (True, False)  # the defaults: what measured faster
    for bad in (["--splice", "yes"], ["--writeback", "auto"]):
        with pytest.raises(UsageError, match=bad[0]):
            fuse_main.parse_args([*bad, *base])


@needs_fuse
def test_writeback_lever_serves_writes_correctly(tmp_path: Path, daemons: Daemons) -> None:
    """``--writeback on`` (not the default): the kernel negotiates the writeback cache and
    the data still lands in the upper, appends included."""
    lower, _ = _lower(tmp_path)
    d = daemons.mount([lower], upper=True, extra=("--writeback", "on"))
    assert "writeback_cache" in d.stats()["init"]["granted"]
    with open(d.mountpoint / "log", "ab") as f:
        f.write(b"one\n")
    with open(d.mountpoint / "log", "ab") as f:
        f.write(b"two\n")
    assert (d.mountpoint / "log").read_bytes() == b"one\ntwo\n"
    os.sync()
    assert (tmp_path / "upper0" / "log").read_bytes() == b"one\ntwo\n"
