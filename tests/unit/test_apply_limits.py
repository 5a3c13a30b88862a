"""Limits count what lands on disk (issue 15): sparse members by their logical size,
hardlinks as names (no data), decompression bombs by their output; every refusal names
the entry and leaves nothing big behind."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from layerfs.errors import LimitExceeded, UnsafeArchive
from layerfs.layer.apply import RATIO_FREE_BYTES, apply_layer
from layerfs.layer.compression import Limits, open_decompressed
from layerfs.union.whiteout import UNPRIVILEGED_FILES
from tests.support.hostile_corpus import gnu_sparse, gz, hard, reg, tar


def _apply(data: bytes, dest: Path, limits: Limits | None = None) -> None:
    apply_layer(io.BytesIO(data), str(dest), fmt=UNPRIVILEGED_FILES, limits=limits)


def pax_sparse(name: str, regions: list[tuple[int, bytes]], size: int) -> bytes:
    """One PAX 1.0 sparse member (GNU tar's --sparse-version=1.0, any size): the map as
    decimal lines at the start of the data, then the stored regions."""
    lines = [str(len(regions))] + [str(x) for off, d in regions for x in (off, len(d))]
    sparse_map = "\n".join(lines).encode() + b"\n"
    sparse_map += b"\0" * (-len(sparse_map) % 512)
    body = sparse_map + b"".join(d for _, d in regions)
    ti = tarfile.TarInfo(f"GNUSparseFile.0/{os.path.basename(name)}")
    ti.size = len(body)
    ti.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                      "GNU.sparse.realsize": str(size)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(ti, io.BytesIO(body))
    return buf.getvalue()


def _allocated(dest: Path) -> int:
    seen: set[int] = set()
    total = 0
    for dirpath, _, files in os.walk(dest):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


@pytest.mark.parametrize("size", [10 * 10**9, 16 * 2**40], ids=["10GB", "16TB"])
def test_sparse_claim_far_beyond_the_stream_is_refused(tmp_path: Path, size: int) -> None:
    data = pax_sparse("var/log/huge", [(0, b"x" * 100)], size)
    assert len(data) <= 10240  # one tar record
    with pytest.raises(LimitExceeded) as ei:
        _apply(data, tmp_path)
    msg = str(ei.value)
    assert ei.value.entry == "var/log/huge" and "'var/log/huge'" in msg, msg
    assert str(size) in msg and "sparse" in msg, msg
    assert ("LAYERFS_MAX_RATIO" if size < Limits().max_bytes else "LAYERFS_MAX_LAYER_BYTES") in msg, msg
    assert _allocated(tmp_path) < 1 << 20
    assert not os.path.exists(tmp_path / "var" / "log" / "huge")  # refused before it was made


def test_sparse_within_the_free_allowance_is_kept_sparse(tmp_path: Path) -> None:
    size = RATIO_FREE_BYTES  # exactly the allowance: accepted, written with its holes
    _apply(gnu_sparse("s", [(size - 4096, b"e" * 4096)], size), tmp_path)
    st = os.lstat(tmp_path / "s")
    assert st.st_size == size and st.st_blocks * 512 < 1 << 20


def test_sparse_logical_size_counts_against_max_bytes(tmp_path: Path) -> None:
    limits = Limits(max_bytes=1 << 20)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _apply(gnu_sparse("ok", [(0, b"a")], 1 << 20), tmp_path / "a", limits)
    with pytest.raises(LimitExceeded) as ei:
        _apply(gnu_sparse("big", [(0, b"a")], (1 << 20) + 1), tmp_path / "b", limits)
    assert ei.value.entry == "big" and "LAYERFS_MAX_LAYER_BYTES" in str(ei.value)


def test_hardlinks_add_no_bytes(tmp_path: Path) -> None:
    """1000 names of one 1 MiB file land as 1 MiB and count as 1 MiB."""
    payload = os.urandom(1 << 20)
    data = tar(reg("f", payload), *[hard(f"l{i}", "f") for i in range(1000)])
    _apply(data, tmp_path, Limits(max_bytes=(1 << 20) + 10))
    assert os.lstat(tmp_path / "f").st_nlink == 1001
    assert _allocated(tmp_path) < 2 << 20


def test_many_small_files_count_their_sum(tmp_path: Path) -> None:
    data = tar(*[reg(f"f{i}", b"x" * 1000) for i in range(20)])
    with pytest.raises(LimitExceeded) as ei:
        _apply(data, tmp_path, Limits(max_bytes=10_500))
    assert ei.value.entry == "f10", str(ei.value)


def test_decompression_bomb_names_the_entry(tmp_path: Path) -> None:
    bomb = gz(tar(reg("zeros", b"\0" * (40 << 20))))
    assert len(bomb) < 100_000
    limits = Limits(max_ratio=100.0, min_ratio_bytes=1 << 20)
    with pytest.raises(LimitExceeded) as ei:
        apply_layer(open_decompressed(io.BytesIO(bomb), "layer x", limits), str(tmp_path),
                    fmt=UNPRIVILEGED_FILES, limits=limits)
    assert ei.value.entry == "zeros" and "compression ratio" in str(ei.value), str(ei.value)
    assert _allocated(tmp_path) < 8 << 20  # stopped early, not after 40 MiB


def test_xattr_the_filesystem_refuses_names_entry_not_fd(tmp_path: Path) -> None:
    ti = tarfile.TarInfo("f")
    ti.pax_headers = {"SCHILY.xattr.user." + "n" * 300: "v"}  # a name past XATTR_NAME_MAX: ERANGE
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(ti, io.BytesIO(b""))
    with pytest.raises(UnsafeArchive) as ei:
        _apply(buf.getvalue(), tmp_path)
    msg = str(ei.value)
    assert ei.value.entry == "f" and "cannot set xattr user.nnn" in msg and msg.rstrip().endswith(
        os.strerror(34)), msg


def test_cli_error_never_ends_in_an_fd_number() -> None:
    from layerfs.cli.base import describe_oserror

    assert describe_oserror(OSError(34, os.strerror(34), 11)) == os.strerror(34)
    assert describe_oserror(OSError(28, os.strerror(28), "/s/tmp/x")) == f"{os.strerror(28)}: /s/tmp/x"
