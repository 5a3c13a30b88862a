"""One registry, spoken to over the distribution API (``/v2/``) with httpx on trio.

- Transport: HTTPS verified with the system CA store (``ssl.create_default_context``, not
  certifi), plus the CAs and client certificates of a certs.d directory (``--cert-dir``, else
  ``/etc/containers/certs.d/HOST`` and ``/etc/docker/certs.d/HOST``: ``*.crt`` are CAs,
  ``NAME.cert`` + ``NAME.key`` a client certificate). Plain HTTP only for a loopback host
  (``localhost``, ``127.0.0.0/8``, ``::1``) or with ``tls_verify=False``, and then only when
  HTTPS does not answer; ``tls_verify=False`` also accepts any certificate.
- Auth: anonymous first; on a 401 the ``WWW-Authenticate`` challenge decides: ``Basic``
  sends the stored credentials, ``Bearer`` fetches a token from the realm (with the
  credentials, if any, as basic auth) for every scope this client needs at once.
- Retries: a 429 or 5xx answer and a dropped connection are retried with exponential
  backoff (``Retry-After`` honoured), ``retries`` times.

Errors leave this module as one-line ``LayerfsError``s naming the request's purpose.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import httpx
import trio

from layerfs.errors import LayerfsError, NotFound, RegistryError, Unauthorized
from layerfs.registry.auth import Challenge, Credentials, lookup, parse_challenge

DOCKER_HUB_API = "registry-1.docker.io"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
CERTS_D = ("/etc/containers/certs.d", "/etc/docker/certs.d")


@dataclass
class Options:
    """How to reach registries; the CLI fills it from its flags."""

    tls_verify: bool = True
    cert_dir: str | None = None
    credentials: Credentials | None = None  # explicit --creds; else the auth files
    retries: int = 5
    backoff: float = 0.5  # seconds before the first retry; doubles each time (max 10 s)
    concurrency: int = 3  # blobs moved at once
    timeout: float = 60.0
    chunk_size: int | None = None  # push: PATCH chunks of this size instead of one PUT
    push_foreign: bool = False  # push: upload foreign (non-distributable) layers too


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _api_host(host: str) -> str:
    return DOCKER_HUB_API if host == "docker.io" else host


def ssl_context(host: str, opts: Options) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if not opts.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    dirs = [opts.cert_dir] if opts.cert_dir else [os.path.join(d, host) for d in CERTS_D]
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if name.endswith(".crt"):
                ctx.load_verify_locations(cafile=path)
            elif name.endswith(".cert"):
                key = path[: -len(".cert")] + ".key"
                if not os.path.exists(key):
                    raise RegistryError(f"client certificate {path} has no key {key}")
                ctx.load_cert_chain(path, key)
    return ctx


def registry_message(resp: httpx.Response) -> str:
    """The registry's own words for a failure: ``CODE: message`` of its ``errors`` list."""
    try:
        body = json.loads(resp.content[:65536] or b"{}")
    except (ValueError, httpx.ResponseNotRead):
        return ""
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return ""
    parts = []
    for e in errors[:3]:
        if isinstance(e, dict):
            parts.append(": ".join(str(x) for x in (e.get("code"), e.get("message")) if x))
    return "; ".join(p for p in parts if p)


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, min(float(value), 60.0))
    except ValueError:
        return None


Body = Callable[[], bytes | AsyncIterator[bytes] | None]


