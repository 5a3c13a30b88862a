"""A real registry for tests: Debian's ``docker-registry`` (distribution 2.8) on loopback.

- ``RegistryServer``: the registry with a private config and storage directory under a
  test's tmp dir, on a free 127.0.0.1 port, plain HTTP or TLS (a CA made by ``make_ca``),
  optionally with htpasswd basic auth (``htpasswd -B``) or token auth against ``TokenServer``.
  ``stop()`` kills it by PID (``kill9()`` too, to crash it); ``start()`` again reuses its port
  and storage. The fixtures register ``stop`` as a finalizer.
- ``Proxy``: an HTTP proxy in a thread in front of a registry, with faults on request:
  answer 429/503 some times, corrupt a blob, cut a blob's body after N bytes, throttle;
  it records every request line and Range header.
- ``TokenServer``: a bearer-token endpoint (the realm of the registry's challenge) that
  signs RS256 JWTs with ``openssl`` for a user/password it knows.

Nothing leaves loopback; every process started here is stopped by PID.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REGISTRY_BIN = shutil.which("docker-registry")
needs_registry = pytest.mark.skipif(REGISTRY_BIN is None, reason="docker-registry not installed (scripts/bootstrap)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str | os.PathLike[str], input: bytes | None = None) -> bytes:
    proc = subprocess.run([str(a) for a in args], input=input, capture_output=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed: {proc.stderr.decode()}")
    return proc.stdout


@dataclass
class CA:
    dir: Path
    cert: Path  # the CA certificate (what --cert-dir gets as ca.crt)
    server_cert: Path
    server_key: Path


def make_ca(tmp: Path) -> CA:
    """A CA and a server certificate for 127.0.0.1 / localhost, made with openssl."""
    tmp.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = tmp / "ca.key", tmp / "ca.crt"
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_crt,
         "-days", "2", "-subj", "/CN=layerfs test CA")
    key, csr, crt = tmp / "server.key", tmp / "server.csr", tmp / "server.crt"
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    ext = tmp / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
    _run("openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial", "-out", crt,
         "-days", "2", "-extfile", ext)
    return CA(tmp, ca_crt, crt, key)


def htpasswd_file(path: Path, users: dict[str, str]) -> Path:
    path.write_bytes(b"")
    for user, password in users.items():
        _run("htpasswd", "-B", "-b", path, user, password)
    return path


@dataclass
class RegistryServer:
    workdir: Path
    tls: CA | None = None
    htpasswd: Path | None = None
    token: TokenServer | None = None
    extra_config: list[str] = field(default_factory=list)  # more top-level lines of config.yml
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    def _config(self) -> Path:
        lines = [
            "version: 0.1",
            "log:", "  level: error", "  accesslog:", "    disabled: true",
            "storage:", "  filesystem:", f"    rootdirectory: {self.storage}", "  delete:", "    enabled: true",
            "  maintenance:", "    uploadpurging:", "      enabled: false",
            "http:", f"  addr: 127.0.0.1:{self.port}", f"  secret: layerfs-test-{self.port}",
        ]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self.tls.server_cert}", f"    key: {self.tls.server_key}"]
        if self.htpasswd:
            lines += ["auth:", "  htpasswd:", "    realm: layerfs-test", f"    path: {self.htpasswd}"]
        elif self.token:
            lines += ["auth:", "  token:", f"    realm: {self.token.url}", f"    service: {self.token.service}",
                      f"    issuer: {self.token.issuer}", f"    rootcertbundle: {self.token.cert}"]
        lines += self.extra_config
        path = self.workdir / "config.yml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> RegistryServer:
        assert REGISTRY_BIN is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        log = open(self.workdir / "registry.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self._config())], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 20
        ctx = ssl.create_default_context(cafile=str(self.tls.cert)) if self.tls else None
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"docker-registry exited: {(self.workdir / 'registry.log').read_text()}")
            try:
                urllib.request.urlopen(f"{self.url}/v2/", timeout=2, context=ctx)  # noqa: S310
                break
            except urllib.error.HTTPError:
                break  # 401: it answers
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("docker-registry did not answer within 20 s") from None
                time.sleep(0.05)
        return self

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


# -- a faulty proxy ------------------------------------------------------------------------


@dataclass
class Faults:
    """What the proxy does wrong. Counters count down as faults are served."""

    status: dict[str, list[int]] = field(default_factory=dict)  # path regex -> statuses to answer first
    retry_after: str | None = "0"
    corrupt: set[str] = field(default_factory=set)  # blob digests whose body gets one byte flipped
    cut_after: dict[str, int] = field(default_factory=dict)  # digest -> close after N body bytes (once)
    rate: float | None = None  # bytes per second for blob bodies
    drop: dict[str, int] = field(default_factory=dict)  # path regex -> connections to close unanswered
    manifest: tuple[str, bytes] | None = None  # (content type, body) served for every GET of a manifest
    on_blob_bytes: Callable[[str, int], bool] | None = None  # (digest, sent) -> True: cut the body here


class Proxy:
    """Forwards HTTP to ``upstream`` (host:port, plain HTTP) with ``faults``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults = Faults()
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        f = self.faults
        with self.lock:
            self.requests.append((h.command, h.path, h.headers.get("Range")))
            for pattern, codes in f.status.items():
                if codes and re.search(pattern, h.path):
                    code = codes.pop(0)
                    break
            else:
                code = None
            dropped = False
            for pattern, count in f.drop.items():
                if count and re.search(pattern, h.path):
                    f.drop[pattern] = count - 1
                    dropped = True
                    break
        if dropped:
            h.close_connection = True
            return
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = _read_chunked(h.rfile)
        if f.manifest is not None and h.command == "GET" and "/manifests/" in h.path:
            ctype, data = f.manifest
            h.send_response(200)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        if code is not None:
            h.send_response(code)
            if f.retry_after is not None:
                h.send_header("Retry-After", f.retry_after)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
        headers["Content-Length"] = str(len(body))
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException):
            h.close_connection = True
            return
        m = re.search(r"/blobs/(sha256:[0-9a-f]{64})$", h.path.split("?")[0])
        digest = m.group(1) if m and h.command == "GET" and resp.status in (200, 206) else None
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection"):
                h.send_header(k, v)
        h.end_headers()
        sent = 0
        cut = f.cut_after.pop(digest, None) if digest else None
        try:
            while True:
                chunk = resp.read(16384)
                if not chunk:
                    break
                if digest and digest in f.corrupt and sent == 0:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                if cut is not None and sent + len(chunk) >= cut:
                    h.wfile.write(chunk[: cut - sent])
                    h.wfile.flush()
                    h.close_connection = True
                    return
                h.wfile.write(chunk)
                sent += len(chunk)
                if digest and f.on_blob_bytes and f.on_blob_bytes(digest, sent):
                    h.close_connection = True
                    return
                if digest and f.rate:
                    time.sleep(len(chunk) / f.rate)
        except (OSError, http.client.HTTPException):  # the registry went away mid-body
            h.close_connection = True
        finally:
            conn.close()

    def ranges(self) -> list[str]:
        return [r for _, _, r in self.requests if r]


