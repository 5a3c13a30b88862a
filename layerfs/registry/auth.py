"""Registry credentials as users have them, and the ``WWW-Authenticate`` challenge grammar.

Where credentials are read, first match wins:

1. ``$REGISTRY_AUTH_FILE`` (containers' variable), else ``$XDG_RUNTIME_DIR/containers/auth.json``
   (else ``/run/containers/<uid>/auth.json``): the file ``layerfs login`` writes;
2. ``$XDG_CONFIG_HOME/containers/auth.json`` (``~/.config/containers/auth.json``);
3. ``$DOCKER_CONFIG/config.json`` (``~/.docker/config.json``).

Each file is ``{"auths": {KEY: {"auth": base64("user:password")}}}`` (``username`` and
``password`` fields and ``identitytoken`` are read too). A KEY is a registry host
(``127.0.0.1:5000``, ``docker.io``), optionally with a repository namespace
(``quay.io/team``: the longest match wins, as in containers-auth.json(5)), or docker's URL
spellings (``https://index.docker.io/v1/``).

Credential helpers, as docker and podman run them: a file's ``credHelpers`` (``{HOST:
NAME}``) names the helper for one registry, its ``credsStore`` (``NAME``) the helper for all
the others; either is asked before that file's ``auths``. The helper is the program
``docker-credential-NAME`` on ``PATH``: ``get`` reads the server (``HOST``, or
``https://index.docker.io/v1/`` for Docker Hub) on stdin and writes ``{"Username": ...,
"Secret": ...}``; a Username of ``<token>`` makes the Secret an identity token (sent as the
``refresh_token`` of the bearer token request). "credentials not found" (or an empty
answer) means: none here. ``store`` (``{"ServerURL", "Username", "Secret"}`` on stdin) and
``erase`` (the server) are what ``login`` and ``logout`` do when a helper is configured for
the registry. A helper that is missing or fails is an error naming it and the registry.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

from layerfs.errors import InvalidArgument, RegistryError

DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/")
HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
HELPER_PREFIX = "docker-credential-"
TOKEN_USER = "<token>"  # a helper's Username for an identity token
HELPER_TIMEOUT = 60.0


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    identity_token: str | None = None

    def basic(self) -> str:
        """The value of an ``Authorization: Basic`` header."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def login_file() -> str:
    """The auth.json ``login``/``logout`` write (containers' default location)."""
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/containers/{os.getuid()}"
    return os.path.join(runtime, "containers", "auth.json")


def auth_files() -> list[str]:
    """Every file credentials are read from, in order (see the module docstring)."""
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    docker = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    out = [login_file(), os.path.join(config, "containers", "auth.json"), os.path.join(docker, "config.json")]
    return list(dict.fromkeys(out))


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot read credentials from {path}: {e}") from e
    if not isinstance(data, dict):
        raise InvalidArgument(f"cannot read credentials from {path}: not a JSON object")
    return data


