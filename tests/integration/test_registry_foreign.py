"""Foreign (non-distributable) layers against a real docker-registry and an HTTP server the
test serves for the layers' ``urls``.

The registry is configured to accept the urls of manifests (``validation.manifests.urls.allow``,
which distribution 2.8 otherwise refuses). skopeo is the oracle for what the registry holds
and for where the urls lead.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from layerfs.store import Store
from tests.integration.test_registry import assert_clean, image_tree, layerfs, skopeo
from tests.support import imagebuild as ib
from tests.support.markers import needs_root, needs_skopeo
from tests.support.registry import RegistryServer, needs_registry

pytestmark = [needs_registry, needs_skopeo, needs_root]

ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
ALLOW_LOOPBACK_URLS = ["validation:", "  manifests:", "    urls:", "      allow:", r"        - '^http://127\.0\.0\.1:'"]


class BlobServer:
    """Serves ``files`` (path -> bytes) over plain HTTP on a free loopback port; records paths."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(self.path)
                data = server.files.get(self.path)
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def blobs() -> Iterator[BlobServer]:
    server = BlobServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path / "registry", extra_config=ALLOW_LOOPBACK_URLS).start()
    try:
        yield server
    finally:
        server.stop()


def foreign_layout(layout: Path, urls: list[str] | None) -> tuple[str, bytes]:
    """An OCI layout ``layout:1`` whose second layer is non-distributable (with ``urls``,
    or none); returns (that layer's digest, its gzip blob). The blob is in the layout."""
    base_files: dict[str, ib.Entry] = {"etc/os-release": "ID=test\n", "usr/bin/tool": os.urandom(50_000)}
    foreign_files: dict[str, ib.Entry] = {"opt/vendor/driver.bin": os.urandom(300_000),
                                          "opt/vendor/LICENSE": "not yours\n"}
    base, foreign = ib.tar_bytes(base_files), ib.tar_bytes(foreign_files)
    desc = ib.add_image(layout, [base, foreign])
    manifest = json.loads(ib.blob_path(layout, desc["digest"]).read_bytes())
    layer = manifest["layers"][1]
    layer["mediaType"] = ND_GZIP
    if urls is not None:
        layer["urls"] = [u.replace("DIGEST", layer["digest"].removeprefix("sha256:")) for u in urls]
    data = ib.compact(manifest)
    ib.blob_path(layout, ib.sha256(data)).write_bytes(data)
    ib.set_index(layout, [({"mediaType": manifest["mediaType"], "digest": ib.sha256(data), "size": len(data)},
                           {"org.opencontainers.image.ref.name": "1"})])
    blob = ib.blob_path(layout, layer["digest"]).read_bytes()
    assert gzip.decompress(blob) == foreign
    return layer["digest"], blob


def registry_has_blob(reg: RegistryServer, repo: str, digest: str) -> bool:
    req = urllib.request.Request(f"{reg.url}/v2/{repo}/blobs/{digest}", method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=10):  # noqa: S310 - loopback
            return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise


def images(root: Path) -> list[str]:
    with Store(str(root)) as s:
        return [img.name for img in s.list_images()]


