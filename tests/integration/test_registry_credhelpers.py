"""Credential helpers (``credsStore``, ``credHelpers``) with a real one: Debian's
``docker-credential-pass`` over a ``pass`` store and a gpg key made in the test's tmp dir.

The registry is a token-auth docker-registry (the test's token server knows the user and
an identity token), so a pull succeeds only with the credentials the helper gives.
The gpg-agent that ``pass`` starts is stopped by PID in a finalizer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_registry import LAYERS, image_tree, layerfs
from tests.support import imagebuild as ib
from tests.support.markers import needs_root, needs_umoci
from tests.support.registry import RegistryServer, TokenServer, needs_registry

pytestmark = [
    needs_registry, needs_umoci, needs_root,
    pytest.mark.skipif(shutil.which("docker-credential-pass") is None or shutil.which("pass") is None,
                       reason="docker-credential-pass / pass not installed (scripts/bootstrap)"),
]

TOKEN = "identity-token-for-bob"


@dataclass
class PassStore:
    env: dict[str, str]  # GNUPGHOME, PASSWORD_STORE_DIR

    def helper(self, action: str, payload: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker-credential-pass", action], input=payload, capture_output=True, text=True,
                              env={**os.environ, **self.env}, timeout=60)


def _agent_pid(env: dict[str, str]) -> int | None:
    r = subprocess.run(["gpg-connect-agent", "--no-autostart", "getinfo pid", "/bye"], capture_output=True,
                       text=True, env={**os.environ, **env}, timeout=30)
    for line in r.stdout.splitlines():
        if line.startswith("D "):
            return int(line[2:].strip())
    return None


@pytest.fixture
def pass_store(tmp_path: Path) -> Iterator[PassStore]:
    """A pass store under tmp, encrypted to a passphrase-less gpg key made here."""
    gnupg = tmp_path / "gnupg"
    gnupg.mkdir(mode=0o700)
    env = {"GNUPGHOME": str(gnupg), "PASSWORD_STORE_DIR": str(tmp_path / "pass")}
    try:
        ib.run("env", *[f"{k}={v}" for k, v in env.items()], "gpg", "--batch", "--passphrase", "",
               "--quick-gen-key", "layerfs-test@example.invalid", "default", "default", "never")
        ib.run("env", *[f"{k}={v}" for k, v in env.items()], "pass", "init", "layerfs-test@example.invalid")
        yield PassStore(env)
    finally:
        pid = _agent_pid(env)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[tuple[RegistryServer, TokenServer]]:
    tokens = TokenServer(tmp_path / "token", {"bob": "builder"}, refresh_tokens={TOKEN: "bob"})
    reg = RegistryServer(tmp_path / "tokreg", token=tokens)
    try:
        reg.start()
        yield reg, tokens
    finally:
        reg.stop()
        tokens.close()


@pytest.fixture
def pushed(tmp_path: Path, token_registry: tuple[RegistryServer, TokenServer]) -> tuple[str, str, Path]:
    """The test image pushed with --creds: (reference, manifest digest, source store)."""
    reg, _ = token_registry
    layout = ib.build_busybox_image(tmp_path / "build", tmp_path / "layout", "1", LAYERS[:2])
    src = tmp_path / "src-store"
    layerfs(src, "import", f"{layout}", "--name", "app:1")
    ref = f"{reg.host}/team/app:1"
    env = {"REGISTRY_AUTH_FILE": str(tmp_path / "none.json"), "DOCKER_CONFIG": str(tmp_path / "none")}
    digest = layerfs(src, "push", "--creds", "bob:builder", "app:1", ref, env=env).stdout.strip()
    return ref, digest, src


def _env(tmp_path: Path, store: PassStore, docker_config: dict[str, object] | None = None,
         auth_json: dict[str, object] | None = None) -> dict[str, str]:
    docker, auth = tmp_path / "docker", tmp_path / "auth" / "auth.json"
    if docker_config is not None:
        docker.mkdir(exist_ok=True)
        (docker / "config.json").write_text(json.dumps(docker_config))
    if auth_json is not None:
        auth.parent.mkdir(exist_ok=True)
        auth.write_text(json.dumps(auth_json))
    return {**store.env, "DOCKER_CONFIG": str(docker), "REGISTRY_AUTH_FILE": str(auth),
            "XDG_CONFIG_HOME": str(tmp_path / "no-config")}


def test_creds_store_login_pull_logout(tmp_path: Path, pass_store: PassStore,
                                       token_registry: tuple[RegistryServer, TokenServer],
                                       pushed: tuple[str, str, Path]) -> None:
    reg, tokens = token_registry
    ref, digest, src = pushed
    env = _env(tmp_path, pass_store, docker_config={"credsStore": "pass"})
    # the helper has nothing for this registry: anonymous, refused
    r = layerfs(tmp_path / "s0", "pull", ref, env=env, check=False)
    assert r.returncode == 1 and "denied access (401)" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    # login checks the password with the registry, then stores through the helper, not in a file
    r = layerfs(src, "login", "-u", "bob", "--password-stdin", reg.host, input="nope\n", env=env, check=False)
    assert r.returncode == 1 and "refused a token as bob" in r.stderr, r.stderr
    assert json.loads(pass_store.helper("list", "").stdout) == {}
    r = layerfs(src, "login", "-u", "bob", "--password-stdin", reg.host, input="builder\n", env=env)
    assert "Login Succeeded" in r.stdout
    assert not (tmp_path / "auth" / "auth.json").exists()
    assert json.loads((tmp_path / "docker" / "config.json").read_text()) == {"credsStore": "pass"}
    assert json.loads(pass_store.helper("list", "").stdout) == {reg.host: "bob"}
    got = json.loads(pass_store.helper("get", reg.host).stdout)
    assert (got["Username"], got["Secret"]) == ("bob", "builder")
    # pull with what the helper gives
    seen = len(tokens.requests)
    out = json.loads(layerfs(tmp_path / "s1", "pull", ref, "--format", "json", env=env).stdout)
    assert out["manifest_digest"] == digest
    assert image_tree(tmp_path / "s1", ref) == image_tree(src, "app:1")
    assert any(q["user"] == "bob" for q in tokens.requests[seen:])
    # logout erases it from the helper: anonymous again
    r = layerfs(src, "logout", reg.host, env=env)
    assert f"Removed login credentials for {reg.host}" in r.stdout
    assert json.loads(pass_store.helper("list", "").stdout) == {}
    r = layerfs(tmp_path / "s2", "pull", ref, env=env, check=False)
    assert r.returncode == 1 and "denied access (401)" in r.stderr, r.stderr
    r = layerfs(src, "logout", reg.host, env=env, check=False)
    assert r.returncode != 0 and "not logged in" in r.stderr and "docker-credential-pass" in r.stderr, r.stderr


def test_cred_helpers_identity_token_from_auth_json(tmp_path: Path, pass_store: PassStore,
                                                    token_registry: tuple[RegistryServer, TokenServer],
                                                    pushed: tuple[str, str, Path]) -> None:
    """containers' auth.json ``credHelpers`` for one registry; the helper holds an identity
    token (Username ``<token>``), which is exchanged as a refresh_token (POST), never sent as a password."""
    reg, tokens = token_registry
    ref, digest, _ = pushed
    stored = pass_store.helper("store", json.dumps({"ServerURL": reg.host, "Username": "<token>", "Secret": TOKEN}))
    assert stored.returncode == 0, stored.stdout + stored.stderr
    # credHelpers beats credsStore and the auths entry of the same file
    env = _env(tmp_path, pass_store, auth_json={
        "credHelpers": {reg.host: "pass"}, "credsStore": "no-such-helper",
        "auths": {reg.host: {"username": "bob", "password": "wrong"}}})
    seen = len(tokens.requests)
    out = json.loads(layerfs(tmp_path / "s1", "pull", ref, "--format", "json", env=env).stdout)
    assert out["manifest_digest"] == digest
    mine = tokens.requests[seen:]
    assert mine and all(q["method"] == "POST" and q["user"] == "bob" for q in mine), mine
    assert any("repository:team/app:pull" in q["scopes"] for q in mine), mine
    # another registry name is not given to that helper: credsStore answers for it, and is missing
    other = ref.replace("127.0.0.1:", "localhost:")
    r = layerfs(tmp_path / "s2", "pull", other, env=env, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "docker-credential-no-such-helper" in r.stderr and "localhost:" in r.stderr, r.stderr


def test_missing_and_failing_helper_are_one_line(tmp_path: Path, pass_store: PassStore,
                                                 token_registry: tuple[RegistryServer, TokenServer],
                                                 pushed: tuple[str, str, Path]) -> None:
    reg, _ = token_registry
    ref, _, src = pushed
    env = _env(tmp_path, pass_store, docker_config={"credHelpers": {reg.host: "layerfs-test-absent"}})
    r = layerfs(tmp_path / "s1", "pull", ref, env=env, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "docker-credential-layerfs-test-absent" in r.stderr and reg.host in r.stderr
    assert "not installed" in r.stderr and "Traceback" not in r.stderr
    # login through a missing helper fails the same way, after the registry accepted the password
    r = layerfs(src, "login", "-u", "bob", "--password-stdin", reg.host, input="builder\n", env=env, check=False)
    assert r.returncode == 1 and "docker-credential-layerfs-test-absent" in r.stderr, r.stderr
    # a helper that fails: the entry is encrypted to a key this GNUPGHOME does not have
    stored = pass_store.helper("store", json.dumps({"ServerURL": reg.host, "Username": "bob", "Secret": "builder"}))
    assert stored.returncode == 0
    other = tmp_path / "other-gnupg"
    other.mkdir(mode=0o700)
    bad = {**_env(tmp_path, pass_store, docker_config={"credsStore": "pass"}), "GNUPGHOME": str(other)}
    try:
        r = layerfs(tmp_path / "s2", "pull", ref, env=bad, check=False)
    finally:
        pid = _agent_pid({"GNUPGHOME": str(other)})
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "docker-credential-pass" in r.stderr and reg.host in r.stderr and "'get' failed" in r.stderr, r.stderr
