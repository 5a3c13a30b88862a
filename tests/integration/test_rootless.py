"""layerfs as an unprivileged user: the store's format, image views, containers, errors.

Everything here runs as the test user of ``tests.support.rootless`` (a system user with
subordinate ids, layerfs installed in a venv it can execute), through the real CLI: kernel
overlayfs inside ``unshare --user --map-root-user --mount`` (``userxattr``) and FUSE through
the setuid ``fusermount3``, both transports. The oracle is the root store's kernel view of
the same image: every unprivileged view must show exactly that tree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.imagebuild import Layer, build_busybox_image, layer_tar, opaque, to_docker_archive
from tests.support.markers import needs_root, needs_skopeo, needs_umoci
from tests.support.rootless import TREE_SCRIPT, RootlessSession, tree

pytestmark = [needs_root, needs_umoci, pytest.mark.slow]

TAG = "1"
LAYERS = (
    Layer(busybox=True, dirs=["etc", "tmp", "opt/d", "opt/o", "mv/src"],
          files={"etc/motd": "motd\n", "etc/keep": "keep\n", "opt/d/a": "a\n", "opt/d/b": "b\n",
                 "opt/d/c": "c\n", "opt/o/old": "old\n", "mv/src/f": "f\n"}, created_by="base"),
    Layer(delete=["etc/motd", "opt/d/a", "opt/d/b"], files={"etc/new": "new\n"}, created_by="deletes"),
    Layer(raw_tar=layer_tar({opaque("opt/o"): "", "opt/o/new": "new in 3\n"}), created_by="opaque"),
)
TRANSPORTS = ("pyfuse3", "kernel")


@pytest.fixture(scope="module")
def rl() -> Iterator[RootlessSession]:
    with RootlessSession() as session:
        print(f"rootless venv {session.venv}: {session.build_seconds:.1f}s to build or check", file=sys.stderr)
        yield session


@pytest.fixture(scope="module")
def layout(rl: RootlessSession) -> Path:
    """The test image as an OCI layout made by umoci (as root), then given to the user."""
    work = rl.workdir("image")
    built = build_busybox_image(work / "build", work / "layout", TAG, LAYERS)
    rl.give(work)
    return built


def _root_layerfs(root: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), *map(str, args)],
                          check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def oracle(layout: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The root store's kernel overlayfs view of the image."""
    d = tmp_path_factory.mktemp("oracle")
    _root_layerfs(d / "store", "import", layout)
    mnt = d / "mnt"
    mnt.mkdir()
    _root_layerfs(d / "store", "mount", "--backend", "kernel", f"{layout.name}:{TAG}", mnt)
    try:
        return tree(str(mnt))
    finally:
        _root_layerfs(d / "store", "umount", mnt)


def _image_ref(layout: Path) -> str:
    return f"{layout.name}:{TAG}"


def _store(rl: RootlessSession, layout: Path, name: str) -> tuple[Path, Path]:
    """A fresh store of the user's with the image imported (by the user), and a mount point."""
    d = rl.workdir(name)
    rl.layerfs(d / "store", "import", layout)
    (d / "mnt").mkdir()
    rl.give(d / "mnt")
    return d / "store", d / "mnt"


