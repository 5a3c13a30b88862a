"""A real workload on the FUSE backend: a busybox image built by umoci, a container mounted
through layerfs-fuse, a shell script run inside it with chroot. The same script runs in a
kernel-mounted container of the same image; outputs, ``layerfs diff`` and the final trees
must be identical (kernel overlayfs is the oracle)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import imagebuild as ib
from tests.support.markers import needs_root, needs_umoci
from tests.support.tarbuild import tree_fingerprint

pytestmark = [
    needs_root,
    needs_umoci,
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="needs /dev/fuse and fusermount3"),
]

SCRIPT = r"""
set -e
cd /
mkdir /applets && /bin/busybox --install -s /applets   # ~400 symlinks created in the container
export PATH=/applets:/bin
echo "hello from $(cat /etc/hello.txt)"
mkdir -p /work/a/b/c
for i in 1 2 3 4 5 6 7 8 9 10; do echo "line $i" >> /work/a/b/c/log; done
wc -l < /work/a/b/c/log
mv /etc /etc-moved                       # rename a directory from a lower layer
ls /etc-moved | sort
cat /etc-moved/hello.txt
ln /work/a/b/c/log /work/hard
ln -s /work/a/b/c/log /work/soft
echo appended >> /work/hard
tail -n 1 /work/soft
rm /bin/ls                               # delete a lower file (the shell still runs)
chmod 700 /work/a
mkfifo /work/fifo
rm -rf /tmp && mkdir /tmp && echo fresh > /tmp/x
find /work /tmp | sort
stat -c '%a %h %s' /work/a /work/hard
echo done
"""


def lf(root: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"layerfs {' '.join(args)}: {r.stderr}"
    return r.stdout


def _detach_all(base: Path) -> None:
    libc = ctypes.CDLL(None)
    with open("/proc/self/mountinfo") as f:
        mps = [line.split()[4] for line in f if line.split()[4].startswith(str(base))]
    for mp in sorted(mps, key=len, reverse=True):
        subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
        libc.umount2(mp.encode(), 2)


def test_busybox_script_in_fuse_container_matches_kernel(tmp_path: Path) -> None:
    layers = [
        ib.Layer(busybox=True, dirs=["etc", "tmp", "work"], created_by="busybox"),
        ib.Layer(files={"etc/hello.txt": "layerfs\n", "etc/other.conf": "x=1\n", "tmp/old": "old\n"},
                 created_by="files"),
    ]
    layout = ib.build_busybox_image(tmp_path / "build", tmp_path / "layout", "1", layers)
    root = tmp_path / "store"
    lf(root, "import", str(layout), "--name", "bb:1")
    results = {}
    try:
        for backend in ("kernel", "fuse"):
            name = f"c-{backend}"
            mp = tmp_path / name
            mp.mkdir()
            lf(root, "create", name, "--from", "bb:1")
            lf(root, "mount", "--backend", backend, name, str(mp))
            recs = json.loads(lf(root, "mounts", "--format", "json"))
            assert [r["backend"] for r in recs if r["target"] == str(mp)] == [backend]
            run = subprocess.run(["chroot", str(mp), "/bin/sh", "-c", SCRIPT], capture_output=True, text=True,
                                 timeout=120)
            assert run.returncode == 0, f"{backend}: {run.stderr}"
            tree = tree_fingerprint([str(mp)])
            lf(root, "umount", str(mp))
            results[backend] = (run.stdout, lf(root, "diff", name), tree)
    finally:
        _detach_all(tmp_path)
    k_out, k_diff, k_tree = results["kernel"]
    f_out, f_diff, f_tree = results["fuse"]
    assert "hello from layerfs" in k_out and k_out.rstrip().endswith("done")
    assert f_out == k_out
    assert f_diff == k_diff
    assert "D /etc" in k_diff and "A /etc-moved/hello.txt" in k_diff
    assert f_tree == k_tree
    # the FUSE-written upper commits to the same image content as the kernel-written one
    lf(root, "commit", "c-kernel", "bb:kernel")
    lf(root, "commit", "c-fuse", "bb:fuse")
    assert lf(root, "diff", "bb:kernel", "bb:fuse") == ""