def _read_chunked(rfile: Any) -> bytes:
    out = b""
    while True:
        size = int(rfile.readline().strip().split(b";")[0], 16)
        if size == 0:
            rfile.readline()
            return out
        out += rfile.read(size)
        rfile.readline()


# -- a bearer token server -----------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The realm of a token-auth registry: ``GET /token?service=&scope=`` with basic auth of
    ``users`` gives a JWT granting the scopes asked for (anonymous gets none)."""

    service = "layerfs-test-registry"
    issuer = "layerfs-test-issuer"

    def __init__(self, workdir: Path, users: dict[str, str], refresh_tokens: dict[str, str] | None = None) -> None:
        """``refresh_tokens``: identity token -> user, for ``POST`` with ``grant_type=refresh_token``."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = workdir / "token.key", workdir / "token.crt"
        _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key, "-out", self.cert,
             "-days", "2", "-subj", "/CN=layerfs token signer")
        der = _run("openssl", "x509", "-in", self.cert, "-outform", "DER")
        self.x5c = base64.b64encode(der).decode()
        self.users = users
        self.refresh_tokens = refresh_tokens or {}
        self.requests: list[dict[str, Any]] = []
        token = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                token._serve(self)

            def do_POST(self) -> None:  # noqa: N802
                token._serve(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        from urllib.parse import parse_qs, urlparse

        query = parse_qs(urlparse(h.path).query)
        user = None
        auth = h.headers.get("Authorization", "")
        if h.command == "POST":  # the OAuth2 form: an identity token as refresh_token
            form = parse_qs(h.rfile.read(int(h.headers.get("Content-Length") or 0)).decode())
            user = self.refresh_tokens.get((form.get("refresh_token") or [""])[0])
            if form.get("grant_type") != ["refresh_token"] or user is None:
                h.send_response(401)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            query = {"scope": " ".join(form.get("scope", [])).split(), "service": form.get("service", [])}
        elif auth.startswith("Basic "):
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(name) != password:
                h.send_response(401)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            user = name
        scopes = query.get("scope", [])
        self.requests.append({"user": user, "scopes": scopes, "service": query.get("service"), "method": h.command})
        access = []
        for scope in scopes if user else []:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self.x5c]}
        claims = {"iss": self.issuer, "sub": user or "", "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": f"{now}-{len(self.requests)}", "access": access}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = _run("openssl", "dgst", "-sha256", "-sign", self.key, input=signing_input.encode())
        body = json.dumps({"token": f"{signing_input}.{_b64(sig)}", "expires_in": 300}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
