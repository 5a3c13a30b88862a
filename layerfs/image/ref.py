"""Image references: the docker reference grammar, and the names layerfs gives images.

A reference is ``[host[:port]/]path[:tag][@sha256:<hex>]`` as in distribution/reference:

- ``path`` is one or more ``/``-separated components of lowercase letters and digits,
  joined by ``.``, ``_``, ``__`` or runs of ``-``;
- the first component is a registry host when it contains ``.``, ``:`` or an uppercase
  letter, or is ``localhost`` (``[::1]:5000`` IPv6 hosts too), as docker decides it;
- ``tag`` is ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``; ``latest`` is appended when a reference
  has neither tag nor digest;
- only ``sha256`` digests are accepted (the only algorithm the store knows).

Names are kept as the user wrote them: no ``docker.io/library/`` is prefixed, so
``busybox`` becomes ``busybox:latest`` (podman's short names, not docker's normal form).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from layerfs.digest import Digest
from layerfs.errors import InvalidArgument

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_NAME_MAX = 255
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class Reference:
    """A parsed reference; ``str()`` gives the normalized form."""

    domain: str | None
    path: str
    tag: str | None
    digest: Digest | None

    @property
    def repository(self) -> str:
        """The name without tag or digest (``localhost:5000/a/b``)."""
        return f"{self.domain}/{self.path}" if self.domain else self.path

    def __str__(self) -> str:
        out = self.repository
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def split_tag(ref: str) -> tuple[str, str | None]:
    """``name[:tag][@digest]`` -> (name, tag or None), without validating either.

    The tag is after the last ``:`` unless that ``:`` belongs to a host's port
    (``localhost:5000/app`` has no tag); a digest is dropped.
    """
    rest = ref.partition("@")[0]
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        return rest[:colon], rest[colon + 1 :]
    return rest, None


def parse_ref(ref: str) -> Reference:
    """Parse a reference, appending ``:latest`` when it has neither tag nor digest."""
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("invalid reference: empty")
    rest, at, digest_part = ref.partition("@")
    digest: Digest | None = None
    if at:
        try:
            digest = Digest.parse(digest_part)
        except InvalidArgument as e:
            raise InvalidArgument(f"invalid reference {ref!r}: {e}") from e
    name, tag = split_tag(rest)
    if tag is not None and not _TAG.fullmatch(tag):
        raise InvalidArgument(
            f"invalid reference {ref!r}: bad tag {tag!r} (letters, digits, '_', '.', '-'; at most 128)"
        )
    if not name:
        raise InvalidArgument(f"invalid reference {ref!r}: empty repository name")
    if len(name) > _NAME_MAX:
        raise InvalidArgument(f"invalid reference {ref!r}: repository name longer than {_NAME_MAX}")
    domain: str | None = None
    first, slash, remainder = name.partition("/")
    # docker's splitDomain: a first component with '.', ':', an uppercase letter, or
    # "localhost" names a registry; anything else is part of the repository path.
    if slash and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        if not _HOST.fullmatch(first):
            raise InvalidArgument(f"invalid reference {ref!r}: bad registry host {first!r}")
        domain, name = first, remainder
    for component in name.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            hint = " (repository names must be lowercase)" if component.lower() != component else ""
            raise InvalidArgument(
                f"invalid reference {ref!r}: bad repository path component {component!r}{hint}"
            )
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain, name, tag, digest)


def normalize_ref(ref: str) -> str:
    """Validate ``ref`` and return it with ``:latest`` appended when it has no tag or digest.

    Raises ``InvalidArgument`` with the reason when ``ref`` is not a reference.
    """
    return str(parse_ref(ref))


DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")


def canonical_reference(ref: str | Reference) -> Reference:
    """docker's normal form of a reference: the registry always named, Docker Hub's
    official images under ``library/`` (``busybox`` -> ``docker.io/library/busybox:latest``,
    ``demo/x:1`` -> ``docker.io/demo/x:1``, ``index.docker.io/x`` -> ``docker.io/library/x:latest``);
    references naming another registry are returned as ``parse_ref`` gives them."""
    r = parse_ref(ref) if isinstance(ref, str) else ref
    domain = r.domain or DOCKER_HUB
    path = r.path
    if domain.lower() in _DOCKER_HUB_ALIASES:
        domain = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    return Reference(domain, path, r.tag, r.digest)


def canonical_ref(ref: str) -> str:
    """``canonical_reference`` as a string: the name docker (and a registry) knows an image by.

    ``normalize_ref`` keeps names as written; this is for comparing names across spellings
    and for talking to registries."""
    return str(canonical_reference(ref))


def is_tag(value: str) -> bool:
    """True for a bare tag (``latest``, ``1.36``) as skopeo and umoci write it into a layout."""
    return bool(_TAG.fullmatch(value))


def repo_name_from_path(path: str) -> str:
    """A repository name made from an archive or layout path: ``/x/busybox-oci.tar`` -> ``busybox-oci``.

    The basename is kept when it is already a valid repository name (lowercased);
    otherwise every run of other characters becomes ``-``, so ``My Image.oci`` gives
    ``my-image-oci``. An empty result becomes ``image``.
    """
    base = posixpath.basename(path.rstrip("/")) or "image"
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    base = base.lower()
    if _PATH_COMPONENT.fullmatch(base):
        return base
    return re.sub(r"[^a-z0-9]+", "-", base).strip("-") or "image"
