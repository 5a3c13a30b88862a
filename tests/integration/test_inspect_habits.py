"""docker/podman habits through the real CLI: images -q/--digests/--filter/--sort/REPOSITORY,
rmi by ID and several refs, docker.io names and suggestions, import - / export -,
.tar.gz exports, --name repeated (all or none), create IMAGE [NAME], ps -q, ps JSON times,
mount creating its mountpoint, umount NAME, rm of a mounted container.

Every test that mounts detaches what is left under its directory (and the store's) in a
finalizer, with umount(8).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import imagebuild as ib
from tests.support.cliresult import mounted_under
from tests.support.markers import needs_root


def lf(root: Path, *args: str, check: bool = True, stdin: bytes | None = None,
       text: bool = True) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    r = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args],
                       capture_output=True, text=text, timeout=300, input=stdin if not text else None,
                       stdin=subprocess.DEVNULL if stdin is None else None)
    if check and r.returncode != 0:
        raise AssertionError(f"layerfs {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


IMAGES = {  # name -> (layers, config)
    "demo/app:old": ([{"etc/os": "base\n"}], {"created": "2023-01-01T00:00:00Z", "config": {"Labels": {"tier": "base"}}}),
    "demo/app:new": ([{"etc/os": "base\n"}, {"srv/app": "app\n"}],
                     {"created": "2024-01-01T00:00:00.5Z", "config": {"Labels": {"tier": "app", "x": "1"}}}),
    "docker.io/library/busybox:latest": ([{"bin/busybox": "bb\n"}], {"created": "2024-06-01T00:00:00Z"}),
}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """Three images sharing a base layer: old (2023, label tier=base), new (2024, tier=app),
    and busybox under its docker.io/library name."""
    root = tmp_path / "store"
    for i, (name, (layers, config)) in enumerate(IMAGES.items()):
        layout = tmp_path / f"layout{i}"
        desc = ib.add_image(layout, [ib.layer_tar(files) for files in layers], config_extra=config)
        ib.set_index(layout, [(desc, {ib.REF_NAME: "t"})])
        lf(root, "import", str(layout), "--name", name)
    return root


def test_images_quiet_digests_filters_sort_and_repository(store: Path) -> None:
    table = lf(store, "images").stdout.splitlines()
    assert [line.split()[:2] for line in table[1:]] == [
        ["docker.io/library/busybox", "latest"], ["demo/app", "new"], ["demo/app", "old"]]
    ids = lf(store, "images", "-q").stdout.split()
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{12}", i) for i in ids)
    assert all(i.startswith("sha256:") for i in lf(store, "images", "-q", "--no-trunc").stdout.split())
    digests = lf(store, "images", "--digests").stdout.splitlines()
    assert digests[0].split()[:3] == ["REPOSITORY", "TAG", "DIGEST"] and "sha256:" in digests[1]

    def names(*args: str) -> list[str]:
        return [i["name"] for i in json.loads(lf(store, "images", "--format", "json", *args).stdout)]

    assert names("busybox") == ["docker.io/library/busybox:latest"]  # docker's normal form
    assert names("demo/app") == ["demo/app:new", "demo/app:old"]
    assert names("demo/app:old") == ["demo/app:old"]
    assert names("--filter", "reference=demo/*") == ["demo/app:new", "demo/app:old"]
    assert names("--filter", "reference=*:old") == []  # '*' stops at '/', as docker's path.Match
    assert names("--filter", "reference=demo/*:old") == ["demo/app:old"]
    assert names("--filter", "label=tier") == ["demo/app:new", "demo/app:old"]
    assert names("--filter", "label=tier=app") == ["demo/app:new"]
    assert names("--filter", "since=demo/app:old") == ["docker.io/library/busybox:latest", "demo/app:new"]
    assert names("--filter", "before=demo/app:new") == ["demo/app:old"]
    assert names("--filter", "dangling=true") == []
    assert names("--filter", "dangling=false", "--filter", "label=x=1") == ["demo/app:new"]
    assert names("--sort", "repository") == ["demo/app:new", "demo/app:old", "docker.io/library/busybox:latest"]
    assert names("-a") == names()
    bad = lf(store, "images", "--filter", "color=red", check=False)
    assert bad.returncode == 2 and "invalid filter 'color=red'" in bad.stderr and bad.stderr.count("\n") == 1
    # images --tree REF: one image's ancestry
    tree = lf(store, "images", "--tree", "demo/app:new").stdout
    assert "demo/app:new" in tree and "busybox" not in tree and "demo/app:old" not in tree


def test_docker_io_names_and_suggestions(store: Path) -> None:
    for ref in ("busybox", "busybox:latest", "library/busybox", "docker.io/busybox"):
        assert json.loads(lf(store, "inspect", ref).stdout)["Name"] == "docker.io/library/busybox", ref
    assert lf(store, "history", "docker.io/demo/app:new").returncode == 0
    miss = lf(store, "history", "busybx", check=False)
    assert miss.returncode == 1 and miss.stderr.count("\n") == 1
    assert "image busybx:latest not found (did you mean: docker.io/library/busybox:latest" in miss.stderr
    miss = lf(store, "history", "demo/app:older", check=False)
    assert "did you mean: demo/app:old" in miss.stderr


def test_rmi_by_id_and_several_refs(store: Path) -> None:
    lf(store, "tag", "demo/app:old", "demo/app:also-old")
    old_id = json.loads(lf(store, "inspect", "demo/app:old").stdout)["Id"]
    r = lf(store, "rmi", old_id[7:19], check=False)  # two names: refused without -f, like docker
    assert r.returncode == 1 and "several names" in r.stderr and "-f" in r.stderr
    r = lf(store, "rmi", "-f", old_id[7:19])
    assert r.stdout.splitlines()[:2] == ["Untagged: demo/app:also-old", "Untagged: demo/app:old"]
    # several refs: the ones that exist go, the rest are one line each, exit 1
    r = lf(store, "rmi", "nosuch:1", "busybox", "nosuch:2", check=False)
    assert r.returncode == 1
    assert "Untagged: docker.io/library/busybox:latest" in r.stdout
    assert r.stderr.count("\n") == 2 and "nosuch:1" in r.stderr and "nosuch:2" in r.stderr
    new_id = json.loads(lf(store, "inspect", "demo/app:new").stdout)["Id"]
    assert lf(store, "rmi", new_id).stdout.startswith("Untagged: demo/app:new")  # full id
    assert lf(store, "images", "-q").stdout == ""


def test_import_stdin_export_stdout_and_gzip(store: Path, tmp_path: Path) -> None:
    out = lf(store, "export", "demo/app:new", "-", text=False).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(out)) as tar:
        assert "index.json" in tar.getnames()
    other = tmp_path / "other"
    r = lf(other, "import", "-", "--name", "a:1", "--name", "b:2", "--name", "a:1", stdin=out, text=False)
    assert r.stdout.decode().splitlines() == [f"a:1 {json.loads(lf(store, 'inspect', 'demo/app:new').stdout)['Id']}",
                                              f"b:2 {json.loads(lf(store, 'inspect', 'demo/app:new').stdout)['Id']}"]
    assert not os.listdir(other / "tmp")  # the spooled stdin is gone
    # a bad name among several: nothing is stored
    r = lf(other, "import", "-", "--name", "c:1", "--name", "Bad:Name!", stdin=out, text=False, check=False)
    assert r.returncode == 2 and b"Bad:Name!" in r.stderr
    assert "c:1" not in lf(other, "images").stdout
    # docker-archive to stdout, and a .tgz file
    docker = lf(store, "export", "--format", "docker-archive", "demo/app:old", "-", text=False).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(docker)) as tar:
        assert "manifest.json" in tar.getnames()
    lf(store, "export", "demo/app:old", str(tmp_path / "x.tgz"))
    with gzip.open(tmp_path / "x.tgz") as f, tarfile.open(fileobj=f) as tar:
        assert "index.json" in tar.getnames()
    assert lf(other, "import", str(tmp_path / "x.tgz"), "--name", "from-tgz:1").returncode == 0


def test_create_positional_and_ps(store: Path) -> None:
    assert lf(store, "create", "busybox", "web").stdout.strip() == "web"
    assert lf(store, "create", "c2", "--from", "demo/app:new").stdout.strip() == "c2"
    made = lf(store, "create", "demo/app:old").stdout.strip()
    assert re.fullmatch(r"app-[0-9a-f]{6}", made), made
    assert sorted(lf(store, "ps", "-q").stdout.split()) == sorted(["web", "c2", made])
    for c in json.loads(lf(store, "ps", "--format", "json").stdout):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", c["created"]), c["created"]
    r = lf(store, "create", "busybox", "a", "b", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


@pytest.fixture
def mounted(store: Path, tmp_path: Path) -> Iterator[Path]:
    yield store
    left = mounted_under(tmp_path, store)
    for mp in sorted(left, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], check=False)
    assert not left, f"test left mounts behind: {left}"


@needs_root
@pytest.mark.skipif("overlay" not in open("/proc/filesystems").read(), reason="kernel overlayfs not available")
def test_mount_makes_its_mountpoint_umount_by_name_rm_mentions_force(mounted: Path, tmp_path: Path) -> None:
    store = mounted
    lf(store, "create", "busybox", "web")
    mp = tmp_path / "not" / "there"
    lf(store, "mount", "web", str(mp))
    assert (mp / "bin/busybox").read_text() == "bb\n"
    recs = json.loads(lf(store, "mounts", "--format", "json").stdout)
    assert [(r["target"], r["name"]) for r in recs] == [(str(mp), "web")]
    assert "web" in lf(store, "mounts").stdout.splitlines()[1].split()
    r = lf(store, "rm", "web", check=False)
    assert r.returncode == 1 and "layerfs rm -f web" in r.stderr and r.stderr.count("\n") == 1
    lf(store, "umount", "web")  # by container name
    assert mounted_under(mp) == [] and mp.is_dir()
    # no mountpoint: one under the store, printed, and removed again by umount
    auto = Path(lf(store, "mount", "demo/app:new").stdout.strip())
    assert auto.parent == store / "mnt" and (auto / "srv/app").read_text() == "app\n"
    lf(store, "umount", "demo/app:new")
    assert not auto.exists()
    # a mount that fails leaves no directory it made
    r = lf(store, "mount", "nosuch:1", str(tmp_path / "made" / "here"), check=False)
    assert r.returncode == 1 and not (tmp_path / "made").exists()
    r = lf(store, "umount", "web", check=False)
    assert r.returncode == 1 and "web is not mounted by layerfs" in r.stderr


def test_diff_two_images_by_type_and_exit_status(store: Path) -> None:
    same = lf(store, "diff", "demo/app:new", "demo/app:new")
    assert same.returncode == 0 and same.stdout == ""
    r = lf(store, "diff", "demo/app:old", "demo/app:new", check=False)
    assert r.returncode == 1 and r.stdout == "A /srv\nA /srv/app\n"
    data = json.loads(lf(store, "diff", "demo/app:old", "demo/app:new", "--format", "json", "--type", "file",
                         "--type", "size", "--type", "history", "--type", "metadata", check=False).stdout)
    assert data["schemaVersion"] == 1 and data["differ"] is True
    by_type = {d["type"]: d for d in data["diffs"]}
    assert list(by_type) == ["file", "size", "history", "metadata"]
    assert by_type["file"]["changes"] == [{"kind": "A", "path": "/srv"}, {"kind": "A", "path": "/srv/app"}]
    assert by_type["size"]["size2"] > by_type["size"]["size1"]
    assert by_type["history"]["lines"] == [{"side": "+", "text": "layer 1"}]
    assert {"side": "-", "text": "Label: tier=base"} in by_type["metadata"]["lines"]
    assert {"side": "+", "text": "Label: x=1"} in by_type["metadata"]["lines"]
    text = lf(store, "diff", "demo/app:old", "demo/app:new", "--type", "metadata", check=False)
    assert text.returncode == 1 and text.stdout.startswith("# metadata: demo/app:old -> demo/app:new\n")
    assert "+ Label: tier=app" in text.stdout
    # the same config: metadata alone does not differ
    assert lf(store, "diff", "demo/app:new", "demo/app:new", "--type", "metadata", "--type", "size").returncode == 0
    bad = lf(store, "diff", "demo/app:new", "--type", "size", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_df_verbose_shared_and_unique(store: Path) -> None:
    lf(store, "create", "busybox", "web")
    rows = {d["name"]: d for d in json.loads(lf(store, "df", "-v", "--format", "json").stdout)}
    old, new, bb = rows["demo/app:old"], rows["demo/app:new"], rows["docker.io/library/busybox:latest"]
    assert old["shared_size"] == old["size"] > 0 and old["unique_size"] == 0  # its only layer is new's base
    assert new["shared_size"] == old["size"] and new["unique_size"] == new["size"] - old["size"] > 0
    assert bb["shared_size"] == 0 and bb["unique_size"] == bb["size"]
    assert (old["containers"], new["containers"], bb["containers"]) == (0, 0, 1)
    table = lf(store, "df", "-v").stdout.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE", "SHARED", "SIZE", "UNIQUE",
                                "SIZE", "CONTAINERS"]
    assert table[1].startswith("docker.io/library/busybox") and table[1].split()[-1] == "1"
