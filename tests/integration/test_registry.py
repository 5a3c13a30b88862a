"""pull and push against a real registry (Debian's docker-registry 2.8) on loopback.

Oracles: the registry itself (what it stores is what skopeo reads back), skopeo in both
directions (digests identical), umoci (the image it built, unpacked, is the tree pulled).
Faults come from a proxy in front of the registry (429/503, a corrupted blob, a cut body,
throttling), from kill -9 of the registry mid-blob, and from kill -9 of the client.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from layerfs.store import Store
from layerfs.store.fsck import fsck
from tests.support import imagebuild as ib
from tests.support.markers import needs_root, needs_skopeo, needs_umoci
from tests.support.registry import (
    Proxy,
    RegistryServer,
    TokenServer,
    htpasswd_file,
    make_ca,
    needs_registry,
)
from tests.support.tarbuild import tree_fingerprint

pytestmark = [needs_registry, needs_umoci, needs_skopeo, needs_root]

FAST = {"LAYERFS_REGISTRY_BACKOFF": "0.05"}


def layerfs(root: Path, *args: str, check: bool = True, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args], input=input,
                       capture_output=True, text=True, env={**os.environ, **FAST, **(env or {})}, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"layerfs {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def skopeo(*args: str) -> str:
    return ib.run("skopeo", "--insecure-policy", *args)


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path / "registry").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(reg: RegistryServer) -> Iterator[Proxy]:
    p = Proxy(reg.host)
    try:
        yield p
    finally:
        p.close()


LAYERS = [
    ib.Layer(busybox=True, dirs=["etc", "srv"], files={"etc/motd": "v1\n", "srv/data.bin": os.urandom(200_000)},
             created_by="base"),
    ib.Layer(files={"etc/motd": "v2\n", "srv/app.conf": "x=1\n"}, delete=["bin/ls"], created_by="update"),
    ib.Layer(files={"srv/big.bin": os.urandom(3_000_000)}, created_by="big"),
]


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Path]:
    """An umoci-built three-layer image, imported into a store as ``app:1``: (layout, store)."""
    layout = ib.build_busybox_image(tmp_path / "build", tmp_path / "layout", "1", LAYERS)
    root = tmp_path / "src-store"
    layerfs(root, "import", f"{layout}", "--name", "app:1")
    return layout, root


def manifest_digest(root: Path, name: str) -> str:
    with Store(str(root)) as s:
        return str(s.get_image(name).manifest_digest)


def image_tree(root: Path, name: str) -> dict[str, tuple[Any, ...]]:
    with Store(str(root)) as s:
        return tree_fingerprint(s.layer_dirs(s.get_image(name).top_chain_id))


def assert_clean(root: Path) -> None:
    with Store(str(root)) as s:
        report = fsck(s, verify_blobs=True)
    assert report.clean, [f.problem for f in report.findings]


def registry_manifest(host: str, repo: str, ref: str) -> bytes:
    """The manifest as the registry serves it (skopeo --raw)."""
    return ib.run("skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{host}/{repo}:{ref}").encode()


# -- the core: push, pull, verify ------------------------------------------------------------


def test_push_then_pull_keeps_every_digest_and_the_tree(tmp_path: Path, reg: RegistryServer,
                                                       image: tuple[Path, Path]) -> None:
    layout, src = image
    dest = f"{reg.host}/team/app:1"
    out = layerfs(src, "push", "app:1", dest).stdout.strip()
    assert out == manifest_digest(src, "app:1")
    # what the registry holds is byte for byte the stored manifest
    assert ib.sha256(registry_manifest(reg.host, "team/app", "1")) == out

    fresh = tmp_path / "fresh"
    r = layerfs(fresh, "pull", dest, "--format", "json")
    result = json.loads(r.stdout)
    assert result["manifest_digest"] == out
    assert result["name"] == dest
    assert len(result["fetched_blobs"]) == 3 and len(result["new_layers"]) == 3
    assert image_tree(fresh, dest) == image_tree(src, "app:1")
    with Store(str(src)) as a, Store(str(fresh)) as b:
        ia, ib_ = a.get_image("app:1"), b.get_image(dest)
        assert (ia.config_digest, ia.top_chain_id) == (ib_.config_digest, ib_.top_chain_id)
        assert a.chain(ia.top_chain_id or "") and [s.key for s in a.chain(ia.top_chain_id or "")] == \
            [s.key for s in b.chain(ib_.top_chain_id or "")]
    assert_clean(fresh)
    assert not os.listdir(fresh / "tmp")

    # a second pull moves nothing; a second push uploads nothing
    again = json.loads(layerfs(fresh, "pull", dest, "--format", "json").stdout)
    assert again["fetched_blobs"] == [] and again["new_layers"] == []
    pushed = json.loads(layerfs(src, "push", "app:1", dest, "--format", "json").stdout)
    assert set(pushed["blobs"].values()) == {"exists"}


def test_pull_by_digest_and_the_umoci_tree(tmp_path: Path, reg: RegistryServer, image: tuple[Path, Path]) -> None:
    layout, src = image
    digest = layerfs(src, "push", "app:1", f"{reg.host}/app:1").stdout.strip()
    fresh = tmp_path / "fresh"
    ref = f"{reg.host}/app@{digest}"
    layerfs(fresh, "pull", ref)
    bundle = tmp_path / "oracle"
    ib.run("umoci", "unpack", "--image", f"{layout}:1", bundle)
    assert image_tree(fresh, ref) == tree_fingerprint([str(bundle / "rootfs")])


def test_cross_repository_mount_and_chunked_upload(tmp_path: Path, reg: RegistryServer,
                                                   image: tuple[Path, Path]) -> None:
    _, src = image
    first = layerfs(src, "push", "--chunk-size", "65536", "app:1", f"{reg.host}/one/app:1").stdout.strip()
    # pulled from one/app, pushed to two/app of the same registry: blobs mounted, not uploaded
    fresh = tmp_path / "fresh"
    layerfs(fresh, "pull", f"{reg.host}/one/app:1")
    r = json.loads(layerfs(fresh, "push", f"{reg.host}/one/app:1", f"{reg.host}/two/app:1",
                           "--format", "json").stdout)
    assert r["manifest_digest"] == first
    assert set(r["blobs"].values()) == {"mounted"}, r["blobs"]
    again = tmp_path / "again"
    layerfs(again, "pull", f"{reg.host}/two/app:1")
    assert image_tree(again, f"{reg.host}/two/app:1") == image_tree(src, "app:1")


# -- interop with skopeo ---------------------------------------------------------------------


def test_skopeo_reads_what_layerfs_pushed(tmp_path: Path, reg: RegistryServer, image: tuple[Path, Path]) -> None:
    layout, src = image
    digest = layerfs(src, "push", "app:1", f"{reg.host}/app:1").stdout.strip()
    out = tmp_path / "copied"
    skopeo("copy", "-q", "--src-tls-verify=false", f"docker://{reg.host}/app:1", f"oci:{out}:1")
    index = json.loads((out / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [digest]
    src_index = json.loads((layout / "index.json").read_text())
    assert digest in [m["digest"] for m in src_index["manifests"]]  # the umoci manifest, unchanged


def test_layerfs_pulls_what_skopeo_pushed(tmp_path: Path, reg: RegistryServer) -> None:
    layout = ib.build_busybox_image(tmp_path / "build", tmp_path / "layout", "1", LAYERS[:2])
    skopeo("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:1", f"docker://{reg.host}/sk/app:1")
    want = ib.skopeo_inspect(f"oci:{layout}:1")
    root = tmp_path / "store"
    got = json.loads(layerfs(root, "pull", f"{reg.host}/sk/app:1", "--format", "json").stdout)
    raw = ib.run("skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{reg.host}/sk/app:1").encode()
    assert got["manifest_digest"] == want["Digest"] == ib.sha256(raw)
    with Store(str(root)) as s:
        img = s.get_image(f"{reg.host}/sk/app:1")
        layers = json.loads(s.content.read(img.manifest_digest))["layers"]
    assert [entry["digest"] for entry in layers] == want["Layers"]
    bundle = tmp_path / "oracle"
    ib.run("umoci", "unpack", "--image", f"{layout}:1", bundle)
    assert image_tree(root, f"{reg.host}/sk/app:1") == tree_fingerprint([str(bundle / "rootfs")])


def test_multi_platform_index_pushed_by_skopeo(tmp_path: Path, reg: RegistryServer) -> None:
    layout = ib.build_multiplatform_layout(tmp_path / "multi", tag="1")
    skopeo("copy", "-q", "--all", "--dest-tls-verify=false", f"oci:{layout}:1", f"docker://{reg.host}/multi:1")
    root = tmp_path / "store"
    got = json.loads(layerfs(root, "pull", "--platform", "linux/arm64", f"{reg.host}/multi:1",
                             "--format", "json").stdout)
    assert got["platform"] == "linux/arm64"
    with Store(str(root)) as s:
        top = s.get_image(f"{reg.host}/multi:1").top_chain_id
        (layer,) = s.layer_dirs(top)
    assert Path(layer, "etc/platform").read_text() == "linux/arm64/v8\n"
    r = layerfs(root, "pull", "--platform", "linux/s390x", f"{reg.host}/multi:1", check=False)
    assert r.returncode == 1 and "linux/s390x" in r.stderr and "linux/arm/v7" in r.stderr
    assert r.stderr.count("\n") == 1


# -- failures --------------------------------------------------------------------------------


def test_not_found_is_one_line(tmp_path: Path, reg: RegistryServer) -> None:
    r = layerfs(tmp_path / "s", "pull", f"{reg.host}/nothing/here:1", check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("layerfs: error: manifest ") and "not found on" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_missing_blob_is_named(tmp_path: Path, reg: RegistryServer, proxy: Proxy,
                               image: tuple[Path, Path]) -> None:
    _, src = image
    layerfs(src, "push", "app:1", f"{reg.host}/app:1")
    big = str(_big_layer(src)["digest"])
    proxy.faults.status = {f"/blobs/{big}": [404]}
    root = tmp_path / "store"
    r = layerfs(root, "pull", f"{proxy.host}/app:1", check=False)
    assert r.returncode == 1 and f"blob {big}: not found on {proxy.host}" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    assert_clean(root)
    assert os.listdir(root / "tmp") == []


def test_corrupted_blob_is_named_and_the_store_unchanged(tmp_path: Path, reg: RegistryServer, proxy: Proxy,
                                                         image: tuple[Path, Path]) -> None:
    _, src = image
    layerfs(src, "push", "app:1", f"{reg.host}/app:1")
    with Store(str(src)) as s:
        layers = json.loads(s.content.read(s.get_image("app:1").manifest_digest))["layers"]
    bad = layers[1]["digest"]
    proxy.faults.corrupt.add(bad)
    root = tmp_path / "store"
    r = layerfs(root, "pull", f"{proxy.host}/app:1", check=False)
    assert r.returncode == 1, r.stderr
    assert f"blob {bad}" in r.stderr and "digest mismatch" in r.stderr and r.stderr.count("\n") == 1
    with Store(str(root)) as s:
        assert s.list_images() == [] and s.list_snapshots() == []
    assert_clean(root)
    assert os.listdir(root / "tmp") == []


def test_429_and_503_are_retried_with_retry_after(tmp_path: Path, reg: RegistryServer, proxy: Proxy,
                                                  image: tuple[Path, Path]) -> None:
    _, src = image
    layerfs(src, "push", "app:1", f"{reg.host}/app:1")
    proxy.faults.status = {r"/manifests/": [429, 503], r"/blobs/sha256:": [503, 429, 500]}
    root = tmp_path / "store"
    layerfs(root, "pull", f"{proxy.host}/app:1")
    assert image_tree(root, f"{proxy.host}/app:1") == image_tree(src, "app:1")
    # connections closed without an answer are retried too
    proxy.faults.status = {}
    proxy.faults.drop = {r"/manifests/": 2, r"/blobs/sha256:": 2}
    layerfs(tmp_path / "dropped", "pull", f"{proxy.host}/app:1")
    assert proxy.faults.drop == {r"/manifests/": 0, r"/blobs/sha256:": 0}
    # always 429: a clear error once the retries are spent
    proxy.faults.status = {r"/manifests/": [429] * 10}
    r = layerfs(tmp_path / "other", "pull", "--retries", "2", f"{proxy.host}/app:1", check=False)
    assert r.returncode == 1 and "too many requests (429)" in r.stderr and r.stderr.count("\n") == 1


def test_cut_blob_resumes_with_range(tmp_path: Path, reg: RegistryServer, proxy: Proxy,
                                     image: tuple[Path, Path]) -> None:
    _, src = image
    layerfs(src, "push", "app:1", f"{reg.host}/app:1")
    with Store(str(src)) as s:
        layers = json.loads(s.content.read(s.get_image("app:1").manifest_digest))["layers"]
    big = max(layers, key=lambda d: d["size"])
    proxy.faults.cut_after = {big["digest"]: 1_000_000}
    root = tmp_path / "store"
    # with no retries the cut fails the pull, and the partial blob stays for the next run
    r = layerfs(root, "pull", "--retries", "0", f"{proxy.host}/app:1", check=False)
    assert r.returncode == 1 and "run the pull again to resume" in r.stderr, r.stderr
    partial = root / "tmp" / f"ingest-{big['digest'][7:]}.partial"
    assert partial.stat().st_size == 1_000_000
    with Store(str(root)) as s:
        assert s.list_images() == []
    layerfs(root, "pull", f"{proxy.host}/app:1")
    assert "bytes=1000000-" in proxy.ranges()
    assert image_tree(root, f"{proxy.host}/app:1") == image_tree(src, "app:1")
    # within one run a cut connection is retried from where it stopped
    proxy.faults.cut_after = {big["digest"]: 500_000}
    other = tmp_path / "other"
    layerfs(other, "pull", f"{proxy.host}/app:1")
    assert "bytes=500000-" in proxy.ranges()
    assert_clean(other)


def _big_layer(src: Path) -> dict[str, Any]:
    with Store(str(src)) as s:
        layers: list[dict[str, Any]] = json.loads(s.content.read(s.get_image("app:1").manifest_digest))["layers"]
    return max(layers, key=lambda d: int(d["size"]))


def test_registry_killed_mid_blob_then_restarted(tmp_path: Path, reg: RegistryServer, proxy: Proxy,
                                                image: tuple[Path, Path]) -> None:
    _, src = image
    layerfs(src, "push", "app:1", f"{reg.host}/app:1")
    big = str(_big_layer(src)["digest"])

    def kill_registry(digest: str, sent: int) -> bool:
        if digest == big and sent >= 1_000_000:
            proxy.faults.on_blob_bytes = None
            reg.kill9()  # and what it had already sent is lost with it
            return True
        return False

    proxy.faults.on_blob_bytes = kill_registry
    root = tmp_path / "store"
    r = layerfs(root, "pull", "--retries", "1", f"{proxy.host}/app:1", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    partial = root / "tmp" / f"ingest-{big[7:]}.partial"
    kept = partial.stat().st_size
    assert 1_000_000 <= kept < int(_big_layer(src)["size"])
    with Store(str(root)) as s:
        assert s.list_images() == [] and s.list_snapshots() == []
    reg.start()
    layerfs(root, "pull", f"{proxy.host}/app:1")
    assert f"bytes={kept}-" in proxy.ranges()
    assert image_tree(root, f"{proxy.host}/app:1") == image_tree(src, "app:1")
    with Store(str(root)) as s:
        assert fsck(s, repair=True, verify_blobs=True).unrepaired == []
    assert_clean(root)


@pytest.mark.parametrize("kill_at", [200_000, 2_000_000])
def test_kill_9_of_the_client_mid_pull(tmp_path: Path, reg: RegistryServer, proxy: Proxy,
                                       image: tuple[Path, Path], kill_at: int) -> None:
    _, src = image
    layerfs(src, "push", "app:1", f"{reg.host}/app:1")
    proxy.faults.rate = 2_000_000  # bytes/s per blob: slow enough to be caught mid-way
    root = tmp_path / "store"
    cmd = [sys.executable, "-m", "layerfs", "--root", str(root), "-q", "pull", f"{proxy.host}/app:1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **FAST})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = root / "tmp"
            got = sum(p.stat().st_size for p in tmp.glob("ingest-*.partial")) if tmp.is_dir() else 0
            if got >= kill_at:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the pull finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    with Store(str(root)) as s:
        report = fsck(s)
        assert s.list_images() == []
    assert all(f.problem.startswith("leftover staging tmp/") for f in report.findings), report.findings
    proxy.faults.rate = None
    layerfs(root, "pull", f"{proxy.host}/app:1")
    assert proxy.ranges(), "the re-run did not resume"
    assert image_tree(root, f"{proxy.host}/app:1") == image_tree(src, "app:1")
    with Store(str(root)) as s:
        fsck(s, repair=True)
    assert_clean(root)


def test_push_of_a_committed_container(tmp_path: Path, reg: RegistryServer, image: tuple[Path, Path]) -> None:
    from layerfs import containers

    _, src = image
    layerfs(src, "create", "web", "--from", "app:1")
    with Store(str(src)) as s:
        upper = Path(containers.upper(s, containers.get(s, "web")))
    (upper / "srv").mkdir()
    (upper / "srv" / "new.txt").write_text("made in the container\n")
    (upper / "etc").mkdir()
    os.mknod(upper / "etc" / "motd", 0o600 | 0o020000, 0)  # a whiteout: etc/motd deleted
    layerfs(src, "commit", "web", "app:2", "-m", "container changes")
    digest = layerfs(src, "push", "app:2", f"{reg.host}/app:2").stdout.strip()
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{reg.host}/app:2"))
    assert info["Digest"] == digest and len(info["Layers"]) == 4
    out = tmp_path / "copied"
    skopeo("copy", "-q", "--src-tls-verify=false", f"docker://{reg.host}/app:2", f"oci:{out}:2")
    bundle = tmp_path / "bundle"
    ib.run("umoci", "unpack", "--image", f"{out}:2", bundle)
    rootfs = bundle / "rootfs"
    assert (rootfs / "srv" / "new.txt").read_text() == "made in the container\n"
    assert not (rootfs / "etc" / "motd").exists() and (rootfs / "srv" / "app.conf").exists()
    assert tree_fingerprint([str(rootfs)]) == image_tree(src, "app:2")


# -- auth and TLS ----------------------------------------------------------------------------


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[tuple[RegistryServer, Path]]:
    """TLS with a CA made here, htpasswd basic auth (alice / wonderland): (registry, cert dir)."""
    ca = make_ca(tmp_path / "ca")
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(ca.cert.read_bytes())
    users = htpasswd_file(tmp_path / "htpasswd", {"alice": "wonderland"})
    server = RegistryServer(tmp_path / "secure", tls=ca, htpasswd=users).start()
    try:
        yield server, certs
    finally:
        server.stop()


def test_tls_basic_auth_login_logout(tmp_path: Path, secure: tuple[RegistryServer, Path],
                                     image: tuple[Path, Path]) -> None:
    reg, certs = secure
    _, src = image
    auth = tmp_path / "auth" / "auth.json"
    env = {"REGISTRY_AUTH_FILE": str(auth), "DOCKER_CONFIG": str(tmp_path / "no-docker"),
           "XDG_CONFIG_HOME": str(tmp_path / "no-config")}
    dest = f"{reg.host}/app:1"
    # no CA: the certificate is refused, in one line
    r = layerfs(src, "push", "app:1", dest, env=env, check=False)
    assert r.returncode == 1 and "certificate" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    # the CA but no credentials: 401, and how to log in
    r = layerfs(src, "push", "--cert-dir", str(certs), "app:1", dest, env=env, check=False)
    assert r.returncode == 1 and f"layerfs login {reg.host}" in r.stderr, r.stderr
    r = layerfs(src, "push", "--cert-dir", str(certs), "--creds", "alice:wrong", "app:1", dest, env=env,
                check=False)
    assert r.returncode == 1 and "denied access (401)" in r.stderr and "as alice" in r.stderr, r.stderr
    r = layerfs(src, "login", "--cert-dir", str(certs), "-u", "alice", "--password-stdin", reg.host,
                input="wrong\n", env=env, check=False)
    assert r.returncode == 1 and not auth.exists()
    layerfs(src, "login", "--cert-dir", str(certs), "-u", "alice", "--password-stdin", reg.host,
            input="wonderland\n", env=env)
    entry = json.loads(auth.read_text())["auths"][reg.host]
    assert base64.b64decode(entry["auth"]) == b"alice:wonderland"
    assert auth.stat().st_mode & 0o777 == 0o600
    digest = layerfs(src, "push", "--cert-dir", str(certs), "app:1", dest, env=env).stdout.strip()
    fresh = tmp_path / "fresh"
    got = json.loads(layerfs(fresh, "pull", "--cert-dir", str(certs), dest, "--format", "json", env=env).stdout)
    assert got["manifest_digest"] == digest
    # --tls-verify=false: no CA needed
    layerfs(tmp_path / "insecure", "pull", "--tls-verify=false", dest, env=env)
    layerfs(src, "logout", reg.host, env=env)
    assert reg.host not in json.loads(auth.read_text())["auths"]
    r = layerfs(tmp_path / "after", "pull", "--cert-dir", str(certs), dest, env=env, check=False)
    assert r.returncode == 1 and "login" in r.stderr
    # docker's config.json is read too
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps(
        {"auths": {f"https://{reg.host}": {"auth": base64.b64encode(b"alice:wonderland").decode()}}}))
    layerfs(tmp_path / "docker-store", "pull", "--cert-dir", str(certs), dest,
            env={**env, "DOCKER_CONFIG": str(docker)})


def test_bearer_token_flow(tmp_path: Path, image: tuple[Path, Path]) -> None:
    _, src = image
    tokens = TokenServer(tmp_path / "token", {"bob": "builder"})
    reg = RegistryServer(tmp_path / "tokreg", token=tokens)
    try:
        reg.start()
        env = {"REGISTRY_AUTH_FILE": str(tmp_path / "auth.json"), "DOCKER_CONFIG": str(tmp_path / "none")}
        dest = f"{reg.host}/team/app:1"
        r = layerfs(src, "push", "app:1", dest, env=env, check=False)
        assert r.returncode == 1 and "denied access (401)" in r.stderr, r.stderr
        digest = layerfs(src, "push", "--creds", "bob:builder", "app:1", dest, env=env).stdout.strip()
        assert any(q["user"] == "bob" and "repository:team/app:pull,push" in q["scopes"] for q in tokens.requests)
        r = layerfs(src, "push", "--creds", "bob:nope", "app:1", dest, env=env, check=False)
        assert r.returncode == 1 and "refused a token as bob" in r.stderr, r.stderr
        layerfs(src, "login", "-u", "bob", "--password-stdin", reg.host, input="builder\n", env=env)
        got = json.loads(layerfs(tmp_path / "fresh", "pull", dest, "--format", "json", env=env).stdout)
        assert got["manifest_digest"] == digest
        assert image_tree(tmp_path / "fresh", dest) == image_tree(src, "app:1")
    finally:
        reg.stop()
        tokens.close()


# -- mirrors ---------------------------------------------------------------------------------


def test_mirrors_from_registries_conf(tmp_path: Path, reg: RegistryServer, image: tuple[Path, Path]) -> None:
    _, src = image
    digest = layerfs(src, "push", "app:1", f"{reg.host}/mirror/team/app:1").stdout.strip()
    conf = tmp_path / "registries.conf"
    # the image's own registry is never reached: the mirror has it
    conf.write_text(
        '[[registry]]\nprefix = "registry.invalid/team"\nlocation = "registry.invalid/team"\n'
        f'[[registry.mirror]]\nlocation = "{reg.host}/mirror/team"\ninsecure = true\n'
    )
    env = {"CONTAINERS_REGISTRIES_CONF": str(conf)}
    got = json.loads(layerfs(tmp_path / "a", "pull", "registry.invalid/team/app:1", "--format", "json",
                             env=env).stdout)
    assert got["manifest_digest"] == digest and got["endpoint"] == f"{reg.host}/mirror/team/app"
    assert got["name"] == "registry.invalid/team/app:1"
    # a mirror without the image: the registry itself answers
    empty = RegistryServer(tmp_path / "empty").start()
    try:
        conf.write_text(
            f'[[registry]]\nlocation = "{reg.host}"\n[[registry.mirror]]\nlocation = "{empty.host}"\n'
        )
        got = json.loads(layerfs(tmp_path / "b", "pull", f"{reg.host}/mirror/team/app:1", "--format", "json",
                                 env=env).stdout)
        assert got["endpoint"] == f"{reg.host}/mirror/team/app"
        # digest-only mirrors are skipped for a pull by tag
        conf.write_text(
            f'[[registry]]\nlocation = "{reg.host}"\n[[registry.mirror]]\nlocation = "{empty.host}"\n'
            'pull-from-mirror = "digest-only"\n'
        )
        layerfs(tmp_path / "c", "pull", f"{reg.host}/mirror/team/app:1", env=env)
    finally:
        empty.stop()
    conf.write_text(f'[[registry]]\nlocation = "{reg.host}"\nblocked = true\n')
    r = layerfs(tmp_path / "d", "pull", f"{reg.host}/mirror/team/app:1", env=env, check=False)
    assert r.returncode == 1 and "blocked" in r.stderr and r.stderr.count("\n") == 1


def test_layerfs_pushes_a_multi_platform_index(tmp_path: Path, reg: RegistryServer) -> None:
    platforms = ("linux/amd64", "linux/arm64/v8", "linux/arm/v7")
    layout = ib.build_multiplatform_layout(tmp_path / "multi", platforms, tag="1")
    src = tmp_path / "src"
    names = []
    for p in platforms:
        name = f"multi:{p.replace('/', '-')}"
        layerfs(src, "import", str(layout), "--platform", p, "--name", name)
        names.append(name)
    dest = f"{reg.host}/multi:1"
    index_digest = layerfs(src, "push", names[0], dest, *[a for n in names[1:] for a in ("--index-with", n)]
                           ).stdout.strip()
    raw = ib.run("skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{dest}").encode()
    assert ib.sha256(raw) == index_digest
    index = json.loads(raw)
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    want = {m["digest"] for m in json.loads((layout / "blobs" / "sha256" / json.loads(
        (layout / "index.json").read_text())["manifests"][0]["digest"][7:]).read_text())["manifests"]}
    assert {m["digest"] for m in index["manifests"]} == want  # every platform's manifest, unchanged
    # skopeo copies the whole index back; layerfs pulls each platform of it
    skopeo("copy", "-q", "--all", "--src-tls-verify=false", f"docker://{dest}", f"oci:{tmp_path / 'back'}:1")
    for p in platforms:
        root = tmp_path / f"pulled-{p.replace('/', '-')}"
        got = json.loads(layerfs(root, "pull", "--platform", p, dest, "--format", "json").stdout)
        assert got["manifest_digest"] in want
        with Store(str(root)) as s:
            (layer,) = s.layer_dirs(s.get_image(dest).top_chain_id)
        assert Path(layer, "etc/platform").read_text() == f"{p}\n"
    r = layerfs(src, "push", names[0], f"{reg.host}/dup:1", "--index-with", names[0], check=False)
    assert r.returncode == 1 and "one image per platform" in r.stderr


def test_schema_1_is_a_clear_error(tmp_path: Path, proxy: Proxy) -> None:
    body = json.dumps({"schemaVersion": 1, "name": "old/app", "tag": "1", "architecture": "amd64",
                       "fsLayers": [], "history": [], "signatures": []}).encode()
    proxy.faults.manifest = ("application/vnd.docker.distribution.manifest.v1+prettyjws", body)
    root = tmp_path / "store"
    r = layerfs(root, "pull", f"{proxy.host}/old/app:1", check=False)
    assert r.returncode == 1 and "Docker schema 1 manifest" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert_clean(root)


def test_sigterm_mid_pull_cleans_up_and_keeps_the_partial(tmp_path: Path, reg: RegistryServer, proxy: Proxy,
                                                          image: tuple[Path, Path]) -> None:
    _, src = image
    layerfs(src, "push", "app:1", f"{reg.host}/app:1")
    proxy.faults.rate = 1_000_000
    root = tmp_path / "store"
    cmd = [sys.executable, "-m", "layerfs", "--root", str(root), "-q", "pull", f"{proxy.host}/app:1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **FAST})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list((root / "tmp").glob("ingest-*.partial")):
            time.sleep(0.01)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0 and b"Traceback" not in err, err
    left = sorted(p.name for p in (root / "tmp").iterdir())
    assert left and all(n.endswith(".partial") for n in left), left  # staging gone, downloads kept
    with Store(str(root)) as s:
        assert s.list_images() == [] and s.list_snapshots() == []


def test_a_blob_listed_twice_and_blobs_the_store_has(tmp_path: Path, reg: RegistryServer) -> None:
    layout = tmp_path / "twice"
    same = ib.layer_tar({"etc/same": "x\n"})
    desc = ib.add_image(layout, [same, ib.layer_tar({"etc/other": "y\n"}), same])
    ib.set_index(layout, [(desc, {ib.REF_NAME: "1"})])
    skopeo("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:1", f"docker://{reg.host}/twice:1")
    root = tmp_path / "store"
    got = json.loads(layerfs(root, "pull", f"{reg.host}/twice:1", "--format", "json").stdout)
    assert len(got["fetched_blobs"]) == 2 and len(got["new_layers"]) == 3
    assert_clean(root)
    # an image made of blobs the store already has (other ChainIDs): nothing is downloaded
    desc2 = ib.add_image(layout, [ib.layer_tar({"etc/other": "y\n"}), same])
    ib.set_index(layout, [(desc2, {ib.REF_NAME: "2"})])
    skopeo("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:2", f"docker://{reg.host}/twice:2")
    got = json.loads(layerfs(root, "pull", f"{reg.host}/twice:2", "--format", "json").stdout)
    assert got["fetched_blobs"] == [] and len(got["new_layers"]) == 2
    assert_clean(root)


def test_two_pulls_of_one_image_into_one_store_at_once(tmp_path: Path, reg: RegistryServer, proxy: Proxy,
                                                      image: tuple[Path, Path]) -> None:
    _, src = image
    layerfs(src, "push", "app:1", f"{reg.host}/app:1")
    proxy.faults.rate = 3_000_000
    root = tmp_path / "store"
    cmd = [sys.executable, "-m", "layerfs", "--root", str(root), "-q", "pull", f"{proxy.host}/app:1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **FAST})
             for _ in range(2)]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], results
    assert image_tree(root, f"{proxy.host}/app:1") == image_tree(src, "app:1")
    assert_clean(root)


def test_docker_schema_2_image_pulled_and_pushed_as_it_is(tmp_path: Path, reg: RegistryServer) -> None:
    layout = ib.build_busybox_image(tmp_path / "build", tmp_path / "layout", "1", LAYERS[:2])
    skopeo("copy", "-q", "--format", "v2s2", "--dest-tls-verify=false", f"oci:{layout}:1",
           f"docker://{reg.host}/d2/app:1")
    raw = ib.run("skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{reg.host}/d2/app:1").encode()
    assert json.loads(raw)["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    root = tmp_path / "store"
    got = json.loads(layerfs(root, "pull", f"{reg.host}/d2/app:1", "--format", "json").stdout)
    assert got["manifest_digest"] == ib.sha256(raw)
    pushed = layerfs(root, "push", f"{reg.host}/d2/app:1", f"{reg.host}/d2/copy:1").stdout.strip()
    again = ib.run("skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{reg.host}/d2/copy:1").encode()
    assert pushed == got["manifest_digest"] and again == raw
