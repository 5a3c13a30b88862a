"""Registries: ``pull`` and ``push`` over the OCI distribution API, ``login`` and ``logout``.

- ``client``: one registry over httpx on trio: scheme and TLS (system CAs, certs.d),
  the ``WWW-Authenticate`` flow (basic, bearer tokens), retries with backoff;
- ``auth``: credentials from auth.json / ``~/.docker/config.json``, and the challenge grammar;
- ``pull``: manifest (index -> platform) and config resolved and verified, layer blobs
  downloaded concurrently into resumable, verified staging that the importer unpacks as
  the bytes arrive, one commit at the end (``importer.import_resolved``);
- ``push``: the exporter's blobs, HEAD-checked, mounted across repositories or uploaded,
  the manifest last.

Names: the registry is addressed by ``image.ref.canonical_reference`` (``busybox`` is
``docker.io/library/busybox:latest``); the image is stored under the name as written.
"""

from layerfs.registry.auth import Credentials
from layerfs.registry.client import Options
from layerfs.registry.login import login, logout
from layerfs.registry.pull import PullResult, pull
from layerfs.registry.push import PushResult, push

__all__ = ["Credentials", "Options", "PullResult", "PushResult", "login", "logout", "pull", "push"]