def _key_host(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``; ``quay.io/team`` stays."""
    key = re.sub(r"^[a-z]+://", "", key).rstrip("/")
    return key.removesuffix("/v1").removesuffix("/v2")


def _candidates(host: str, repository: str) -> list[str]:
    """Keys to try for ``host``/``repository``, most specific first."""
    hub = host in ("docker.io", "index.docker.io", "registry-1.docker.io")
    hosts = ["docker.io", "index.docker.io", "registry-1.docker.io"] if hub else [host]
    out: list[str] = []
    parts = repository.split("/") if repository else []
    for i in range(len(parts), 0, -1):
        out += [f"{h}/{'/'.join(parts[:i])}" for h in hosts]
    return out + hosts


def _entry(entry: object, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    raw_token = entry.get("identitytoken")
    token = raw_token if isinstance(raw_token, str) and raw_token else None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, password = base64.b64decode(auth).decode().partition(":")
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"credentials for {where}: 'auth' is not base64 of user:password") from e
        if not sep:
            raise InvalidArgument(f"credentials for {where}: 'auth' is not base64 of user:password")
        return Credentials(user, password, token)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str):
        return Credentials(name, secret, token)
    if token:
        return Credentials("<token>", "", token)
    return None


# -- credential helpers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Helper:
    """A credential helper configured for a registry: ``docker-credential-NAME``."""

    name: str
    config: str  # the file that names it
    key: str  # "credHelpers" or "credsStore"

    @property
    def program(self) -> str:
        return HELPER_PREFIX + self.name

    def __str__(self) -> str:
        return f"credential helper {self.program} ({self.key} in {self.config})"


def helper_server(host: str) -> str:
    """What a helper is asked about: docker's name for Docker Hub, else the host."""
    return "https://index.docker.io/v1/" if host in HUB_HOSTS else host


def _helper_in(data: dict[str, Any], host: str, path: str) -> Helper | None:
    per = data.get("credHelpers")
    if isinstance(per, dict):
        hosts = HUB_HOSTS if host in HUB_HOSTS else (host,)
        for key, name in per.items():
            if _key_host(key) in hosts and isinstance(name, str) and name:
                return Helper(name, path, "credHelpers")
    store = data.get("credsStore")
    if isinstance(store, str) and store:
        return Helper(store, path, "credsStore")
    return None


def helper_for(host: str, paths: list[str] | None = None) -> Helper | None:
    """The first helper the auth files (or ``paths``) configure for ``host``."""
    for path in paths if paths is not None else auth_files():
        helper = _helper_in(_read(path), host, path)
        if helper is not None:
            return helper
    return None


def _not_found(message: str) -> bool:
    text = message.lower()
    return "credentials not found" in text or "not in the password store" in text


def run_helper(helper: Helper, action: str, payload: str, host: str) -> str | None:
    """Run ``helper action`` with ``payload`` on stdin; its stdout, or None when it says
    it has no credentials for the server."""
    what = f"{helper} for {host}"
    program = shutil.which(helper.program)
    if program is None:
        raise RegistryError(f"{what}: {helper.program} is not installed (not found on PATH)")
    try:
        proc = subprocess.run([program, action], input=payload.encode(), capture_output=True,
                              timeout=HELPER_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        raise RegistryError(f"{what}: '{action}' did not answer within {HELPER_TIMEOUT:.0f} s") from e
    except OSError as e:
        raise RegistryError(f"{what}: cannot run {program}: {e.strerror or e}") from e
    out = proc.stdout.decode(errors="replace").strip()
    if proc.returncode != 0:
        said = out or proc.stderr.decode(errors="replace").strip()
        if _not_found(said):
            return None
        first = said.splitlines()[0] if said else f"exit status {proc.returncode}"
        raise RegistryError(f"{what}: '{action}' failed: {first}")
    return out


def helper_get(helper: Helper, host: str) -> Credentials | None:
    out = run_helper(helper, "get", helper_server(host), host)
    if not out:
        return None
    try:
        body = json.loads(out)
    except ValueError as e:
        raise RegistryError(f"{helper} for {host}: 'get' answered something that is not JSON") from e
    user = body.get("Username") if isinstance(body, dict) else None
    secret = body.get("Secret") if isinstance(body, dict) else None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise RegistryError(f"{helper} for {host}: 'get' answered without Username and Secret")
    if not user and not secret:
        return None  # some helpers answer "not found" with empty fields
    if user == TOKEN_USER:
        return Credentials(TOKEN_USER, "", secret)
    return Credentials(user, secret)


def lookup(host: str, repository: str = "") -> Credentials | None:
    """The stored credentials for ``host`` (and ``repository``), or None for anonymous."""
    wanted = _candidates(host, repository)
    for path in auth_files():
        data = _read(path)
        helper = _helper_in(data, host, path)
        if helper is not None:
            creds = helper_get(helper, host)
            if creds is not None:
                return creds
        auths = data.get("auths")
        if not isinstance(auths, dict):
            continue
        by_key = {_key_host(k): v for k, v in auths.items()}
        for key in wanted:
            if key in by_key:
                creds = _entry(by_key[key], f"{key} in {path}")
                if creds is not None:
                    return creds
    return None


def _write(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".auth-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent="\t")
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def store_login(host: str, creds: Credentials, path: str | None = None) -> str:
    """Keep ``creds`` for ``host``: through the credential helper configured for it (in
    ``path``, or any auth file when no ``path`` is given), else in the login file
    (``path``). Returns where they went."""
    helper = helper_for(host, [path] if path else None)
    if helper is not None:
        user, secret = creds.username, creds.password
        if creds.identity_token:
            user, secret = TOKEN_USER, creds.identity_token
        payload = json.dumps({"ServerURL": helper_server(host), "Username": user, "Secret": secret})
        run_helper(helper, "store", payload, host)
        return str(helper)
    path = path or login_file()
    data = _read(path)
    auths = data.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise InvalidArgument(f"cannot update {path}: 'auths' is not an object")
    auths[host] = {"auth": base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()}
    _write(path, data)
    return path


def remove_login(host: str, path: str | None = None) -> bool:
    """Remove ``host``'s credentials: erase them from its credential helper (see
    ``store_login``) and its entry from the login file; False when there were none."""
    helper = helper_for(host, [path] if path else None)
    erased = helper is not None and run_helper(helper, "erase", helper_server(host), host) is not None
    path = path or login_file()
    data = _read(path)
    auths = data.get("auths")
    if not isinstance(auths, dict):
        return erased
    keys = [k for k in auths if _key_host(k) == host]
    if not keys:
        return erased
    for k in keys:
        del auths[k]
    _write(path, data)
    return True


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer", lowercased
    params: dict[str, str]


_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> Challenge | None:
    """``Bearer realm="https://auth/token",service="registry",scope="repository:x:pull"``."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)