def test_foreign_layer_pushed_as_urls_and_pulled_from_them(tmp_path: Path, reg: RegistryServer,
                                                           blobs: BlobServer) -> None:
    layout = tmp_path / "layout"
    digest, blob = foreign_layout(layout, [f"{blobs.base}/layers/DIGEST"])
    path = f"/layers/{digest.removeprefix('sha256:')}"
    blobs.files[path] = blob
    src = tmp_path / "src"
    layerfs(src, "import", str(layout), "--name", "app:1")
    dest = f"{reg.host}/team/app:1"
    out = json.loads(layerfs(src, "push", "app:1", dest, "--format", "json").stdout)
    assert out["blobs"][digest] == "foreign"
    assert sorted(out["blobs"].values()) == ["foreign", "uploaded", "uploaded"]
    # the registry has the manifest byte for byte, with the urls, but not the blob
    assert not registry_has_blob(reg, "team/app", digest)
    raw = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{dest}").encode()
    assert ib.sha256(raw) == out["manifest_digest"]
    assert json.loads(raw)["layers"][1]["urls"] == [f"{blobs.base}{path}"]
    # skopeo (the oracle) fetches the layer from its url into a dir: the very blob
    skopeo("copy", "--src-tls-verify=false", f"docker://{dest}", f"dir:{tmp_path / 'skopeo-dir'}")
    assert (tmp_path / "skopeo-dir" / digest.removeprefix("sha256:")).read_bytes() == blob
    # layerfs pull: the registry 404s the blob, the url gives it, digest-checked
    seen = len(blobs.requests)
    fresh = tmp_path / "fresh"
    got = json.loads(layerfs(fresh, "pull", dest, "--format", "json").stdout)
    assert got["manifest_digest"] == out["manifest_digest"] and digest in got["fetched_blobs"]
    assert blobs.requests[seen:] == [path]
    assert image_tree(fresh, dest) == image_tree(src, "app:1")
    assert_clean(fresh)
    # --allow-non-distributable-blobs uploads it too; the manifest stays the same
    dest2 = f"{reg.host}/team/full:1"
    out2 = json.loads(layerfs(src, "push", "--allow-non-distributable-blobs", "app:1", dest2,
                              "--format", "json").stdout)
    assert out2["blobs"][digest] == "uploaded" and out2["manifest_digest"] == out["manifest_digest"]
    assert registry_has_blob(reg, "team/full", digest)
    seen = len(blobs.requests)
    layerfs(tmp_path / "fresh2", "pull", dest2)
    assert blobs.requests[seen:] == []  # the registry had it: the url was not needed
    assert image_tree(tmp_path / "fresh2", dest2) == image_tree(src, "app:1")


def test_foreign_layer_bad_or_missing_at_its_url(tmp_path: Path, reg: RegistryServer, blobs: BlobServer) -> None:
    layout = tmp_path / "layout"
    digest, blob = foreign_layout(layout, [f"ftp://127.0.0.1/{'DIGEST'}", f"{blobs.base}/layers/DIGEST"])
    path = f"/layers/{digest.removeprefix('sha256:')}"
    src = tmp_path / "src"
    layerfs(src, "import", str(layout), "--name", "app:1")
    dest = f"{reg.host}/app:1"
    # the registry refuses an ftp url; push a variant whose urls are http only
    r = layerfs(src, "push", "app:1", dest, check=False)
    assert r.returncode == 1 and "manifest" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    layout2 = tmp_path / "layout2"
    digest, blob = foreign_layout(layout2, [f"{blobs.base}/layers/DIGEST"])
    path = f"/layers/{digest.removeprefix('sha256:')}"
    layerfs(src, "import", str(layout2), "--name", "app:2")
    layerfs(src, "push", "app:2", dest)
    fresh = tmp_path / "fresh"
    # nothing at the url: one line naming the layer and the url
    r = layerfs(fresh, "pull", dest, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"layer {digest}" in r.stderr and "foreign" in r.stderr and f"{blobs.base}{path}" in r.stderr
    assert "404" in r.stderr, r.stderr
    # corrupted bytes at the url: a digest mismatch naming the url; nothing stored
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    blobs.files[path] = bytes(bad)
    r = layerfs(fresh, "pull", dest, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "digest mismatch" in r.stderr and f"{blobs.base}{path}" in r.stderr, r.stderr
    assert images(fresh) == []
    assert_clean(fresh)
    # the right bytes: pulled
    blobs.files[path] = blob
    layerfs(fresh, "pull", dest)
    assert image_tree(fresh, dest) == image_tree(src, "app:2")


def test_foreign_layer_without_urls_not_in_the_registry(tmp_path: Path, blobs: BlobServer) -> None:
    """A registry that does not validate manifests (``validation.disabled``) takes a foreign
    layer with no urls and no blob: the pull names the layer, in one line."""
    reg = RegistryServer(tmp_path / "lax", extra_config=["validation:", "  disabled: true"])
    try:
        reg.start()
        layout = tmp_path / "layout"
        digest, _ = foreign_layout(layout, None)
        src = tmp_path / "src"
        layerfs(src, "import", str(layout), "--name", "app:1")
        dest = f"{reg.host}/app:1"
        # without urls a foreign layer is pushed like any other; delete it from the registry's storage
        out = json.loads(layerfs(src, "push", "app:1", dest, "--format", "json").stdout)
        assert out["blobs"][digest] == "uploaded"
        data = reg.storage / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
        assert data.exists()
        data.unlink()
        r = layerfs(tmp_path / "fresh", "pull", dest, check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"layer {digest}" in r.stderr and "lists no urls" in r.stderr, r.stderr
        assert images(tmp_path / "fresh") == []
    finally:
        reg.stop()
