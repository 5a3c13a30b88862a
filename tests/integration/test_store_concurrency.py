"""Several processes on one store: concurrent imports sharing layers, with gc and fsck
running beside them, leave a consistent store with every image whole. Progress output
appears only on a terminal and never with -q."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

from layerfs.linux.proc import boot_id
from layerfs.store import Store
from layerfs.store.fsck import fsck
from tests.support.tarbuild import tree_fingerprint, write_layer


def _cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args]


def test_concurrent_imports_gc_and_fsck(tmp_path: Path) -> None:
    root = tmp_path / "store"
    base = write_layer(str(tmp_path / "base.tar.gz"),
                       {"d": None, **{f"d/f{i}": os.urandom(2000) for i in range(300)}}, "gzip")
    tops = [write_layer(str(tmp_path / f"top{i}.tar"), {f"top{i}": os.urandom(5000)}) for i in range(4)]
    procs = [subprocess.Popen(_cmd(root, "import-layer", base, t, "--name", f"img{i}:1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, t in enumerate(tops)]
    side = [subprocess.run(_cmd(root, "gc"), capture_output=True, text=True, timeout=120),
            subprocess.run(_cmd(root, "fsck"), capture_output=True, text=True, timeout=120)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert side[0].returncode == 0, side[0].stderr
    with Store(str(root)) as s:
        report = fsck(s, verify_blobs=True)
        assert report.clean, [f.problem for f in report.findings]
        images = {i.name: i for i in s.list_images()}
        assert set(images) == {f"img{i}:1" for i in range(4)}
        bases = {s.chain(i.top_chain_id)[-1].key for i in images.values()}
        assert len(bases) == 1  # one base snapshot, however the imports raced
        assert len(s.list_snapshots()) == 5
        for i, img in enumerate(sorted(images)):
            tree = tree_fingerprint(s.layer_dirs(images[img].top_chain_id))
            assert f"top{i}" in tree and len([p for p in tree if p.startswith("d/")]) == 300


def _stderr_on_pty(args: list[str]) -> str:
    master, slave = pty.openpty()
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    p.wait(timeout=120)
    os.close(master)
    assert p.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_only_on_a_terminal(tmp_path: Path) -> None:
    layer = write_layer(str(tmp_path / "l.tar.gz"), {"big": os.urandom(3 << 20)}, "gzip")
    root = tmp_path / "store"
    loud = [sys.executable, "-m", "layerfs", "--root", str(root)]
    on_tty = _stderr_on_pty([*loud, "import-layer", layer, "--name", "a:1"])
    assert "Copying" in on_tty and "MB" in on_tty
    quiet = _stderr_on_pty([*loud, "-q", "import-layer", layer, "--name", "b:1"])
    assert "Copying" not in quiet
    piped = subprocess.run([*loud, "import-layer", layer, "--name", "c:1"], capture_output=True, text=True)
    assert piped.returncode == 0 and "Copying" not in piped.stderr


def test_store_lock_is_reentrant_and_excludes_repair(tmp_path: Path) -> None:
    a = Store(str(tmp_path / "s"))
    b = Store(str(tmp_path / "s"))
    try:
        with a.shared_lock():
            with a.shared_lock():  # nested (the gRPC service wraps create_active in one)
                assert not b.try_exclusive()
            assert not b.try_exclusive(), "an inner unlock dropped the outer shared lock"
            try:
                with a.exclusive_lock():
                    raise AssertionError("upgrading a held shared lock must be refused")
            except RuntimeError:
                pass
        assert b.try_exclusive()
    finally:
        a.close()
        b.close()


def test_tag_onto_itself_keeps_the_image(tmp_path: Path) -> None:
    root = tmp_path / "store"
    layer = write_layer(str(tmp_path / "l.tar"), {"f": b"x"})
    assert subprocess.run(_cmd(root, "import-layer", layer, "--name", "foo:latest")).returncode == 0
    for target in ("foo", "foo:latest"):
        assert subprocess.run(_cmd(root, "tag", "foo:latest", target)).returncode == 0
    assert subprocess.run(_cmd(root, "gc")).returncode == 0
    with Store(str(root)) as s:
        assert [i.name for i in s.list_images()] == ["foo:latest"]
        assert fsck(s).clean and len(s.list_snapshots()) == 1


def test_pending_mount_record_is_not_stale(tmp_path: Path) -> None:
    from layerfs import mounting

    with Store(str(tmp_path / "s")) as s:
        dead = subprocess.Popen(["true"])
        dead.wait()
        with s.meta.transaction() as db:
            for target, pid in (("/nonexistent/pending", os.getpid()), ("/nonexistent/stale", dead.pid)):
                db.execute("INSERT INTO mounts VALUES (?, 'k', 'kernel', 1, ?, ?, 0)",
                           (target, pid, boot_id()))
        assert [r.target for r in mounting.records(s)] == ["/nonexistent/pending"]
        rows = [r["target"] for r in s.meta.db.execute("SELECT target FROM mounts")]
        assert rows == ["/nonexistent/pending"]
