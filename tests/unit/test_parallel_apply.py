"""Layers of one image unpacked at once (``import_resolved(jobs=N)``, what ``layerfs pull``
does): the result, the safety checks against lower layers and the error reported are those
of unpacking the layers one after the other.

Each layer's stream here is an in-memory tar behind a reader that can be slowed down, so a
lower layer is still being written while the one above it runs.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

import pytest

from layerfs.digest import Digest
from layerfs.errors import DigestMismatch, UnsafeArchive
from layerfs.image.config import build_config
from layerfs.image.oci import OCI_LAYER, LayerBlob, ResolvedImage
from layerfs.importer import import_resolved
from layerfs.store import Store
from tests.support import imagebuild as ib
from tests.support.tarbuild import tree_fingerprint


class _Slow(io.RawIOBase):
    """``data`` in pieces of ``piece`` bytes, ``delay`` seconds apart."""

    def __init__(self, data: bytes, delay: float, piece: int = 2048) -> None:
        self._data, self._pos, self._delay, self._piece = data, 0, delay, piece

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._delay:
            time.sleep(self._delay)
        n = self._piece if n is None or n < 0 else min(n, self._piece)
        out = self._data[self._pos:self._pos + n]
        self._pos += len(out)
        return out


def _image(tars: list[bytes], delays: list[float], diff_ids: list[str] | None = None,
           opened: list[int] | None = None) -> ResolvedImage:
    ids = diff_ids or [Digest.of(t) for t in tars]
    config, config_bytes = build_config(None, ids, [{"created_by": f"layer {i}"} for i in range(len(tars))],
                                        created_ns=0)

    def opener(i: int) -> Callable[[], BinaryIO]:
        def open_() -> BinaryIO:
            if opened is not None:
                opened.append(i)
            return cast(BinaryIO, _Slow(tars[i], delays[i]))  # each read returns at most a piece
        return open_

    layers = [LayerBlob(Digest.of(t), len(t), OCI_LAYER, opener(i)) for i, t in enumerate(tars)]
    return ResolvedImage(["test/parallel:1"], config_bytes, Digest.of(config_bytes), config, None, None,
                         [Digest.parse(d) for d in ids], layers)


def _tree(root: Path, name: str = "test/parallel:1") -> dict[str, tuple[object, ...]]:
    with Store(str(root)) as s:
        img = s.get_image(name)
        assert img is not None
        return tree_fingerprint(s.layer_dirs(img.top_chain_id))


def _leftovers(root: Path) -> tuple[list[str], list[str], list[str]]:
    return (sorted(os.listdir(root / "tmp")), sorted(os.listdir(root / "snapshots")),
            sorted(os.listdir(root / "blobs" / "sha256")))


PADDING: dict[str, ib.Entry] = {f"pad/{i:03d}": os.urandom(64) for i in range(150)}  # keeps the lower busy

LAYERS = [
    ib.layer_tar({**PADDING, "etc/motd": "v1\n", "etc/app.conf": "x=1\n", "var/cache/app/a": "a",
                  "bin/sh": ib.Symlink("busybox"), "bin/busybox": "#!\n"}),
    # "usr/share/doc/x" without its parents: they are made over the lower layers' union
    ib.tar_bytes([("usr/share/doc/x", "doc\n"), ("etc/motd", "v2\n"), (ib.whiteout("etc/app.conf"), b""),
                  ("var/cache/app/", ib.Dir()), (ib.opaque("var/cache/app"), b""), ("var/cache/app/fresh", "f")],
                 add_parents=False),
    ib.tar_bytes({"usr/share/doc/y": "more\n", "bin/busybox": "#!v2\n"}, add_parents=False),
]


def test_parallel_result_equals_serial(tmp_path: Path) -> None:
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    with Store(str(serial)) as s:
        one = import_resolved(s, _image(LAYERS, [0.0, 0.0, 0.0]), ["test/parallel:1"], jobs=1)
    with Store(str(parallel)) as s:
        # the bottom layer slowest: the layers above finish their own tars first and wait for it
        many = import_resolved(s, _image(LAYERS, [0.01, 0.0, 0.0]), ["test/parallel:1"], jobs=3)
    assert many.manifest_digest == one.manifest_digest
    assert many.top_chain_id == one.top_chain_id and many.new_layers == one.new_layers
    tree = _tree(parallel)
    assert tree == _tree(serial)
    assert "usr/share/doc/x" in tree and "etc/app.conf" not in tree and "var/cache/app/a" not in tree
    assert _leftovers(parallel)[0] == []


def test_a_symlink_planted_below_is_refused_while_the_lower_layer_is_still_written(tmp_path: Path) -> None:
    # layer 1 ends with a symlink "etc" -> /tmp; layer 2 writes "etc/passwd" without listing
    # "etc": serially that is refused (writing through a lower symlink). Layer 1 is slow, so
    # layer 2 reaches "etc/passwd" long before layer 1 wrote its symlink: it must wait for it.
    lower = ib.tar_bytes([*PADDING.items(), ("etc", ib.Symlink("/tmp"))])
    upper = ib.tar_bytes({"etc/passwd": "root::0:0::/:/bin/sh\n"}, add_parents=False)
    root = tmp_path / "store"
    with Store(str(root)) as s, pytest.raises(UnsafeArchive, match=r"layer 2/2.*'etc' is a symlink in a lower layer"):
        import_resolved(s, _image([lower, upper], [0.01, 0.0]), ["test/parallel:1"], jobs=2)
    tmp, snapshots, blobs = _leftovers(root)
    assert (tmp, snapshots, blobs) == ([], [], [])


def test_the_lowest_failing_layer_is_reported(tmp_path: Path) -> None:
    # layer 1's diffID is wrong (found at its end, slowly); layer 2 is unsafe at once.
    # One after the other, layer 1's error comes first: so it does here.
    bad_upper = ib.tar_bytes({"a/../../escape": "x"}, add_parents=False)
    tars = [LAYERS[0], bad_upper]
    ids = ["sha256:" + "0" * 64, Digest.of(bad_upper)]
    root = tmp_path / "store"
    with Store(str(root)) as s, pytest.raises(DigestMismatch, match=r"layer 1/2"):
        import_resolved(s, _image(tars, [0.005, 0.0], ids), ["test/parallel:1"], jobs=2)
    assert _leftovers(root) == ([], [], [])


def test_layers_above_a_failure_stop(tmp_path: Path) -> None:
    # layer 1 unsafe at once; layer 2 is slow and large: it stops instead of being read to the end
    bad = ib.tar_bytes({"../escape": "x"}, add_parents=False)
    big = ib.tar_bytes({f"f/{i:04d}": os.urandom(512) for i in range(1000)})
    root = tmp_path / "store"
    start = time.monotonic()
    with Store(str(root)) as s, pytest.raises(UnsafeArchive, match=r"layer 1/2"):
        import_resolved(s, _image([bad, big], [0.0, 0.02]), ["test/parallel:1"], jobs=2)
    # read to its end, layer 2 takes > 1000 * 1 KB / 2 KB * 0.02 s = 10 s
    assert time.monotonic() - start < 5.0
    assert _leftovers(root) == ([], [], [])
    assert not [t for t in threading.enumerate() if t.name.startswith("layerfs-apply")]


def test_serial_import_reads_layers_in_order(tmp_path: Path) -> None:
    # jobs=1 (import from an archive, whose streams share one file): one layer at a time
    opened: list[int] = []
    with Store(str(tmp_path / "store")) as s:
        import_resolved(s, _image(LAYERS, [0.0, 0.0, 0.0], opened=opened), ["test/parallel:1"])
    assert opened == [0, 1, 2]
