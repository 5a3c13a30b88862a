"""The one error hierarchy of layerfs.

Every error carries three translations, so each edge can report it in its own terms:

- ``errno``: what the FUSE backend answers (``FUSEError(errno)``);
- ``grpc_code``: the name of the gRPC status code the snapshotter service sends
  (containerd's errdefs map NotFound, AlreadyExists, FailedPrecondition and
  InvalidArgument back to its own error kinds);
- ``exit_code``: what the CLI exits with (1 for a failure, 2 for a usage error).

Messages name the object that was wrong (key, digest, path, tar entry). Raise with
``from`` the underlying cause so tracebacks keep it.
"""

from __future__ import annotations

import errno as _errno


class LayerfsError(Exception):
    """Base of every error layerfs raises on purpose."""

    errno: int = _errno.EIO
    grpc_code: str = "UNKNOWN"
    exit_code: int = 1


class NotFound(LayerfsError):
    """A snapshot, image, blob, layer or path that does not exist."""

    errno = _errno.ENOENT
    grpc_code = "NOT_FOUND"


class AlreadyExists(LayerfsError):
    """A key or name that is already taken."""

    errno = _errno.EEXIST
    grpc_code = "ALREADY_EXISTS"


class FailedPrecondition(LayerfsError):
    """The object exists but is in the wrong state (in use, not committed, has children)."""

    errno = _errno.EBUSY
    grpc_code = "FAILED_PRECONDITION"


class InUse(FailedPrecondition):
    """A layer or image still needed by a mount, a container or another image."""


class InvalidArgument(LayerfsError):
    """Input that is malformed: a bad reference, digest, option or filter."""

    errno = _errno.EINVAL
    grpc_code = "INVALID_ARGUMENT"
    exit_code = 2


class UsageError(InvalidArgument):
    """A command line that cannot be acted on."""


class DigestMismatch(LayerfsError):
    """Content whose size or digest differs from what its descriptor promised."""

    errno = _errno.EIO
    grpc_code = "DATA_LOSS"


class InvalidImage(LayerfsError):
    """An image archive or layout that is malformed (missing files, bad JSON, bad media type)."""

    errno = _errno.EINVAL
    grpc_code = "INVALID_ARGUMENT"


class UnsafeArchive(LayerfsError):
    """A layer tar entry that would escape the layer root or is otherwise hostile or corrupt.

    ``entry`` is the tar member name as it appeared in the archive (or ``None`` when the
    archive itself is unreadable).
    """

    errno = _errno.EPERM
    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, message: str, entry: str | None = None) -> None:
        super().__init__(message)
        self.entry = entry


class LimitExceeded(UnsafeArchive):
    """Decompressed size or compression ratio past the configured bounds (a bomb)."""

    errno = _errno.EFBIG
    grpc_code = "RESOURCE_EXHAUSTED"


class StoreError(LayerfsError):
    """The store on disk is inconsistent or cannot be opened."""

    grpc_code = "INTERNAL"


class Unsupported(LayerfsError):
    """Something this machine or kernel cannot do (and a hint what to use instead)."""

    errno = _errno.ENOTSUP
    grpc_code = "UNIMPLEMENTED"


class RegistryError(LayerfsError):
    """A registry that refused or failed a request (after retries), or cannot be reached."""

    errno = _errno.EIO
    grpc_code = "UNAVAILABLE"


class Unauthorized(RegistryError):
    """A registry that wants credentials layerfs does not have, or refused the ones it sent."""

    errno = _errno.EACCES
    grpc_code = "PERMISSION_DENIED"
