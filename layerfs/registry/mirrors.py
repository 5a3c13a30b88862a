"""Where to pull a reference from: its registry, or mirrors configured like containers'
``registries.conf`` (containers-registries.conf(5), version 2).

Read from ``$CONTAINERS_REGISTRIES_CONF`` if set, else ``~/.config/containers/registries.conf``
when not root and present, else ``/etc/containers/registries.conf``; then every
``*.conf`` in the ``registries.conf.d`` beside it (later files override earlier
``[[registry]]`` entries with the same prefix). What is used of it::

    [[registry]]
    prefix = "docker.io"            # optional; defaults to location
    location = "docker.io"          # where the prefix really lives
    insecure = false                # plain HTTP / unverified TLS allowed
    blocked = false                 # pulls refused
    [[registry.mirror]]
    location = "127.0.0.1:5000/hub" # tried first, in order
    insecure = true
    pull-from-mirror = "all"        # or "digest-only", "tag-only"

The longest matching ``prefix`` wins (a host, a host/namespace, or ``*.example.com``,
which matches hosts and keeps them: its ``location`` is ignored). A reference's path below
the prefix is appended to each location.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from typing import Any

from layerfs.errors import InvalidArgument, Unauthorized
from layerfs.image.ref import Reference, canonical_reference

SYSTEM_CONF = "/etc/containers/registries.conf"


@dataclass(frozen=True)
class Endpoint:
    """One place to try: ``host`` and the repository ``path`` there."""

    host: str
    path: str
    insecure: bool = False
    mirror: bool = False

    def __str__(self) -> str:
        return f"{self.host}/{self.path}"


def conf_path() -> str:
    env = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    if env:
        return env
    if os.geteuid() != 0:
        config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        user = os.path.join(config, "containers", "registries.conf")
        if os.path.exists(user):
            return user
    return SYSTEM_CONF


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgument(f"cannot read registries configuration {path}: {e}") from e


def load_registries(path: str | None = None) -> list[dict[str, Any]]:
    """Every ``[[registry]]`` table in force, later files overriding earlier prefixes."""
    path = path or conf_path()
    files = [path]
    dropins = os.path.join(os.path.dirname(path), "registries.conf.d")
    if os.path.isdir(dropins):
        files += [os.path.join(dropins, n) for n in sorted(os.listdir(dropins)) if n.endswith(".conf")]
    by_prefix: dict[str, dict[str, Any]] = {}
    for f in files:
        tables = _load(f).get("registry") or []
        if not isinstance(tables, list):
            raise InvalidArgument(f"{f}: [[registry]] must be an array of tables")
        for t in tables:
            if not isinstance(t, dict):
                continue
            location = str(t.get("location") or "")
            prefix = str(t.get("prefix") or location)
            if not prefix:
                raise InvalidArgument(f"{f}: a [[registry]] has neither prefix nor location")
            by_prefix[prefix] = {**t, "location": location or prefix, "prefix": prefix, "file": f}
    return list(by_prefix.values())


def _matches(prefix: str, repository: str) -> bool:
    if prefix.startswith("*."):
        host = repository.split("/")[0]
        return host.endswith(prefix[1:])
    return repository == prefix or repository.startswith(prefix + "/")


def endpoints(ref: Reference, path: str | None = None) -> list[Endpoint]:
    """Mirrors first, then the registry itself, for the canonical form of ``ref``."""
    canon = canonical_reference(ref)
    assert canon.domain is not None
    repository = f"{canon.domain}/{canon.path}"
    best: dict[str, Any] | None = None
    for t in load_registries(path):
        if _matches(t["prefix"], repository) and (best is None or len(t["prefix"]) > len(best["prefix"])):
            best = t
    if best is None:
        return [Endpoint(canon.domain, canon.path)]
    if best.get("blocked"):
        raise Unauthorized(f"pulls of {repository} are blocked by {best['file']}")
    prefix = best["prefix"]
    # a wildcard matches the host: the repository path follows each mirror's location
    rest = repository.partition("/")[2] if prefix.startswith("*.") else repository[len(prefix):].lstrip("/")
    out: list[Endpoint] = []
    by_digest = canon.digest is not None
    for m in best.get("mirror") or []:
        if not isinstance(m, dict) or not m.get("location"):
            continue
        mode = m.get("pull-from-mirror", "all")
        if (mode == "digest-only" and not by_digest) or (mode == "tag-only" and by_digest):
            continue
        out.append(_endpoint(str(m["location"]), rest, bool(m.get("insecure")), True))
    location = repository.partition("/")[0] if prefix.startswith("*.") else best["location"]
    out.append(_endpoint(location, rest, bool(best.get("insecure")), False))
    return out


def _endpoint(location: str, rest: str, insecure: bool, mirror: bool) -> Endpoint:
    host, _, base = location.partition("/")
    full = "/".join(p for p in (base, rest) if p)
    if host in ("docker.io", "index.docker.io") and "/" not in full:
        full = f"library/{full}"
    return Endpoint(host, full, insecure, mirror)
