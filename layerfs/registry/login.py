"""``layerfs login`` / ``logout``: check credentials against a registry, keep them in auth.json."""

from __future__ import annotations

import trio

from layerfs.errors import InvalidArgument
from layerfs.image.ref import DOCKER_HUB
from layerfs.registry.auth import Credentials, helper_for, login_file, remove_login, store_login
from layerfs.registry.client import Options, Registry


def registry_host(value: str) -> str:
    """``https://127.0.0.1:5000/`` -> ``127.0.0.1:5000``; docker's hub spellings -> ``docker.io``."""
    host = value.strip()
    for prefix in ("https://", "http://"):
        host = host.removeprefix(prefix)
    host = host.split("/")[0]
    if not host:
        raise InvalidArgument(f"invalid registry {value!r}")
    if host in ("index.docker.io", "registry-1.docker.io"):
        return DOCKER_HUB
    return host


def login(host: str, creds: Credentials, opts: Options | None = None, authfile: str | None = None) -> str:
    """Check ``creds`` with the registry (``GET /v2/`` through its challenge), then store
    them; returns the auth file written."""
    opts = opts or Options()
    checked = Options(**{**opts.__dict__, "credentials": creds})

    async def check() -> None:
        async with Registry(host, checked, []) as reg:
            await reg.send("GET", "/v2/", f"login to {host}")

    trio.run(check)
    return store_login(host, creds, authfile)


def logout(host: str, authfile: str | None = None) -> tuple[bool, str]:
    """Forget ``host``'s credentials; (whether there were any, where they were kept: the
    credential helper configured for ``host``, else the auth file)."""
    helper = helper_for(host, [authfile] if authfile else None)
    removed = remove_login(host, authfile)
    return removed, str(helper) if helper is not None else authfile or login_file()
