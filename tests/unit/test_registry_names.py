"""Registry names and credentials without a registry: docker's canonical references, the
auth files' lookup order and key spellings, the WWW-Authenticate grammar, loopback hosts."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from layerfs.errors import InvalidArgument
from layerfs.image.ref import canonical_ref, normalize_ref
from layerfs.registry import auth
from layerfs.registry.client import is_loopback
from layerfs.registry.login import registry_host


@pytest.mark.parametrize(("ref", "canonical"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("demo/x:1", "docker.io/demo/x:1"),
    ("docker.io/busybox", "docker.io/library/busybox:latest"),
    ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
    ("localhost:5000/a", "localhost:5000/a:latest"),
    ("quay.io/x/y:2", "quay.io/x/y:2"),
    ("busybox@sha256:" + "a" * 64, "docker.io/library/busybox@sha256:" + "a" * 64),
])
def test_canonical_ref(ref: str, canonical: str) -> None:
    assert canonical_ref(ref) == canonical
    assert canonical_ref(canonical) == canonical  # idempotent


def test_normalize_ref_is_unchanged() -> None:
    assert normalize_ref("busybox") == "busybox:latest"
    with pytest.raises(InvalidArgument):
        canonical_ref("Bad/Name")


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    paths = {"login": tmp_path / "run" / "auth.json", "config": tmp_path / "config" / "containers" / "auth.json",
             "docker": tmp_path / "docker" / "config.json"}
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(paths["login"]))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    return paths


def test_lookup_order_and_spellings(files: dict[str, Path]) -> None:
    files["docker"].write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": _b64("hub:pw")},
        "reg.example:5000": {"auth": _b64("docker:pw")},
    }}))
    files["config"].write_text(json.dumps({"auths": {"reg.example:5000/team": {"username": "team", "password": "t"}}}))
    assert auth.lookup("docker.io", "library/busybox") == auth.Credentials("hub", "pw")
    assert auth.lookup("reg.example:5000", "team/app") == auth.Credentials("team", "t")
    assert auth.lookup("reg.example:5000", "other/app") == auth.Credentials("docker", "pw")
    assert auth.lookup("elsewhere", "x") is None
    path = auth.store_login("reg.example:5000", auth.Credentials("me", "secret:with:colons"))
    assert path == str(files["login"])
    assert auth.lookup("reg.example:5000", "team/app") == auth.Credentials("me", "secret:with:colons")
    assert files["login"].stat().st_mode & 0o777 == 0o600
    assert auth.remove_login("reg.example:5000") and not auth.remove_login("reg.example:5000")
    assert auth.lookup("reg.example:5000", "team/app") == auth.Credentials("team", "t")


def test_broken_auth_file_is_one_clear_error(files: dict[str, Path]) -> None:
    files["login"].write_text("{not json")
    with pytest.raises(InvalidArgument, match=str(files["login"])):
        auth.lookup("x", "y")
    files["login"].write_text(json.dumps({"auths": {"x": {"auth": _b64("nocolon")}}}))
    with pytest.raises(InvalidArgument, match="user:password"):
        auth.lookup("x", "y")


def test_parse_challenge() -> None:
    c = auth.parse_challenge('Bearer realm="https://auth.example/token",service="registry.example",'
                             'scope="repository:a/b:pull,push"')
    assert c is not None and c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "registry.example",
                        "scope": "repository:a/b:pull,push"}
    b = auth.parse_challenge('Basic realm="Registry Realm"')
    assert b is not None and b.scheme == "basic" and b.params == {"realm": "Registry Realm"}
    assert auth.parse_challenge("") is None


@pytest.mark.parametrize(("host", "loop"), [
    ("localhost:5000", True), ("127.0.0.1:5000", True), ("127.8.0.2", True), ("[::1]:5000", True),
    ("10.0.0.1:5000", False), ("registry.example", False), ("localhost.example:5000", False),
])
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


def test_registry_host() -> None:
    assert registry_host("https://127.0.0.1:5000/") == "127.0.0.1:5000"
    assert registry_host("index.docker.io") == "docker.io"
    with pytest.raises(InvalidArgument):
        registry_host("https://")


def test_mirror_endpoints(tmp_path: Path) -> None:
    from layerfs.errors import Unauthorized
    from layerfs.image.ref import parse_ref
    from layerfs.registry.mirrors import Endpoint, endpoints

    conf = tmp_path / "registries.conf"
    conf.write_text(
        '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n'
        '[[registry.mirror]]\nlocation = "mirror.example:5000/hub"\ninsecure = true\n'
        '[[registry.mirror]]\nlocation = "digests.example"\npull-from-mirror = "digest-only"\n'
        '[[registry]]\nprefix = "quay.io/team"\nlocation = "internal.example/quay-team"\n'
        '[[registry]]\nlocation = "blocked.example"\nblocked = true\n'
    )
    (tmp_path / "registries.conf.d").mkdir()
    (tmp_path / "registries.conf.d" / "50-more.conf").write_text(
        '[[registry]]\nprefix = "*.corp.example"\nlocation = "ignored"\n'
        '[[registry.mirror]]\nlocation = "cache.example"\n'
    )
    got = endpoints(parse_ref("busybox"), str(conf))
    assert got == [Endpoint("mirror.example:5000", "hub/library/busybox", True, True),
                   Endpoint("docker.io", "library/busybox")]
    by_digest = endpoints(parse_ref("busybox@sha256:" + "b" * 64), str(conf))
    assert [str(e) for e in by_digest] == ["mirror.example:5000/hub/library/busybox",
                                           "digests.example/library/busybox", "docker.io/library/busybox"]
    assert endpoints(parse_ref("quay.io/team/app:1"), str(conf)) == [
        Endpoint("internal.example", "quay-team/app")]
    assert endpoints(parse_ref("quay.io/other/app:1"), str(conf)) == [Endpoint("quay.io", "other/app")]
    wild = endpoints(parse_ref("reg.corp.example/x/y:1"), str(conf))
    assert [str(e) for e in wild] == ["cache.example/x/y", "reg.corp.example/x/y"]
    with pytest.raises(Unauthorized, match="blocked"):
        endpoints(parse_ref("blocked.example/a:1"), str(conf))
    conf.write_text("[[registry]\n")
    with pytest.raises(InvalidArgument, match="registries configuration"):
        endpoints(parse_ref("busybox"), str(conf))
