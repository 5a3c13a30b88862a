"""A full disk whose reserve could not be made whole again (issue 15): a freeing command
(here gc) gave part of the reserve back, and the disk is still full. Every command that
adds data (import-layer, pull's path through the importer, create, commit) is then refused
at once, in one line that says how much is free and what to remove, instead of failing
midway and using up the room rm, rmi and gc need. Reads still work. Once there is room
again, the next command makes the reserve whole and the writes work.

It uses the loop-mounted small ext4 of ``test_hardening_fulldisk`` (its fixtures: a 64 MiB
filesystem on ``tmp_path/disk``, unmounted and detached in the finalizer).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.integration.test_hardening_fulldisk import (  # noqa: F401 - fixtures
    disk,
    fill,
    free_bytes,
    lf,
    pytestmark,
    store,
)
from tests.support.cliresult import ok, one_line_error
from tests.support.tarbuild import write_layer


def test_writes_are_refused_while_the_reserve_cannot_be_restored(store: Path, disk: Path,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    small = write_layer(str(tmp_path / "small.tar"), {"s": b"small\n"})
    fill(disk)
    ok(lf(store, "gc"))  # at 0 bytes free: it takes a slice of the reserve to record its work
    assert os.lstat(store / "reserve").st_blocks * 512 < 8 << 20
    assert free_bytes(disk) < 2 << 20
    for args, what in ((("import-layer", small, "--name", "small:1"), "import small:1"),
                       (("create", "c2", "--from", "base:1"), "create c2"),
                       (("commit", "c1", "saved:1"), "commit c1")):
        line = one_line_error(lf(store, *args))
        assert line.startswith(f"layerfs: error: {what}: the filesystem of {store} is still full ("), line
        assert "free" in line and "layerfs rmi" in line and "LAYERFS_RESERVE_BYTES=0" in line, line
    assert "base " in ok(lf(store, "images"))  # reads work
    assert "c1" in ok(lf(store, "ps"))
    for p in disk.glob("filler*"):
        p.unlink()
    ok(lf(store, "import-layer", small, "--name", "small:1"))
    assert os.lstat(store / "reserve").st_blocks * 512 >= 8 << 20
    ok(lf(store, "create", "c2", "--from", "base:1"))