@dataclass
class Registry:
    """A client for one registry host (``127.0.0.1:5000``, ``docker.io``) and the
    repositories one operation needs (``scopes``: ``repository:NAME:pull,push``)."""

    host: str
    opts: Options
    scopes: list[str] = field(default_factory=list)
    base: str | None = None  # "https://host" once a scheme answered
    _client: httpx.AsyncClient | None = None
    _authorization: str | None = None
    _challenge: Challenge | None = None
    _stored: Credentials | None = None
    _looked_up: bool = False

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "use `async with Registry(...)`"
        return self._client

    async def __aenter__(self) -> Registry:
        verify = ssl_context(self.host, self.opts)
        timeout = httpx.Timeout(self.opts.timeout, connect=min(self.opts.timeout, 15.0))
        self._client = httpx.AsyncClient(verify=verify, timeout=timeout, trust_env=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def credentials(self) -> Credentials | None:
        if self.opts.credentials is not None:
            return self.opts.credentials
        if not self._looked_up:  # once: a credential helper is a program to run
            repo = self.scopes[0].split(":")[1] if self.scopes else ""
            self._stored = lookup(self.host, repo)
            self._looked_up = True
        return self._stored

    # -- reaching it ---------------------------------------------------------------------
    async def _pick_scheme(self) -> str:
        if self.base is not None:
            return self.base
        host = _api_host(self.host)
        schemes = ["https"]
        if is_loopback(self.host) or not self.opts.tls_verify:
            schemes.append("http")
        first_error: Exception | None = None
        for i, scheme in enumerate(schemes):
            last = i == len(schemes) - 1
            url = f"{scheme}://{host}/v2/"
            for attempt in range(self.opts.retries + 1):
                try:
                    resp = await self.client.get(url)
                except httpx.TransportError as e:
                    first_error = first_error or e
                    if not last or attempt == self.opts.retries:
                        break  # not a TLS server, or a bad certificate: the next scheme, or fail
                    await trio.sleep(self._delay(attempt, None))
                    continue
                if resp.status_code in RETRY_STATUS and attempt < self.opts.retries:
                    await trio.sleep(self._delay(attempt, _retry_after(resp)))
                    continue
                if scheme == "http" and resp.status_code == 400 and first_error is not None:
                    break  # an HTTPS server refusing plain HTTP: report the TLS error
                self.base = f"{scheme}://{host}"
                return self.base
        hint = "" if "http" in schemes else " (plain HTTP only for localhost or with --tls-verify=false)"
        raise RegistryError(f"cannot reach registry {self.host}: {_describe(first_error)}{hint}")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return float(min(self.opts.backoff * (2**attempt), 10.0))

    def url(self, path: str) -> str:
        assert self.base is not None
        return urljoin(self.base + "/", path.lstrip("/")) if not path.startswith("http") else path

    # -- auth ----------------------------------------------------------------------------
    async def _authenticate(self, header: str, what: str) -> None:
        challenge = parse_challenge(header)
        creds = self.credentials()
        if challenge is None or challenge.scheme not in ("basic", "bearer"):
            raise Unauthorized(f"{what}: {self.host} asks for unsupported authentication {header!r}")
        self._challenge = challenge
        if challenge.scheme == "basic":
            if creds is None:
                raise Unauthorized(f"{what}: {self.host} requires a login (layerfs login {self.host})")
            self._authorization = creds.basic()
            return
        realm = challenge.params.get("realm")
        if not realm:
            raise Unauthorized(f"{what}: {self.host}'s bearer challenge names no realm")
        params: list[tuple[str, str | int | float | bool | None]] = []
        if challenge.params.get("service"):
            params.append(("service", challenge.params["service"]))
        scopes = list(self.scopes)
        if challenge.params.get("scope") and challenge.params["scope"] not in scopes:
            scopes.append(challenge.params["scope"])
        params += [("scope", s) for s in scopes]
        headers = {"Authorization": creds.basic()} if creds is not None and not creds.identity_token else {}
        try:
            if creds is not None and creds.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "service": challenge.params.get("service", ""), "scope": " ".join(scopes),
                        "client_id": "layerfs"}
                resp = await self.client.post(realm, data=form)
            else:
                resp = await self.client.get(realm, params=params, headers=headers)
        except httpx.TransportError as e:
            raise RegistryError(f"{what}: cannot reach the token server {realm}: {_describe(e)}") from e
        if resp.status_code in (401, 403):
            who = f"as {creds.username}" if creds else "anonymously"
            raise Unauthorized(f"{what}: the token server {realm} refused a token {who} ({resp.status_code})")
        if resp.status_code != 200:
            raise RegistryError(f"{what}: the token server {realm} answered {resp.status_code}")
        try:
            body = resp.json()
        except ValueError as e:
            raise RegistryError(f"{what}: the token server {realm} sent no JSON") from e
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{what}: the token server {realm} sent no token")
        self._authorization = f"Bearer {token}"

    # -- requests ------------------------------------------------------------------------
    async def send(
        self,
        method: str,
        path: str,
        what: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: Body | None = None,
        params: Mapping[str, str] | None = None,
        stream: bool = False,
        ok: frozenset[int] = frozenset({200}),
        follow: bool = False,
    ) -> httpx.Response:
        """Send one request with auth and retries; a status outside ``ok`` raises.

        ``body`` is called afresh for every attempt. With ``stream`` the response body is
        not read: the caller reads and closes it."""
        await self._pick_scheme()
        authed = False
        attempt = 0
        while True:
            hdrs = dict(headers or {})
            if self._authorization:
                hdrs["Authorization"] = self._authorization
            content = body() if body is not None else None
            req = self.client.build_request(method, self.url(path), headers=hdrs, params=params, content=content)
            try:
                resp = await self.client.send(req, stream=True, follow_redirects=follow)
            except httpx.TransportError as e:
                if attempt >= self.opts.retries:
                    raise RegistryError(f"{what}: {self.host}: {_describe(e)} (after {attempt + 1} attempts)") from e
                await trio.sleep(self._delay(attempt, None))
                attempt += 1
                continue
            if resp.status_code == 401 and not authed and "www-authenticate" in resp.headers:
                await resp.aclose()
                await self._authenticate(resp.headers["www-authenticate"], what)
                authed = True
                continue
            if resp.status_code in RETRY_STATUS and attempt < self.opts.retries and resp.status_code not in ok:
                delay = self._delay(attempt, _retry_after(resp))
                await resp.aclose()
                await trio.sleep(delay)
                attempt += 1
                continue
            if resp.status_code not in ok:
                await resp.aread()
                await resp.aclose()
                raise self.error(resp, what)
            if not stream:
                await resp.aread()
                await resp.aclose()
            return resp

    def error(self, resp: httpx.Response, what: str) -> Exception:
        said = registry_message(resp)
        detail = f" ({said})" if said else ""
        code = resp.status_code
        if code == 404:
            return NotFound(f"{what}: not found on {self.host}{detail}")
        if code in (401, 403):
            creds = self.credentials()
            hint = f" as {creds.username}" if creds else f"; log in with: layerfs login {self.host}"
            return Unauthorized(f"{what}: {self.host} denied access ({code}){detail}{hint}")
        if code == 429:
            return RegistryError(f"{what}: {self.host} says too many requests (429) after "
                                 f"{self.opts.retries + 1} attempts{detail}")
        return RegistryError(f"{what}: {self.host} answered {code} {resp.reason_phrase}{detail}")

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, what: str, **kw: Any) -> AsyncIterator[httpx.Response]:
        resp = await self.send(method, path, what, stream=True, **kw)
        try:
            yield resp
        finally:
            await resp.aclose()


def _describe(e: BaseException | None) -> str:
    """One line for a transport error: httpx wraps the reason (an ``ssl.SSLError``, a
    refused connection) in its cause, often with no text of its own."""
    if e is None:
        return "no answer"
    seen = e
    text = str(e)
    cause = e.__cause__ or e.__context__
    depth = 0
    while cause is not None and depth < 8:
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {getattr(cause, 'verify_message', None) or cause.reason or cause}"
        text = text or str(cause)
        seen, cause, depth = cause, cause.__cause__ or cause.__context__, depth + 1
    text = text or type(seen).__name__
    return text.splitlines()[0]


def first_error(e: BaseException) -> BaseException:
    """The error to report from what a trio nursery raised: the first ``LayerfsError`` in
    a (nested) exception group, else its first exception; anything else as it is."""
    if not isinstance(e, BaseExceptionGroup):
        return e
    leaves = [first_error(x) for x in e.exceptions]
    return next((x for x in leaves if isinstance(x, LayerfsError)), leaves[0])
