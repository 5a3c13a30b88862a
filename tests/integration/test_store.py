"""The store end to end, through the real CLI, with images made by umoci and skopeo.

Oracle for an imported tree: ``umoci unpack`` of the same image (the tool that wrote it).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs.store import Store
from layerfs.store.fsck import fsck
from tests.support import imagebuild as ib
from tests.support.markers import needs_root, needs_skopeo, needs_umoci
from tests.support.paths import GOLDEN
from tests.support.tarbuild import tree_fingerprint, write_layer

pytestmark = [needs_umoci, needs_skopeo]


def layerfs(root: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args],
                       capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"layerfs {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def store_state(root: Path) -> dict[str, object]:
    """Everything observable about a store: rows, files, staging."""
    with Store(str(root)) as s:
        db = s.meta.db
        rows = {t: [tuple(r) for r in db.execute(f"SELECT * FROM {t} ORDER BY 1")]  # noqa: S608
                for t in ("snapshots", "snapshot_labels", "blobs", "images", "image_blobs")}
    return {"rows": rows, "blobs": sorted(os.listdir(root / "blobs" / "sha256")),
            "snapshots": sorted(os.listdir(root / "snapshots")), "tmp": sorted(os.listdir(root / "tmp"))}


def unpacked_tree(tmp: Path, layout: Path, tag: str) -> dict[str, tuple]:
    bundle = tmp / f"oracle-{tag}"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], check=True, capture_output=True)
    return tree_fingerprint([str(bundle / "rootfs")])


def image_tree(root: Path, name: str) -> dict[str, tuple]:
    with Store(str(root)) as s:
        return tree_fingerprint(s.layer_dirs(s.get_image(name).top_chain_id))


THREE_LAYERS = [
    ib.Layer(busybox=True, dirs=["etc", "var/cache/app", "srv"],
             files={"etc/motd": "v1\n", "etc/app.conf": "x=1\n", "var/cache/app/a": "a", "var/cache/app/b": "b",
                    "srv/data.bin": os.urandom(30000)},
             symlinks={"etc/link": "/etc/motd"}, created_by="COPY files"),
    ib.Layer(files={"etc/motd": "v2 changed\n"}, edit=lambda r: os.chmod(r / "srv/data.bin", 0o4755),
             created_by="RUN change motd"),
    ib.Layer(raw_tar=ib.layer_tar({"etc/": ib.Dir(), ib.whiteout("etc/app.conf"): b"",
                                   "var/cache/app/": ib.Dir(), ib.opaque("var/cache/app"): b"",
                                   "var/cache/app/fresh": b"fresh\n"}),
             created_by="RUN rm app.conf; rm -rf /var/cache/app/*"),
]


@pytest.fixture(scope="module")
def demo_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("build")
    return ib.build_busybox_image(work, work / "layout", "1.0", THREE_LAYERS)


@needs_root
def test_import_matches_umoci_unpack(tmp_path: Path, demo_layout: Path) -> None:
    root = tmp_path / "store"
    out = layerfs(root, "import", str(demo_layout), "--name", "demo:1.0").stdout
    assert out.startswith("demo:1.0 sha256:")
    ours = image_tree(root, "demo:1.0")
    assert ours == unpacked_tree(tmp_path, demo_layout, "1.0")
    assert "etc/app.conf" not in ours and "var/cache/app/a" not in ours and "var/cache/app/fresh" in ours
    assert stat.S_IMODE(ours["srv/data.bin"][0]) == 0o4755
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    with Store(str(root)) as s:
        assert fsck(s, verify_blobs=True).clean
        img = s.get_image("demo:1.0")
        top = s.layer_dirs(img.top_chain_id)[0]
        # the top layer is stored in overlayfs format: whiteout device, opaque xattr
        st = os.lstat(os.path.join(top, "etc/app.conf"))
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert os.getxattr(os.path.join(top, "var/cache/app"), "trusted.overlay.opaque") == b"y"


@needs_root
def test_same_image_in_every_format_dedups(tmp_path: Path, demo_layout: Path) -> None:
    root = tmp_path / "store"
    layerfs(root, "import", str(demo_layout), "--name", "a:1")
    ocitar = ib.to_oci_archive(demo_layout, "1.0", tmp_path / "img.oci.tar")
    docker = ib.to_docker_archive(demo_layout, "1.0", tmp_path / "img.docker.tar", "b/img:2")
    before = {d for d in os.listdir(root / "snapshots")}
    layerfs(root, "import", str(ocitar), "--name", "c:1")
    layerfs(root, "import", str(docker))  # named by its RepoTags
    with Store(str(root)) as s:
        names = {i.name: i for i in s.list_images()}
        assert set(names) == {"a:1", "c:1", "docker.io/b/img:2"}
        assert len({i.top_chain_id for i in names.values()}) == 1
        assert len({i.config_digest for i in names.values()}) == 1
        assert fsck(s).clean
    assert {d for d in os.listdir(root / "snapshots")} == before  # nothing unpacked again
    assert image_tree(root, "docker.io/b/img:2") == image_tree(root, "a:1")


def test_shared_base_is_not_unpacked_again(tmp_path: Path) -> None:
    base = write_layer(str(tmp_path / "base.tar"), {"bin": None, "bin/tool": b"tool" * 1000})
    one = write_layer(str(tmp_path / "one.tar.gz"), {"one": b"1"}, "gzip")
    two = write_layer(str(tmp_path / "two.tar.zst"), {"two": b"2"}, "zstd")
    root = tmp_path / "store"
    layerfs(root, "import-layer", base, one, "--name", "x:1")
    with Store(str(root)) as s:
        base_id = s.chain(s.get_image("x:1").top_chain_id)[-1].id
        inode = os.stat(os.path.join(s.fs_dir(base_id), "bin/tool")).st_ino
    layerfs(root, "import-layer", base, two, "--name", "y:1")
    with Store(str(root)) as s:
        chain_y = s.chain(s.get_image("y:1").top_chain_id)
        assert chain_y[-1].id == base_id
        assert os.stat(os.path.join(s.fs_dir(base_id), "bin/tool")).st_ino == inode
        media = {b.media_type for b in (s.blob(d) for d in
                 [r["digest"] for r in s.meta.db.execute("SELECT digest FROM blobs")]) if b}
    assert {"application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd"} <= media


def _corrupt_blob(layout: Path, digest: str) -> None:
    p = layout / "blobs" / "sha256" / digest.split(":")[1]
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(p, 0o644)
    p.write_bytes(bytes(data))


def _manifest(layout: Path, tag: str) -> dict:
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m.get("annotations", {}).get(ib.REF_NAME) == tag)
    return json.loads((layout / "blobs/sha256" / desc["digest"].split(":")[1]).read_text())


@needs_root
@pytest.mark.parametrize("which", [0, 1, 2])
def test_corrupt_layer_blob_commits_nothing(tmp_path: Path, demo_layout: Path, which: int) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(demo_layout, layout)
    root = tmp_path / "store"
    layerfs(root, "import-layer", write_layer(str(tmp_path / "keep.tar"), {"keep": b"k"}), "--name", "keep:1")
    before = store_state(root)
    digest = _manifest(layout, "1.0")["layers"][which]["digest"]
    _corrupt_blob(layout, digest)
    r = layerfs(root, "import", str(layout), "--name", "bad:1", check=False)
    assert r.returncode == 1
    assert digest in r.stderr or "corrupt" in r.stderr, r.stderr
    assert store_state(root) == before


@needs_root
def test_wrong_diff_id_commits_nothing(tmp_path: Path, demo_layout: Path) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(demo_layout, layout)
    manifest = _manifest(layout, "1.0")
    cfg_path = layout / "blobs/sha256" / manifest["config"]["digest"].split(":")[1]
    config = json.loads(cfg_path.read_text())
    config["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    cfg = ib.compact(config)
    manifest["config"] = {**manifest["config"], "digest": ib._put_blob(layout, cfg), "size": len(cfg)}
    m = ib.compact(manifest)
    ib.set_index(layout, [({"mediaType": ib.OCI_MANIFEST, "digest": ib._put_blob(layout, m), "size": len(m)},
                           {ib.REF_NAME: "1.0"})])
    root = tmp_path / "store"
    Store(str(root)).close()
    before = store_state(root)
    r = layerfs(root, "import", str(layout), "--name", "bad:1", check=False)
    assert r.returncode == 1 and "0" * 64 in r.stderr, r.stderr
    assert store_state(root) == before


def test_hostile_layer_in_image_commits_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    good = write_layer(str(tmp_path / "good.tar"), {"a": b"a"})
    evil = write_layer(str(tmp_path / "evil.tar"), {"s": ("symlink", "/"), "s/etc/evil": b"x"})
    layerfs(root, "import-layer", good, "--name", "good:1")
    before = store_state(root)
    r = layerfs(root, "import-layer", good, evil, "--name", "evil:1", check=False)
    assert r.returncode == 1 and "s/etc/evil" in r.stderr, r.stderr
    assert store_state(root) == before
    assert not os.path.exists("/etc/evil")


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    bomb = write_layer(str(tmp_path / "bomb.tar.gz"), {"zeros": bytes(40 << 20)}, "gzip")
    Store(str(root)).close()
    before = store_state(root)
    r = layerfs(root, "import-layer", bomb, "--name", "bomb:1", check=False,
                env={"LAYERFS_MAX_RATIO": "100"})
    assert r.returncode == 1 and "ratio" in r.stderr.lower(), r.stderr
    r = layerfs(root, "import-layer", bomb, "--name", "bomb:1", check=False,
                env={"LAYERFS_MAX_LAYER_BYTES": str(10 << 20)})
    assert r.returncode == 1, r.stderr
    assert store_state(root) == before


@needs_root
def test_export_import_round_trip_keeps_digests(tmp_path: Path, demo_layout: Path) -> None:
    a = tmp_path / "a"
    layerfs(a, "import", str(demo_layout), "--name", "demo:1.0")
    layerfs(a, "export", "demo:1.0", str(tmp_path / "out"))
    layerfs(a, "export", "demo:1.0", str(tmp_path / "out.tar"))
    info = ib.skopeo_inspect(f"oci:{tmp_path / 'out'}:1.0")
    orig = _manifest(demo_layout, "1.0")
    assert info["Layers"] == [layer["digest"] for layer in orig["layers"]]
    subprocess.run(["umoci", "unpack", "--image", f"{tmp_path / 'out'}:1.0", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    assert tree_fingerprint([str(tmp_path / "bundle/rootfs")]) == image_tree(a, "demo:1.0")
    b = tmp_path / "b"
    layerfs(b, "import", str(tmp_path / "out.tar"), "--name", "demo:1.0")
    with Store(str(a)) as sa, Store(str(b)) as sb:
        ia, ib_ = sa.get_image("demo:1.0"), sb.get_image("demo:1.0")
        assert (ia.manifest_digest, ia.config_digest, ia.top_chain_id) == \
               (ib_.manifest_digest, ib_.config_digest, ib_.top_chain_id)
        assert sorted(sa.content.list_files()) == sorted(sb.content.list_files())
    # docker-archive: image id (config digest) and diffIDs survive; layers are uncompressed tars
    layerfs(a, "export", "--format", "docker-archive", "demo:1.0", str(tmp_path / "d.tar"))
    info = ib.skopeo_inspect(f"docker-archive:{tmp_path / 'd.tar'}")
    assert len(info["Layers"]) == 3
    c = tmp_path / "c"
    layerfs(c, "import", str(tmp_path / "d.tar"), "--name", "demo:1.0")
    with Store(str(a)) as sa, Store(str(c)) as sc:
        assert sc.get_image("demo:1.0").config_digest == sa.get_image("demo:1.0").config_digest
        assert sc.get_image("demo:1.0").top_chain_id == sa.get_image("demo:1.0").top_chain_id
    assert image_tree(c, "demo:1.0") == image_tree(a, "demo:1.0")


@needs_root
def test_export_rebuilt_from_directories(tmp_path: Path, demo_layout: Path) -> None:
    a = tmp_path / "a"
    layerfs(a, "import", str(demo_layout), "--name", "demo:1.0")
    layerfs(a, "export", "--rebuild-layers", "demo:1.0", str(tmp_path / "r1"))
    layerfs(a, "export", "--rebuild-layers", "demo:1.0", str(tmp_path / "r2"))
    i1 = ib.skopeo_inspect(f"oci:{tmp_path / 'r1'}:1.0")
    i2 = ib.skopeo_inspect(f"oci:{tmp_path / 'r2'}:1.0")
    assert i1["Layers"] == i2["Layers"]  # deterministic
    subprocess.run(["umoci", "unpack", "--image", f"{tmp_path / 'r1'}:1.0", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    assert tree_fingerprint([str(tmp_path / "bundle/rootfs")]) == image_tree(a, "demo:1.0")
    # no overlay-private xattrs in any rebuilt layer; whiteouts as OCI .wh. files
    names = []
    for layer in i1["Layers"]:
        for name, entry in ib.read_tar(tmp_path / "r1/blobs/sha256" / layer.split(":")[1]):
            names.append(name)
            assert not any(k.startswith(("trusted.overlay.", "user.overlay.")) for k in getattr(entry, "xattrs", {}) or {})
    assert "etc/.wh.app.conf" in names and "var/cache/app/.wh..wh..opq" in names


def test_rmi_and_gc_keep_shared_layers(tmp_path: Path) -> None:
    root = tmp_path / "store"
    base = write_layer(str(tmp_path / "base.tar"), {"base": b"b"})
    l1 = write_layer(str(tmp_path / "l1.tar"), {"one": b"1"})
    l2 = write_layer(str(tmp_path / "l2.tar"), {"two": b"2"})
    layerfs(root, "import-layer", base, l1, "--name", "one:1")
    layerfs(root, "import-layer", base, l2, "--name", "two:1")
    out = layerfs(root, "rmi", "one:1").stdout
    assert "Untagged: one:1" in out and out.count("Deleted:") == 1
    with Store(str(root)) as s:
        assert [i.name for i in s.list_images()] == ["two:1"]
        assert len(s.list_snapshots()) == 2
        assert fsck(s, verify_blobs=True).clean
    assert image_tree(root, "two:1").keys() == {"base", "two"}
    layerfs(root, "tag", "two:1", "again:1")
    layerfs(root, "rmi", "two:1")
    assert image_tree(root, "again:1").keys() == {"base", "two"}
    layerfs(root, "rmi", "again:1")
    state = store_state(root)
    assert state["snapshots"] == [] and state["blobs"] == [] and state["tmp"] == []
    # gc after a re-tag collects the layers the old image no longer needs
    layerfs(root, "import-layer", base, l1, "--name", "x:1")
    layerfs(root, "import-layer", base, l2, "--name", "x:1")
    out = layerfs(root, "gc").stdout
    assert out.count("Deleted layer:") == 1
    assert image_tree(root, "x:1").keys() == {"base", "two"}


def test_cli_errors_and_exit_codes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    r = layerfs(root, "history", "nope:1", check=False)
    assert r.returncode == 1 and "nope:1" in r.stderr and "not found" in r.stderr
    r = layerfs(root, "history", "Bad Ref!", check=False)
    assert r.returncode == 2 and "Bad Ref!" in r.stderr
    r = layerfs(root, "import", str(tmp_path), check=False)
    assert r.returncode != 0 and "error" in r.stderr
    r = layerfs(root, "frobnicate", check=False)
    assert r.returncode == 2


def test_default_root_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"LAYERFS_ROOT": str(tmp_path / "via-env")}
    r = subprocess.run([sys.executable, "-m", "layerfs", "images"], capture_output=True, text=True,
                       env={**os.environ, **env})
    assert r.returncode == 0 and r.stdout.startswith("REPOSITORY")
    assert (tmp_path / "via-env" / "meta.db").exists()
    assert stat.S_IMODE(os.stat(tmp_path / "via-env").st_mode) == 0o700
    from layerfs.store import default_root

    monkeypatch.delenv("LAYERFS_ROOT", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if os.geteuid() == 0:
        assert default_root() == "/var/lib/layerfs"
    else:
        assert default_root() == str(tmp_path / "xdg" / "layerfs")
    monkeypatch.setenv("LAYERFS_ROOT", str(tmp_path / "x"))
    assert default_root() == str(tmp_path / "x")


def test_images_tree_golden_three_images_sharing_a_base(tmp_path: Path) -> None:
    root = tmp_path / "store"
    base = write_layer(str(tmp_path / "base.tar"), {"bin": None, "bin/sh": b"#!" * 2000})
    mid = write_layer(str(tmp_path / "mid.tar"), {"lib": None, "lib/libc.so": b"\x7fELF" * 10000})
    web = write_layer(str(tmp_path / "web.tar"), {"srv": None, "srv/index.html": b"<h1>hi</h1>"})
    db = write_layer(str(tmp_path / "db.tar"), {"var": None, "var/db": b"rows" * 5000})
    tool = write_layer(str(tmp_path / "tool.tar"), {"usr": None, "usr/tool": b"t" * 3000})
    layerfs(root, "import-layer", base, mid, web, "--name", "example/web:1.0")
    layerfs(root, "import-layer", base, mid, db, "--name", "example/db:2")
    layerfs(root, "import-layer", base, tool, "--name", "example/tool:latest")
    layerfs(root, "tag", "example/web:1.0", "example/web:latest")
    golden = GOLDEN / "store"
    for args, fname in [(("images", "--tree"), "tree.txt"), (("images", "--tree", "--format", "dot"), "tree.dot"),
                        (("images", "--tree", "--format", "json"), "tree.json")]:
        out = layerfs(root, *args).stdout
        path = golden / fname
        if os.environ.get("LAYERFS_UPDATE_GOLDEN"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(out)
        assert out == path.read_text(), f"{fname} differs from golden:\n{out}"
    # layers shared by the three images appear once
    tree = layerfs(root, "images", "--tree").stdout
    assert tree.count("Tags:") == 3 and "example/web:1.0, example/web:latest" in tree


@needs_root
def test_history_and_diff_views(tmp_path: Path, demo_layout: Path) -> None:
    root = tmp_path / "store"
    layerfs(root, "import", str(demo_layout), "--name", "demo:1.0")
    hist = layerfs(root, "history", "demo:1.0").stdout.splitlines()
    assert hist[0].split()[:3] == ["DIFF", "ID", "CREATED"]
    # the config-only step (umoci config: Cmd) is listed too, as docker history lists it
    assert hist[1].startswith("<none>") and "umoci config" in hist[1] and hist[1].split()[-1] == "0B"
    assert "RUN rm app.conf" in hist[2] and "COPY files" in hist[4]
    diff = layerfs(root, "diff", "demo:1.0").stdout
    lines = diff.splitlines()
    assert lines[0].startswith("# layer 1/3")
    third = diff.split("# layer 3/3")[1]
    assert "D /etc/app.conf" in third and "D /var/cache/app/a" in third and "A /var/cache/app/fresh" in third
    assert "C /etc/motd" in diff.split("# layer 2/3")[1].split("# layer 3/3")[0]
    js = json.loads(layerfs(root, "diff", "--format", "json", "demo:1.0").stdout)
    assert [len(layer["changes"]) > 0 for layer in js] == [True, True, True]
    # image-to-image: a changed copy with same-size content differs by fingerprint only
    layerfs(root, "import-layer", write_layer(str(tmp_path / "x.tar"), {"f": b"aaaa"}), "--name", "x:1")
    layerfs(root, "import-layer", write_layer(str(tmp_path / "y.tar"), {"f": b"bbbb", "g": b""}), "--name", "y:1")
    differ = layerfs(root, "diff", "x:1", "y:1", check=False)  # exit 1 when they differ, like diff(1)
    assert differ.returncode == 1 and differ.stdout == "C /f\nA /g\n"
    assert layerfs(root, "diff", "x:1", "x:1").returncode == 0
    assert json.loads(layerfs(root, "diff", "--format", "json", "y:1", "x:1", check=False).stdout) == [
        {"kind": "C", "path": "/f"}, {"kind": "D", "path": "/g"}]
    images = json.loads(layerfs(root, "images", "--format", "json").stdout)
    assert {i["repository"] for i in images} == {"demo", "x", "y"}
    df = layerfs(root, "df").stdout
    assert df.splitlines()[0].split() == ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]


def test_old_docker_archive_and_multiplatform(tmp_path: Path) -> None:
    root = tmp_path / "store"
    l1 = ib.layer_tar({"a": b"1"})
    archive = ib.build_old_docker_archive(tmp_path / "old.tar", [l1, ib.layer_tar({"b": b"2"}), l1],
                                          repo_tags=("old/image:1.0",))
    layerfs(root, "import", str(archive))
    assert image_tree(root, "old/image:1.0").keys() == {"a", "b"}
    layout = ib.build_multiplatform_layout(tmp_path / "multi")
    layerfs(root, "import", str(layout), "--platform", "linux/arm64", "--name", "multi:arm64")
    layerfs(root, "import", str(layout), "--platform", "linux/amd64", "--name", "multi:amd64")
    with Store(str(root)) as s:
        assert s.get_image("multi:arm64").config_digest != s.get_image("multi:amd64").config_digest
    r = layerfs(root, "import", str(layout), "--platform", "windows/s390x", "--name", "m:x", check=False)
    assert r.returncode != 0 and "linux/arm64" in r.stderr
