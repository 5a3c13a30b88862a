"""Hardening of the store (issue 15) without mounts: read-only commands see one
consistent state while other processes import, commit, remove and collect; limits of
what lands on disk, through the CLI.

Every process a test starts is stopped by pid in a finalizer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from layerfs.store import Store
from layerfs.store.fsck import fsck
from tests.support.tarbuild import write_layer

READ_SECONDS = float(os.environ.get("LAYERFS_HARDENING_SECONDS", "20"))


def _cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args]


def lf(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(root, *args), capture_output=True, text=True, timeout=300)


# One mutator: import images sharing a base, untag and collect them, again and again.
_MUTATOR = r"""
import subprocess, sys, time
root, deadline, me, *layers = sys.argv[1:]
deadline = float(deadline)
def lf(*a):
    subprocess.run([sys.executable, "-m", "layerfs", "--root", root, "-q", *a],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
base, tops = layers[0], layers[1:]
n = 0
while time.time() < deadline:
    lf("import-layer", base, tops[n % len(tops)], "--name", f"m{me}-{n}:1")
    if n:
        lf("rmi", f"m{me}-{n - 1}:1")
    if n % 3 == 2:
        lf("gc")
    n += 1
"""


def test_readers_see_no_damage_during_concurrent_changes(tmp_path: Path, procs: list) -> None:
    """fsck, images, df, history and ps run in a loop (in-process, through the CLI, so
    hundreds of times) while three processes import, rmi and gc: not one false error."""
    from click.testing import CliRunner

    from layerfs.cli import cli

    root = tmp_path / "store"
    base = write_layer(str(tmp_path / "base.tar.gz"),
                       {"d": None, **{f"d/f{i}": os.urandom(500) for i in range(300)}}, "gzip")
    tops = [write_layer(str(tmp_path / f"top{i}.tar"), {f"top{i}": os.urandom(3000)}) for i in range(6)]
    assert lf(root, "import-layer", base, tops[0], "--name", "keep:1").returncode == 0
    deadline = time.time() + READ_SECONDS
    for me in range(3):
        procs.append(subprocess.Popen([sys.executable, "-c", _MUTATOR, str(root), str(deadline), str(me),
                                       base, *tops], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    failures: list[str] = []
    runs = {"fsck": 0, "images": 0, "df": 0, "history": 0, "ps": 0}
    runner = CliRunner()
    while time.time() < deadline:
        for what in runs:
            args = {"history": ("history", "keep:1"), "images": ("images", "--format", "json")}.get(what, (what,))
            r = runner.invoke(cli, ["--root", str(root), "-q", *args])
            runs[what] += 1
            if r.exit_code != 0:
                failures.append(f"{what} exit {r.exit_code}: {r.output[-500:]} {r.exception!r}")
    for p in procs:
        p.wait(timeout=300)
    assert sum(runs.values()) >= 50, runs
    assert not failures, f"{len(failures)} false errors in {runs}:\n" + "\n".join(failures[:20])
    with Store(str(root)) as s:
        fsck(s, repair=True)
        assert fsck(s, verify_blobs=True).clean
        assert "keep:1" in {i.name for i in s.list_images()}


def test_fsck_confirms_missing_files_against_a_fresh_read(tmp_path: Path) -> None:
    """Real damage is still reported: a layer directory removed behind the database's back."""
    root = tmp_path / "store"
    layer = write_layer(str(tmp_path / "l.tar"), {"f": b"x"})
    assert lf(root, "import-layer", str(layer), "--name", "a:1").returncode == 0
    with Store(str(root)) as s:
        snap = s.list_snapshots()[0]
        os.rename(s.fs_dir(snap.id), s.fs_dir(snap.id) + ".gone")
        problems = [f.problem for f in fsck(s).findings]
    assert problems == [f"snapshot {snap.key} (id {snap.id}): directory snapshots/{snap.id}/fs missing"]
    r = lf(root, "fsck")
    assert r.returncode == 1 and "directory snapshots" in r.stdout


def test_sparse_bomb_through_the_cli_is_one_line(tmp_path: Path) -> None:
    from tests.unit.test_apply_limits import pax_sparse

    bomb = tmp_path / "bomb.tar"
    bomb.write_bytes(pax_sparse("var/huge", [(0, b"x")], 10 * 10**9))
    r = lf(tmp_path / "store", "import-layer", str(bomb), "--name", "bomb:1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'var/huge'" in lines[0] and "LAYERFS_MAX_RATIO" in lines[0], r.stderr
    with Store(str(tmp_path / "store")) as s:
        assert s.list_images() == [] and os.listdir(s.tmp_dir) == []


def _two_images(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    for name in ("a", "b"):
        layer = write_layer(str(tmp_path / f"{name}.tar"), {name: None, f"{name}/f": os.urandom(1000)})
        assert lf(root, "import-layer", layer, "--name", f"{name}:1").returncode == 0
    return root


def _once(fn):  # type: ignore[no-untyped-def]
    ran: list[bool] = []

    def hook() -> None:
        if not ran:
            ran.append(True)
            fn()
    return hook, ran


def test_images_during_a_concurrent_rmi_is_retried(tmp_path: Path) -> None:
    """Another process' rmi lands between the listing and the reading of a config: the
    listing is read again (the image is gone), not failed on the missing blob."""
    import json

    from click.testing import CliRunner

    from layerfs import failpoint
    from layerfs.cli import cli
    from layerfs.store import garbage

    root = _two_images(tmp_path)
    other = Store(str(root))
    hook, ran = _once(lambda: garbage.remove_images(other, ["a:1"]))
    try:
        with failpoint.on("store.images-listed", hook):
            r = CliRunner().invoke(cli, ["--root", str(root), "-q", "images", "--format", "json"])
    finally:
        other.close()
    assert ran, "the concurrent rmi did not run"
    assert r.exit_code == 0, (r.output, r.exception)
    assert [i["repository"] + ":" + i["tag"] for i in json.loads(r.output)] == ["b:1"], r.output


def test_fsck_during_a_concurrent_rmi_gc_and_import_is_clean(tmp_path: Path) -> None:
    from layerfs import failpoint
    from layerfs.store import garbage

    root = _two_images(tmp_path)
    other = Store(str(root))
    new_layer = write_layer(str(tmp_path / "c.tar"), {"c": b"c"})

    def change() -> None:
        garbage.remove_images(other, ["a:1"])
        assert lf(root, "import-layer", new_layer, "--name", "c:1").returncode == 0

    hook, ran = _once(change)
    try:
        with Store(str(root)) as s, failpoint.on("fsck.listed", hook):
            report = fsck(s)
    finally:
        other.close()
    assert ran
    assert report.clean, [f.problem for f in report.findings]
    with Store(str(root)) as s:
        assert {i.name for i in s.list_images()} == {"b:1", "c:1"}
        assert fsck(s).clean