def _tree_of(r: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def test_the_oracle_shows_the_image(oracle: dict[str, str]) -> None:
    assert sorted(p for p in oracle if p.startswith("etc/")) == ["etc/keep", "etc/new"]
    assert sorted(p for p in oracle if p.startswith("opt/")) == ["opt/d", "opt/d/c", "opt/o", "opt/o/new"]
    assert not any(".wh." in p for p in oracle)


# --- the store's format and info -------------------------------------------------------------


def test_unprivileged_store_format_and_info(rl: RootlessSession, layout: Path) -> None:
    store, _ = _store(rl, layout, "info")
    info = json.loads(rl.layerfs(store, "info", "--format", "json").stdout)
    assert info["store"]["format"] == "userxattr", info["store"]
    assert info["backends"]["kernel"]["can_mount"] is False
    assert "CAP_SYS_ADMIN" in info["backends"]["kernel"]["why"]
    assert info["backends"]["fuse"]["can_mount"] is True, info["backends"]["fuse"]
    assert info["auto"] == "fuse"
    inside = json.loads(rl.layerfs(store, "info", "--format", "json", userns=True).stdout)
    assert inside["store"]["format"] == "userxattr"
    assert inside["backends"]["kernel"]["can_mount"] is True, inside["backends"]["kernel"]
    assert inside["auto"] == "kernel"
    text = rl.layerfs(store, "info").stdout
    assert "store format: userxattr (0/0 character-device whiteouts, user.overlay.* xattrs" in text
    assert "backend kernel: cannot mount this store: mounting needs CAP_SYS_ADMIN" in text
    # the layers on disk: device whiteouts and user.overlay.opaque, nothing trusted, no .wh. files
    found = subprocess.run(["find", str(store / "snapshots"), "-name", ".wh.*"], capture_output=True, text=True)
    assert found.stdout == ""
    devices = subprocess.run(["find", str(store / "snapshots"), "-type", "c"], capture_output=True, text=True)
    assert sorted(Path(p).name for p in devices.stdout.split()) == ["a", "b", "motd"]
    opaque_dirs = subprocess.run(["getfattr", "-R", "--absolute-names", "-n", "user.overlay.opaque",
                                  str(store / "snapshots")], capture_output=True, text=True).stdout
    assert opaque_dirs.count('user.overlay.opaque="y"') == 1 and "/opt/o\n" in opaque_dirs


def test_legacy_files_store_is_mounted_over_fuse_only(rl: RootlessSession, layout: Path,
                                                      oracle: dict[str, str]) -> None:
    """A store an older layerfs made without privileges (.wh.NAME files) keeps its format:
    info says the kernel cannot read it, auto takes FUSE even in a user namespace."""
    d = rl.workdir("legacy")
    store = d / "store"
    store.mkdir(mode=0o700)
    with sqlite3.connect(store / "meta.db") as db:  # the records such a store has
        db.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        db.executemany("INSERT INTO meta VALUES (?, ?)",
                       [("schema", "1"), ("opaque_xattr", "user.overlay.opaque"), ("device_whiteouts", "0")])
    rl.give(d)
    rl.layerfs(store, "import", layout)
    wh = subprocess.run(["find", str(store / "snapshots"), "-name", ".wh.*"], capture_output=True, text=True)
    assert sorted(Path(p).name for p in wh.stdout.split()) == [".wh..wh..opq", ".wh.a", ".wh.b", ".wh.motd"]
    info = json.loads(rl.layerfs(store, "info", "--format", "json", userns=True).stdout)
    assert info["store"]["format"] == "files"
    assert info["backends"]["kernel"]["can_mount"] is False
    assert ".wh.NAME files" in info["backends"]["kernel"]["why"]
    assert info["auto"] == "fuse"
    (d / "mnt").mkdir()
    rl.give(d / "mnt")
    r = rl.mounted(store, _image_ref(layout), d / "mnt", userns=True)
    assert _tree_of(r) == oracle
    assert "backend auto: FUSE, as kernel overlayfs cannot: the store's whiteouts are .wh.NAME files" in r.stderr
    refused = rl.layerfs(store, "mount", "--backend", "kernel", _image_ref(layout), d / "mnt", userns=True,
                         check=False)
    assert refused.returncode != 0 and ".wh.NAME files" in refused.stderr, refused


def test_kernel_backend_asked_for_says_why_not(rl: RootlessSession, layout: Path) -> None:
    store, mnt = _store(rl, layout, "kernel-refused")
    r = rl.layerfs(store, "mount", "--backend", "kernel", _image_ref(layout), mnt, check=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r
    assert "kernel overlayfs cannot mount this store's layers here: mounting needs CAP_SYS_ADMIN" in r.stderr
    assert "use --backend fuse" in r.stderr and rl.mounts() == []


def test_root_store_keeps_its_format(tmp_path: Path, layout: Path) -> None:
    _root_layerfs(tmp_path / "store", "import", layout)
    info = json.loads(_root_layerfs(tmp_path / "store", "info", "--format", "json").stdout)
    assert info["store"]["format"] == "trusted"
    assert info["auto"] == "kernel"


# --- read-only views -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["kernel-userns", "fuse-pyfuse3", "fuse-kernel", "fuse-userns"])
def test_image_view_is_the_root_kernel_view(rl: RootlessSession, layout: Path, oracle: dict[str, str],
                                            how: str) -> None:
    store, mnt = _store(rl, layout, f"view-{how}")
    backend = "kernel" if how == "kernel-userns" else "fuse"
    env = {"LAYERFS_FUSE_TRANSPORT": how.removeprefix("fuse-")} if how in ("fuse-pyfuse3", "fuse-kernel") else {}
    r = rl.mounted(store, _image_ref(layout), mnt, backend="auto" if how == "kernel-userns" else backend,
                   userns=how.endswith("userns"), env=env)
    assert _tree_of(r) == oracle
    if how == "kernel-userns":
        assert "backend auto: kernel overlayfs: CAP_SYS_ADMIN in this user namespace, store format userxattr" \
            in r.stderr, r.stderr


def test_auto_outside_a_user_namespace_is_fuse_and_says_why(rl: RootlessSession, layout: Path,
                                                             oracle: dict[str, str]) -> None:
    store, mnt = _store(rl, layout, "auto")
    r = rl.mounted(store, _image_ref(layout), mnt)
    assert _tree_of(r) == oracle
    assert "backend auto: FUSE, as kernel overlayfs cannot: mounting needs CAP_SYS_ADMIN" in r.stderr, r.stderr
    assert rl.mounts() == []


@needs_skopeo
def test_docker_archive_made_by_skopeo(rl: RootlessSession, layout: Path, oracle: dict[str, str]) -> None:
    d = rl.workdir("skopeo")
    archive = to_docker_archive(layout, TAG, d / "image.tar", "rootless/skopeo:1")
    rl.give(d)
    rl.layerfs(d / "store", "import", archive, "--name", "rootless/skopeo:1")
    (d / "mnt").mkdir()
    rl.give(d / "mnt")
    for userns in (True, False):
        assert _tree_of(rl.mounted(d / "store", "rootless/skopeo:1", d / "mnt", userns=userns)) == oracle


# --- containers -----------------------------------------------------------------------------

CHANGES = ("echo changed > etc/keep && rm etc/new && rm -r opt/d && mkdir opt/d && echo fresh > opt/d/x "
           "&& mv mv/src mv/dst && echo added > added.txt")


def _expected_after_changes(oracle: dict[str, str]) -> dict[str, str]:
    expected = {k: v for k, v in oracle.items()
                if k not in ("etc/keep", "etc/new") and not k.startswith(("opt/d/", "mv/src"))}
    expected["mv/dst"] = oracle["mv/src"]
    expected["mv/dst/f"] = oracle["mv/src/f"]
    return expected


def _check_changed(t: dict[str, str], oracle: dict[str, str]) -> None:
    assert t["etc/keep"].startswith("file 0o644 8 ")
    assert t["added.txt"].startswith("file ")
    assert t["opt/d/x"].startswith("file ")
    rest = {k: v for k, v in t.items() if k not in ("etc/keep", "added.txt", "opt/d/x")}
    assert rest == _expected_after_changes(oracle)


WRITERS = [("fuse", "pyfuse3", False), ("fuse", "kernel", False), ("kernel", None, True)]


@pytest.mark.parametrize(("writer", "transport", "writer_userns"), WRITERS,
                         ids=["fuse-pyfuse3", "fuse-kernel", "kernel-userns"])
def test_container_changed_diffed_committed_exported(rl: RootlessSession, layout: Path, oracle: dict[str, str],
                                                     writer: str, transport: str | None,
                                                     writer_userns: bool) -> None:
    store, mnt = _store(rl, layout, f"ctr-{writer}-{transport}")
    rl.layerfs(store, "create", "web", "--from", _image_ref(layout))
    env = {"LAYERFS_FUSE_TRANSPORT": transport} if transport else {}
    written = _tree_of(rl.mounted(store, "web", mnt, backend=writer, userns=writer_userns, commands=CHANGES,
                                  env=env))
    _check_changed(written, oracle)
    # the upper one backend wrote, read by the other
    if writer == "fuse":
        reread = _tree_of(rl.mounted(store, "web", mnt, backend="kernel", userns=True))
    else:
        reread = _tree_of(rl.mounted(store, "web", mnt, backend="fuse", env={"LAYERFS_FUSE_TRANSPORT": "kernel"}))
    assert reread == written
    # no redirects in a userxattr store (overlayfs follows none with userxattr): the renamed
    # lower directory was copied up whole, by either backend
    redirects = subprocess.run(["getfattr", "-R", "--absolute-names", "-m", "overlay.redirect", "-d",
                                str(store / "snapshots")], capture_output=True, text=True).stdout
    assert redirects == "", redirects
    diff = rl.layerfs(store, "diff", "web").stdout.split("\n")
    for line in ("C /etc", "C /etc/keep", "D /etc/new", "A /added.txt", "D /mv/src", "A /mv/dst", "A /mv/dst/f",
                 "A /opt/d/x"):
        assert line in diff, (line, diff)
    rl.layerfs(store, "commit", "web", "rootless/committed:1", "-m", "changed")
    out = rl.workdir(f"export-{writer}-{transport}")
    rl.layerfs(store, "export", "rootless/committed:1", out / "committed.tar")
    # the committed image, imported into a root store and mounted by the kernel, is the same tree
    root_store = out / "root-store"
    _root_layerfs(root_store, "import", out / "committed.tar")
    (out / "mnt").mkdir()
    _root_layerfs(root_store, "mount", "--backend", "kernel", "rootless/committed:1", out / "mnt")
    try:
        assert tree(str(out / "mnt")) == written
    finally:
        _root_layerfs(root_store, "umount", out / "mnt")
    with tarfile.open(out / "committed.tar") as tf:
        assert any(n.endswith("manifest.json") or n == "index.json" for n in tf.getnames())


def test_an_upper_dir_is_not_left_mounted(rl: RootlessSession) -> None:
    assert rl.mounts() == []


# --- errors -------------------------------------------------------------------------------


def test_oci_layout_with_an_index_of_another_user(rl: RootlessSession, layout: Path, tmp_path: Path) -> None:
    d = rl.workdir("private-layout")
    private = d / "layout"
    subprocess.run(["cp", "-a", str(layout), str(private)], check=True)
    os.chown(private / "index.json", 0, 0)
    os.chmod(private / "index.json", 0o600)
    r = rl.layerfs(d / "store", "import", private, check=False)
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "Permission denied" in lines[0] and str(private / "index.json") in lines[0], lines[0]


def test_export_into_an_unwritable_directory(rl: RootlessSession, layout: Path) -> None:
    store, _ = _store(rl, layout, "export-denied")
    locked = store.parent / "locked"
    locked.mkdir(mode=0o755)  # root's
    for target in (locked / "out.tar", locked / "out"):
        r = rl.layerfs(store, "export", _image_ref(layout), target, check=False)
        assert r.returncode == 1, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "Permission denied" in lines[0] and str(locked) in lines[0], lines[0]


# --- the rules, without a mount ------------------------------------------------------------


def test_mount_options_follow_the_format() -> None:
    from layerfs.mount.backend import for_format
    from layerfs.mount.spec import snapshot_spec
    from layerfs.union import whiteout

    rw = snapshot_spec(["/l/2", "/l/1"], "/u", "/w")
    ro = snapshot_spec(["/l/2", "/l/1"], readonly=True)
    assert for_format(rw, whiteout.PRIVILEGED) == rw
    assert "redirect_dir=on" in rw.options and "redirect_dir=follow" in ro.options
    for spec in (rw, ro):
        got = for_format(spec, whiteout.USERXATTR)
        assert "userxattr" in got.options and not any(o.startswith("redirect_dir=") for o in got.options)
        assert got.lowers == spec.lowers and got.upper == spec.upper
    # the files format keeps its redirects (only FUSE mounts it); a bind needs nothing
    assert "redirect_dir=on" in for_format(rw, whiteout.UNPRIVILEGED_FILES).options
    bind = snapshot_spec(["/l/1"], readonly=True)
    assert for_format(bind, whiteout.USERXATTR) == bind


def test_kernel_problem_names_the_reason() -> None:
    from layerfs.mount.backend import kernel_problem
    from layerfs.mount.probe import probe
    from layerfs.union import whiteout

    here = probe()
    user = dataclasses.replace(here, privileged=False, can_mount=False,
                               why={**here.why, "can_mount": "CAP_SYS_ADMIN absent"})
    userns = dataclasses.replace(user, can_mount=True)
    assert kernel_problem(whiteout.PRIVILEGED, here) is None
    assert kernel_problem(whiteout.USERXATTR, here) is None
    assert "trusted.overlay.*" in (kernel_problem(whiteout.PRIVILEGED, userns) or "")
    assert kernel_problem(whiteout.USERXATTR, userns) is None
    assert "CAP_SYS_ADMIN absent" in (kernel_problem(whiteout.USERXATTR, user) or "")
    assert ".wh.NAME files" in (kernel_problem(whiteout.UNPRIVILEGED_FILES, here) or "")


def test_layerfs_fuse_takes_the_store_format() -> None:
    from layerfs.errors import UsageError
    from layerfs.fuse.main import parse_args
    from layerfs.mount.fuse import program_options
    from layerfs.mount.spec import snapshot_spec

    opts = parse_args(["-o", "lowerdir=/a:/b,upperdir=/u,workdir=/w,layer_format=files", "/m"])
    assert not isinstance(opts, str) and opts.layer_format == "files" and not opts.warnings
    with pytest.raises(UsageError, match="layer_format='nfs'"):
        parse_args(["-o", "lowerdir=/a,layer_format=nfs", "/m"])
    spec = snapshot_spec(["/l/2", "/l/1"], "/u", "/w")
    assert program_options(spec, "userxattr")[-1] == "layer_format=userxattr"
    assert not any(o.startswith("layer_format=") for o in program_options(spec))


def test_rootless_runtime_config_maps_the_user(tmp_path: Path) -> None:
    from layerfs.bundle import rootless_config, subid_ranges

    subuid = tmp_path / "subuid"
    subuid.write_text("other:100000:65536\nme:200000:1000\n1234:300000:10\n")
    assert subid_ranges("uid", "me", 1234, str(subuid)) == [(200000, 1000), (300000, 10)]
    spec = {"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}], "resources": {"devices": []}},
            "mounts": [{"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
                       {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                        "options": ["newinstance", "gid=5", "mode=0620"]}]}
    got = rootless_config(spec, os.getuid(), os.getgid())
    assert got["linux"]["namespaces"][0] == {"type": "user"} and "resources" not in got["linux"]
    assert got["linux"]["uidMappings"][0] == {"containerID": 0, "hostID": os.getuid(), "size": 1}
    assert got["mounts"][0]["type"] == "none" and "rbind" in got["mounts"][0]["options"]
    assert got["mounts"][1]["options"] == ["newinstance", "mode=0620"]


# --- bundles for rootless runc ------------------------------------------------------------------

RUNC = "/usr/sbin/runc"


@pytest.mark.skipif(not os.path.exists(RUNC), reason="runc not installed (scripts/bootstrap installs it)")
def test_bundle_runs_in_rootless_runc(rl: RootlessSession, layout: Path) -> None:
    store, _ = _store(rl, layout, "bundle")
    bundle, state = store.parent / "bundle", store.parent / "runc-state"
    r = rl.layerfs(store, "bundle", _image_ref(layout), bundle, "--name", "box", "--",
                   "/bin/sh", "-c", "echo hi from $(cat /etc/keep) && echo ran > /ran.txt && ls /opt/d")
    try:
        config = json.loads((bundle / "config.json").read_text())
        linux = config["linux"]
        assert {"type": "user"} in linux["namespaces"]
        assert linux["uidMappings"][0] == {"containerID": 0, "hostID": rl.uid, "size": 1}
        assert linux["gidMappings"][0] == {"containerID": 0, "hostID": rl.gid, "size": 1}
        start, count = (int(x) for x in next(line.split(":")[1:] for line in Path("/etc/subuid").read_text()
                                              .splitlines() if line.startswith(rl.pw.pw_name + ":")))
        assert linux["uidMappings"][1] == {"containerID": 1, "hostID": start, "size": count}
        mounts = json.loads(rl.layerfs(store, "mounts", "--format", "json").stdout)
        assert [m["backend"] for m in mounts] == ["fuse"], (mounts, r.stderr)
        run = rl.run(RUNC, "--root", state, "run", "-b", bundle, "rootless-box", check=False, timeout=120)
        assert run.returncode == 0, run
        assert run.stdout.split("\n")[:2] == ["hi from keep", "c"], run.stdout
    finally:
        rl.run(RUNC, "--root", state, "delete", "-f", "rootless-box", check=False)
        rl.layerfs(store, "umount", bundle / "rootfs", check=False)
    assert "A /ran.txt" in rl.layerfs(store, "diff", "box").stdout.split("\n")
    rl.layerfs(store, "rm", "box")


# --- a containerd in a user namespace on the snapshotter ----------------------------------------


@pytest.mark.skipif(shutil.which("containerd") is None or shutil.which("ctr") is None,
                    reason="containerd not installed (scripts/bootstrap installs it)")
def test_snapshotter_serves_a_containerd_in_a_user_namespace(rl: RootlessSession, layout: Path,
                                                             oracle: dict[str, str]) -> None:
    """The user's store behind ``layerfs snapshotter serve --backend kernel``, and a private
    containerd, both in one user namespace (the user's subordinate ids mapped, /run a tmpfs of
    its own for the shims): containerd unpacks the image through the snapshotter's overlay
    mounts (``userxattr``, no ``redirect_dir``), and a view of it, mounted as ``ctr snapshots
    mounts`` says, is the root store's kernel view. Every process dies with the namespace's
    pid 1 (``--pid --fork``)."""
    from tests.support.containerd_util import CONFIG_TEMPLATE
    from tests.support.imagebuild import to_oci_archive

    b = rl.workdir("containerd")
    to_oci_archive(layout, TAG, b / "image.tar")
    (b / "config.toml").write_text(CONFIG_TEMPLATE.format(root=b / "root", state=b / "state", address=b / "c.sock",
                                                          snapshotter=b / "l.sock"))
    (b / "mnt").mkdir()
    rl.give(b)
    lf = f"{rl.bin}/layerfs --root {b}/store"
    ctr = f"ctr -a {b}/c.sock -n test"
    script = f"""
set -e
mount -t tmpfs tmpfs /run
{lf} snapshotter serve --address {b}/l.sock --backend kernel > {b}/snapshotter.log 2>&1 & S=$!
containerd --config {b}/config.toml > {b}/containerd.log 2>&1 & C=$!
trap 'kill $C; wait $C; kill $S; wait $S' EXIT
for i in $(seq 150); do [ -S {b}/l.sock ] && {ctr} version >/dev/null 2>&1 && break; sleep 0.2; done
{ctr} images import --snapshotter layerfs --base-name docker.io/rootless/image {b}/image.tar >/dev/null
top=$({ctr} snapshots --snapshotter layerfs ls |
     awk 'NR > 1 {{k[$1] = 1; if (NF == 3) p[$2] = 1}} END {{for (x in k) if (!(x in p)) print x}}')
{ctr} snapshots --snapshotter layerfs view v1 "$top" >/dev/null
{ctr} snapshots --snapshotter layerfs mounts {b}/mnt v1 > {b}/mount.sh
sh {b}/mount.sh
{rl.bin}/python -c {shlex.quote(TREE_SCRIPT)} {b}/mnt > {b}/tree.json
umount {b}/mnt
{ctr} snapshots --snapshotter layerfs rm v1
"""
    start, count = (int(x) for x in next(line.split(":")[1:] for line in Path("/etc/subuid").read_text()
                                          .splitlines() if line.startswith(rl.pw.pw_name + ":")))
    r = rl.run("unshare", "--user", "--map-root-user", f"--map-users={start},1,{count}",
               f"--map-groups={start},1,{count}", "--mount", "--pid", "--fork", "--mount-proc",
               "/bin/sh", "-c", script, check=False, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, timeout=180)
    logs = "".join((b / n).read_text()[-2000:] for n in ("containerd.log", "snapshotter.log") if (b / n).exists())
    assert r.returncode == 0, (r.stdout, r.stderr, logs)
    mount_line = (b / "mount.sh").read_text()
    assert "userxattr" in mount_line and "redirect_dir" not in mount_line, mount_line
    assert json.loads((b / "tree.json").read_text()) == oracle
    assert rl.mounts() == []
