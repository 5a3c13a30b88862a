"""Backend choice: which executor, ``kernel`` or ``fuse``, mounts a ``MountSpec``.

``BACKENDS`` are the choices a caller may ask for (``auto``, ``kernel``, ``fuse``);
``choose_backend`` turns one into the executor to try first, using what ``probe`` found
out about the kernel and the store's filesystem. Trying it, and falling back from the
kernel to FUSE under ``auto``, is the caller's (``layerfs.mounting``).
"""

from __future__ import annotations

from layerfs.errors import InvalidArgument, Unsupported
from layerfs.mount.spec import BIND, OVERLAY, MountSpec

BACKENDS = ("auto", "kernel", "fuse")


def choose_backend(backend: str, spec: MountSpec, store_root: str | None = None) -> tuple[str, str | None]:
    """The backend to try first, and (for ``auto`` choosing FUSE) why not the kernel.

    ``auto`` takes kernel overlayfs when the kernel has it, the spec fits its 500-layer
    limit and the store's filesystem can hold overlay layers; FUSE otherwise. ``fuse`` serves
    every union over FUSE; a writable bind (a container without image layers) needs no
    union and is always the kernel's.
    """
    from layerfs.mount.probe import OVL_MAX_STACK, backing_fs, probe

    if backend not in BACKENDS:
        raise InvalidArgument(f"unknown backend {backend!r} (auto, kernel or fuse)")
    if spec.type == BIND and not spec.readonly:
        return "kernel", None
    if backend == "fuse":
        return "fuse", None
    info = probe()
    if backend == "kernel" or spec.type == BIND:
        if spec.type == OVERLAY and not info.overlay_available:
            raise Unsupported(f"kernel overlayfs is not available here ({info.why.get('overlay_available', '')})")
        return "kernel", None
    why: str | None = None
    if spec.type == OVERLAY and not info.overlay_available:
        why = f"not available here ({info.why.get('overlay_available', '')})"
    elif len(spec.lowers) > OVL_MAX_STACK:
        why = f"{len(spec.lowers)} layers exceed its limit of {OVL_MAX_STACK}"
    elif store_root is not None:
        why = backing_fs(store_root).overlay_problem(info.privileged)
    return ("fuse", why) if why else ("kernel", None)
