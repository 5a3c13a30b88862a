"""Kernel overlayfs backend through the CLI: image views, containers, diff, commit,
directory renames, mount records, runc bundles.

Every test that mounts registers its mount points with the ``mounts`` fixture, which
unmounts whatever is still mounted under the test's directory in a finalizer.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.store import Store
from layerfs.store.fsck import fsck
from tests.support import imagebuild as ib
from tests.support.cliresult import mounted_under
from tests.support.markers import needs_root, needs_umoci
from tests.support.tarbuild import tree_fingerprint, write_layer

pytestmark = [needs_root, pytest.mark.skipif(
    "overlay" not in open("/proc/filesystems").read(), reason="kernel overlayfs not available")]

MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Path]:
    """tmp_path; on teardown every mount below it is detached (deepest first)."""
    yield tmp_path
    left = mounted_under(tmp_path)
    for mp in sorted(left, key=len, reverse=True):
        _libc.umount2(mp.encode(), MNT_DETACH)
    assert not left, f"test left mounts behind: {left}"


def lf(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args],
                       capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"layerfs {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def mountinfo_options(mp: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mp):
                return set(fields[5].split(","))
    raise AssertionError(f"{mp} is not mounted")


@pytest.fixture
def store(mounts: Path) -> Path:
    """A store with base:1 (3 layers: files, a change, a deletion + an opaque dir)."""
    root = mounts / "store"
    l1 = write_layer(str(mounts / "l1.tar"), {
        "bin": None, "bin/busybox": ("exec", Path("/bin/busybox").read_bytes()), "bin/sh": ("symlink", "busybox"),
        "etc": None, "etc/motd": b"v1\n", "etc/app.conf": b"x=1\n", "srv": None, "srv/www": None,
        "srv/www/index.html": b"<h1>hi</h1>\n", "srv/www/deep": None, "srv/www/deep/f": b"deep\n",
        "cache": None, "cache/a": b"a", "cache/b": b"b", "tmp": None, "dev": None, "proc": None, "sys": None})
    l2 = write_layer(str(mounts / "l2.tar.gz"), {"etc": None, "etc/motd": b"v2\n"}, "gzip")
    l3 = write_layer(str(mounts / "l3.tar"), {"etc": None, "etc/app.conf": ("whiteout",),
                                               "cache": ("opaque",), "cache/fresh": b"fresh\n"})
    lf(root, "import-layer", l1, l2, l3, "--name", "base:1")
    return root


def test_image_view_is_read_only_nodev_nosuid(store: Path) -> None:
    mp = store.parent / "view"
    mp.mkdir()
    lf(store, "mount", "base:1", str(mp))
    assert sorted(os.listdir(mp)) == ["bin", "cache", "dev", "etc", "proc", "srv", "sys", "tmp"]
    assert (mp / "etc/motd").read_text() == "v2\n"
    assert not (mp / "etc/app.conf").exists()
    assert sorted(os.listdir(mp / "cache")) == ["fresh"]
    assert {"ro", "nodev", "nosuid"} <= mountinfo_options(mp)
    with pytest.raises(OSError) as e:
        (mp / "new").write_text("x")
    assert e.value.errno == errno.EROFS
    recs = json.loads(lf(store, "mounts", "--format", "json").stdout)
    assert recs == [{"target": str(mp), "name": "base:1", "snapshot": recs[0]["snapshot"], "backend": "kernel",
                     "readonly": True, "pid": None}]
    # in use: rmi and gc refuse to remove its layers
    r = lf(store, "rmi", "base:1", check=False)
    assert r.returncode == 1 and "mounted" in r.stderr
    lf(store, "umount", str(mp))
    assert mounted_under(mp) == []
    assert json.loads(lf(store, "mounts", "--format", "json").stdout) == []
    r = lf(store, "umount", str(mp), check=False)
    assert r.returncode == 1 and "not mounted by layerfs" in r.stderr


def test_dev_and_suid_on_request(store: Path) -> None:
    mp = store.parent / "view"
    mp.mkdir()
    lf(store, "mount", "--dev", "--suid", "base:1", str(mp))
    opts = mountinfo_options(mp)
    assert "nodev" not in opts and "nosuid" not in opts and "ro" in opts
    lf(store, "umount", str(mp))


def test_stale_mount_records_are_dropped(store: Path) -> None:
    mp = store.parent / "view"
    mp.mkdir()
    lf(store, "mount", "base:1", str(mp))
    # unmounted behind layerfs' back (as after a reboot): the record is stale
    assert _libc.umount2(str(mp).encode(), 0) == 0
    assert json.loads(lf(store, "mounts", "--format", "json").stdout) == []
    # a record from another boot is stale too
    lf(store, "mount", "base:1", str(mp))
    with Store(str(store)) as s, s.meta.transaction() as db:
        db.execute("UPDATE mounts SET boot_id='another-boot'")
    assert json.loads(lf(store, "mounts", "--format", "json").stdout) == []
    _libc.umount2(str(mp).encode(), MNT_DETACH)
    lf(store, "rmi", "base:1")
    assert Store(str(store)).list_snapshots() == []


def _container_changes(mp: Path) -> None:
    (mp / "new.txt").write_text("new\n")
    with open(mp / "etc/motd", "a") as f:
        f.write("appended\n")
    os.chmod(mp / "srv/www/index.html", 0o600)         # metadata-only change
    os.unlink(mp / "bin/sh")                            # delete a lower file
    shutil.rmtree(mp / "cache")                         # delete a dir, then recreate it: opaque
    (mp / "cache").mkdir()
    (mp / "cache/only").write_text("only\n")
    os.rename(mp / "srv", mp / "srv2")                  # rename a directory from a lower layer
    os.rename(mp / "srv2/www/deep", mp / "srv2/moved")  # and one inside it
    (mp / "srv2/www/added").write_text("added\n")
    os.link(mp / "etc/motd", mp / "etc/motd.link")      # hardlink to a copied-up file
    os.mkfifo(mp / "tmp/fifo")


def test_container_diff_commit_and_round_trip(store: Path) -> None:
    mp = store.parent / "c"
    mp.mkdir()
    lf(store, "create", "c1", "--from", "base:1")
    lf(store, "mount", "c1", str(mp))
    assert "rw" in mountinfo_options(mp)
    _container_changes(mp)
    live = tree_fingerprint([str(mp)])
    assert "srv" not in live and "srv2/www/index.html" in live and "srv2/moved/f" in live
    diff = lf(store, "diff", "c1").stdout.splitlines()
    for line in ["A /new.txt", "C /etc/motd", "A /srv2/www/index.html",
                 "D /bin/sh", "C /cache", "D /cache/fresh", "A /cache/only", "D /srv", "A /srv2",
                 "A /srv2/moved", "A /srv2/moved/f", "A /srv2/www/added", "A /etc/motd.link", "A /tmp/fifo"]:
        assert line in diff, (line, diff)
    js = json.loads(lf(store, "diff", "--format", "json", "c1").stdout)
    assert {"kind": "D", "path": "/srv"} in js
    # changes land in the container's upper, in overlayfs format
    with Store(str(store)) as s:
        c = s.get_snapshot("layerfs/container/c1")
        assert c is not None and c.kind == "active"
        upper = Path(s.fs_dir(c.id))
    assert (upper / "new.txt").read_text() == "new\n"
    st = os.lstat(upper / "bin/sh")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    # commit while mounted, twice: deterministic layer
    out1 = lf(store, "commit", "c1", "snap:1", "-m", "my changes").stdout.split()
    out2 = lf(store, "commit", "c1", "snap:2", "-m", "my changes").stdout.split()
    with Store(str(store)) as s:
        assert s.get_image("snap:1").top_chain_id == s.get_image("snap:2").top_chain_id
    hist = lf(store, "history", "snap:1").stdout.splitlines()
    assert "my changes" in hist[1]
    tree = lf(store, "images", "--tree").stdout
    assert "Tags: base:1" in tree and "snap:1, snap:2" in tree  # the new image shares base:1's layers
    assert out1[0] == "snap:1" and out2[0] == "snap:2"
    # export -> import shows what the container showed
    lf(store, "export", "snap:1", str(store.parent / "out.tar"))
    other = store.parent / "other"
    lf(other, "import", str(store.parent / "out.tar"), "--name", "snap:1")
    with Store(str(other)) as s:
        assert tree_fingerprint(s.layer_dirs(s.get_image("snap:1").top_chain_id)) == live
        assert fsck(s, verify_blobs=True).clean
    # and a view of the new image mounted by the kernel shows it too
    view = store.parent / "view"
    view.mkdir()
    lf(store, "mount", "snap:1", str(view))
    assert tree_fingerprint([str(view)]) == live
    lf(store, "umount", str(view))
    lf(store, "umount", str(mp))


def test_container_lifecycle_and_refusals(store: Path) -> None:
    mp = store.parent / "c"
    mp.mkdir()
    assert lf(store, "create", "web", "--from", "base:1").stdout.strip() == "web"
    r = lf(store, "create", "web", "--from", "base:1", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = lf(store, "create", "bad/name", "--from", "base:1", check=False)
    assert r.returncode == 2 and "invalid container name" in r.stderr
    lf(store, "mount", "web", str(mp))
    ps = lf(store, "ps").stdout.splitlines()
    assert ps[0].split()[:2] == ["NAME", "IMAGE"] and ps[1].startswith("web") and str(mp) in ps[1]
    r = lf(store, "rm", "web", check=False)
    assert r.returncode == 1 and "mounted" in r.stderr
    r = lf(store, "rmi", "base:1", check=False)
    assert r.returncode == 1 and "container web" in r.stderr
    # remount after unmount keeps the changes
    (mp / "keep").write_text("kept\n")
    lf(store, "umount", str(mp))
    lf(store, "mount", "web", str(mp))
    assert (mp / "keep").read_text() == "kept\n"
    # a forced rmi untags; the container still commits (its image's blobs are kept)
    lf(store, "umount", str(mp))
    lf(store, "rmi", "-f", "base:1")
    lf(store, "gc")
    lf(store, "commit", "web", "web:1")
    lf(store, "mount", "web", str(mp))
    lf(store, "rm", "-f", "web")
    assert mounted_under(mp) == []
    assert json.loads(lf(store, "ps", "--format", "json").stdout) == []
    lf(store, "rmi", "web:1")
    with Store(str(store)) as s:
        assert s.list_snapshots() == [] and fsck(s).clean


def test_bundle_runs_busybox_with_runc(store: Path) -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc not installed (scripts/bootstrap installs it)")
    b = store.parent / "bundle"
    lf(store, "bundle", "base:1", str(b), "--", "/bin/busybox", "sh", "-c",
       "cat /etc/motd; ls /cache; echo written-by-runc > /tmp/out; echo done")
    cfg = json.loads((b / "config.json").read_text())
    assert cfg["root"]["path"] == "rootfs" and cfg["process"]["args"][0] == "/bin/busybox"
    cid = f"layerfs-test-{os.getpid()}"
    try:
        r = subprocess.run(["runc", "run", "-b", str(b), cid], capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["v2", "fresh", "done"]
    # the write landed in the container's upper
    with Store(str(store)) as s:
        snap = s.get_snapshot("layerfs/container/bundle")
        assert snap is not None
        assert (Path(s.fs_dir(snap.id)) / "tmp/out").read_text() == "written-by-runc\n"
    assert "A /tmp/out" in lf(store, "diff", "bundle").stdout
    lf(store, "umount", str(b / "rootfs"))
    lf(store, "rm", "bundle")


@pytest.mark.parametrize("guarded", ["proc", "dev", "sys"])
def test_bundle_refuses_symlinked_proc_dev_sys(mounts: Path, guarded: str) -> None:
    root = mounts / "store"
    layer = write_layer(str(mounts / "evil.tar"), {"bin": None, guarded: ("symlink", "/tmp/elsewhere")})
    lf(root, "import-layer", layer, "--name", "evil:1")
    r = lf(root, "bundle", "evil:1", str(mounts / "b"), "--", "/bin/true", check=False)
    assert r.returncode == 1 and f"/{guarded} is a symlink" in r.stderr, r.stderr
    assert mounted_under(mounts) == []
    assert json.loads(lf(root, "ps", "--format", "json").stdout) == []  # the container was not kept


def test_deep_images_mount_up_to_the_kernel_limit(mounts: Path) -> None:
    root = mounts / "store"
    tars = [write_layer(str(mounts / f"l{i}.tar"), {f"f{i}": f"{i}\n".encode(), "shared": f"{i}\n".encode()})
            for i in range(501)]
    lf(root, "import-layer", *tars[:500], "--name", "deep:500")
    mp = mounts / "m"
    mp.mkdir()
    lf(root, "mount", "deep:500", str(mp))
    try:
        assert (mp / "shared").read_text() == "499\n"
        assert all((mp / f"f{i}").read_text() == f"{i}\n" for i in range(0, 500, 7))
        assert len(os.listdir(mp)) == 501
    finally:
        lf(root, "umount", str(mp))
    lf(root, "import-layer", *tars, "--name", "deep:501")
    # the kernel refuses; --backend auto would serve it over FUSE instead
    r = lf(root, "mount", "--backend", "kernel", "deep:501", str(mp), check=False)
    assert r.returncode == 1 and "500" in r.stderr and "fuse" in r.stderr.lower(), r.stderr
    assert mounted_under(mp) == []
    assert json.loads(lf(root, "mounts", "--format", "json").stdout) == []


@needs_umoci
def test_umoci_image_container_commit(mounts: Path) -> None:
    layout = ib.build_busybox_image(mounts / "build", mounts / "layout", "1.0")
    root = mounts / "store"
    lf(root, "import", str(layout), "--name", "bb:1.0")
    lf(root, "create", "c", "--from", "bb:1.0")
    mp = mounts / "c"
    mp.mkdir()
    lf(root, "mount", "c", str(mp))
    subprocess.run(["chroot", str(mp), "/bin/sh", "-c", "echo from-chroot > /etc/chrooted; rm /etc/hello.txt"],
                   check=True)
    lf(root, "umount", str(mp))
    assert lf(root, "diff", "c").stdout.splitlines() == ["C /etc", "A /etc/chrooted", "D /etc/hello.txt"]
    lf(root, "commit", "c", "bb:2")
    lf(root, "export", "bb:2", str(mounts / "out"))
    subprocess.run(["umoci", "unpack", "--image", f"{mounts / 'out'}:2", str(mounts / "bundle")],
                   check=True, capture_output=True)
    assert (mounts / "bundle/rootfs/etc/chrooted").read_text() == "from-chroot\n"
    assert not (mounts / "bundle/rootfs/etc/hello.txt").exists()
