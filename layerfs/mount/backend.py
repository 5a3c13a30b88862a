"""Backend choice: which executor, ``kernel`` or ``fuse``, mounts a ``MountSpec``.

``BACKENDS`` are the choices a caller may ask for (``auto``, ``kernel``, ``fuse``);
``choose_backend`` turns one into the executor to try first, using what ``probe`` found
out about the kernel and the store's filesystem, and the store's layer format
(``layerfs.union.whiteout.LayerFormat``). Trying it, and falling back from the kernel to
FUSE under ``auto``, is the caller's (``layerfs.mounting``).

Who can mount a store of which format (``kernel_problem``, ``fuse_problem``):

- kernel overlayfs reads ``trusted`` layers only with CAP_SYS_ADMIN in the initial user
  namespace (trusted.* xattrs); ``userxattr`` layers with CAP_SYS_ADMIN in any user
  namespace (overlay is mountable in a user namespace since Linux 5.11, and the mount gets
  the ``userxattr`` option: ``for_format``); ``files`` layers never (it shows ``.wh.NAME``
  markers as files);
- the FUSE backend reads every format; it needs /dev/fuse and, unprivileged, a setuid
  ``fusermount3``.
"""

from __future__ import annotations

from layerfs.errors import InvalidArgument, Unsupported
from layerfs.mount.probe import KernelInfo
from layerfs.mount.spec import BIND, OVERLAY, MountSpec
from layerfs.union.whiteout import LayerFormat

BACKENDS = ("auto", "kernel", "fuse")


def for_format(spec: MountSpec, fmt: LayerFormat | None) -> MountSpec:
    """``spec`` as a store of format ``fmt`` must be mounted: an overlay over layers that keep
    ``user.overlay.*`` xattrs gets overlayfs' ``userxattr`` option (layerfs-fuse takes it too),
    and no ``redirect_dir=`` where the format has no redirects (overlayfs refuses
    ``userxattr`` with anything but ``redirect_dir=nofollow``, its implied default)."""
    if fmt is None or spec.type != OVERLAY or not fmt.userxattr:
        return spec
    options = [o for o in spec.options if fmt.redirects or not o.startswith("redirect_dir=")]
    if "userxattr" not in options:
        options.append("userxattr")
    return MountSpec(spec.type, spec.source, tuple(options))


def kernel_problem(fmt: LayerFormat | None, info: KernelInfo) -> str | None:
    """Why kernel overlayfs cannot mount layers of format ``fmt`` here, or None when it can
    (the store's filesystem is ``BackingFS.overlay_problem``'s)."""
    if not info.overlay_available:
        return f"kernel overlayfs is not available here ({info.why.get('overlay_available', '')})"
    if fmt is not None and not fmt.device_whiteouts:
        return ("the store's whiteouts are .wh.NAME files (format 'files', made by an older layerfs "
                "without privileges), which kernel overlayfs would show as plain files")
    if fmt is None or not fmt.userxattr:
        if not info.privileged:
            return (f"the store's layers keep trusted.overlay.* xattrs, which only root in the initial user "
                    f"namespace reads ({info.why.get('privileged', '')})")
        return None
    if not info.can_mount:
        return f"mounting needs CAP_SYS_ADMIN ({info.why.get('can_mount', '')})"
    return None


def fuse_problem(info: KernelInfo) -> str | None:
    """Why the FUSE backend cannot mount here, or None."""
    return None if info.fuse_usable else info.why.get("fuse_usable", "FUSE is not usable")


def choose_backend(backend: str, spec: MountSpec, store_root: str | None = None,
                   fmt: LayerFormat | None = None) -> tuple[str, str | None]:
    """The backend to try first, and (for ``auto`` choosing FUSE) why not the kernel.

    ``auto`` takes kernel overlayfs when the kernel has it, this process may mount the
    store's format with it (``kernel_problem``), the spec fits its 500-layer limit and the
    store's filesystem can hold overlay layers; FUSE otherwise. ``fuse`` serves every union
    over FUSE; a writable bind (a container without image layers) needs no union and is
    always the kernel's. ``fmt`` None is a store of root's format (trusted).
    """
    chosen, why_not_kernel, _ = decide(backend, spec, store_root, fmt)
    return chosen, why_not_kernel


def decide(backend: str, spec: MountSpec, store_root: str | None = None,
           fmt: LayerFormat | None = None) -> tuple[str, str | None, str]:
    """``choose_backend``'s answer, and a sentence saying why that backend (for ``--debug``)."""
    from layerfs.mount.probe import OVL_MAX_STACK, backing_fs, probe

    if backend not in BACKENDS:
        raise InvalidArgument(f"unknown backend {backend!r} (auto, kernel or fuse)")
    if spec.type == BIND and not spec.readonly:
        return "kernel", None, "a writable bind mount needs no union: the kernel's"
    if backend == "fuse":
        return "fuse", None, "--backend fuse"
    info = probe()
    if backend == "kernel" or spec.type == BIND:
        if spec.type == OVERLAY and not info.overlay_available:
            raise Unsupported(f"kernel overlayfs is not available here ({info.why.get('overlay_available', '')})")
        problem = kernel_problem(fmt, info) if spec.type == OVERLAY and fmt is not None else None
        if problem is not None:
            # never mount what the kernel would show wrongly (.wh. markers as files) or refuse
            raise Unsupported(f"kernel overlayfs cannot mount this store's layers here: {problem}; "
                              "use --backend fuse")
        return "kernel", None, "--backend kernel" if backend == "kernel" else "a read-only bind mount: the kernel's"
    why: str | None = None
    if spec.type == OVERLAY:
        why = kernel_problem(fmt, info)
    if why is None and len(spec.lowers) > OVL_MAX_STACK:
        why = f"{len(spec.lowers)} layers exceed its limit of {OVL_MAX_STACK}"
    if why is None and store_root is not None:
        why = backing_fs(store_root).overlay_problem(fmt is None or not fmt.userxattr)
    if why:
        return "fuse", why, f"FUSE, as kernel overlayfs cannot: {why}"
    name = fmt.name if fmt is not None else "trusted"
    who = "root in the initial user namespace" if info.privileged else "CAP_SYS_ADMIN in this user namespace"
    return "kernel", None, f"kernel overlayfs: {who}, store format {name}"


def store_backends(fmt: LayerFormat, store_root: str) -> dict[str, tuple[bool, str]]:
    """For ``layerfs info``: per backend, whether this process can mount a store of format
    ``fmt`` at ``store_root`` with it, and why."""
    from layerfs.mount.probe import backing_fs, probe

    info = probe()
    problem = kernel_problem(fmt, info) or backing_fs(store_root).overlay_problem(not fmt.userxattr)
    if problem is None:
        how = ("with userxattr, CAP_SYS_ADMIN in this user namespace" if fmt.userxattr and not info.privileged
               else "userxattr, as root" if fmt.userxattr else "as root in the initial user namespace")
        kernel = (True, f"kernel overlayfs reads format {fmt.name} ({how})")
    else:
        kernel = (False, problem)
    fuse_why = fuse_problem(info)
    fuse = (True, f"layerfs-fuse reads every format ({info.why.get('fuse_usable', '')})") if fuse_why is None \
        else (False, fuse_why)
    return {"kernel": kernel, "fuse": fuse}
