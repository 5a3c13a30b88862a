"""The kernel backend: execute a ``MountSpec`` with mount syscalls (``layerfs.linux.mountapi``).

Lifecycle: ``mount(spec, target)`` makes the tree live at ``target`` in the caller's mount
namespace; it stays there, whatever happens to this process, until ``unmount(target)``.
Nothing here remembers what it mounted: callers record their targets and unmount them
(``mounts_under`` finds leftovers after a crash). Never shells out to /bin/mount.

Overlay, two ways:

- **new mount API** (kernel >= 6.8, ``probe().lowerdir_plus``): ``fsopen("overlay")``, one
  ``fsconfig(FSCONFIG_SET_STRING, "lowerdir+", path)`` per layer *top first* (each call
  appends the next lower one), ``upperdir``/``workdir``, the other options, then
  ``FSCONFIG_CMD_CREATE``, ``fsmount`` with the mount attributes (``ro``, ``nodev``,
  ``nosuid`` ...) and ``move_mount`` onto the target. There is no page limit, so every
  depth up to the kernel's 500 layers mounts. fsconfig strings are capped at 255 bytes;
  a longer layer path is passed as an O_PATH fd (``FSCONFIG_SET_FD``, kernel >= 6.13,
  under the same key; mountinfo still shows the path).
  ``lowerdir+`` takes a path verbatim (no unescaping), ``upperdir``/``workdir`` unescape.
- **legacy mount(2)** (older kernels, or ``force_legacy=True``): one data string, which the
  kernel cuts at one page (4095 bytes + NUL) and then misreports (a truncated layer path
  gives ENOENT or "overlapping lowerdir path" ELOOP). So the length is checked here first;
  when absolute paths do not fit, the layers are named relative to their longest common
  parent, and mount(2) runs in a helper thread that ``unshare(CLONE_FS)``s and chdirs there:
  the thread gets a private cwd, the caller's cwd is never touched, and unlike a fork()ed
  child nothing can deadlock on a lock another thread held (O_PATH fds named
  ``/proc/self/fd/N`` would cost ~18 bytes a layer, fit only ~220 layers and leave dead
  names in mountinfo). mountinfo then shows the relative paths. If even those do not fit, the mount is refused (Unsupported).

Bind: ``mount(src, target, MS_BIND|MS_REC)`` then, for ``ro`` (and nodev/nosuid/noexec),
a ``MS_REMOUNT|MS_BIND`` with those flags. Caveat: that remount is not recursive, so
submounts of an ``rbind`` stay writable. A failed remount undoes the bind.

Errors name the target and the top lower layer and carry the kernel's own words where it
gives them (the fs context log: ``e overlay: Unknown parameter 'x'``). Overlayfs writes many
reasons (a missing layer, too few lowers) only to the kernel log; the message says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from layerfs.errors import FailedPrecondition, InUse, InvalidArgument, LayerfsError, NotFound, Unsupported
from layerfs.linux.libc import syscall
from layerfs.linux.mountapi import FSCONFIG_MAX_STRING, FsContext, umount2, unshare
from layerfs.linux.mountapi import mount as mount_syscall
from layerfs.linux.mountinfo import mount_table
from layerfs.mount.probe import OVL_MAX_STACK, probe
from layerfs.mount.spec import BIND, OVERLAY, MountSpec, escape_path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_NOSYMFOLLOW = 0x200000

FSMOUNT_CLOEXEC = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
CLONE_FS = 0x200

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# option -> (mount(2) flag, fsmount() attribute): per-mount flags, not filesystem parameters
MOUNT_FLAGS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, MOUNT_ATTR_RDONLY),
    "nosuid": (MS_NOSUID, MOUNT_ATTR_NOSUID),
    "nodev": (MS_NODEV, MOUNT_ATTR_NODEV),
    "noexec": (MS_NOEXEC, MOUNT_ATTR_NOEXEC),
    "noatime": (MS_NOATIME, MOUNT_ATTR_NOATIME),
    "nodiratime": (MS_NODIRATIME, MOUNT_ATTR_NODIRATIME),
    "relatime": (MS_RELATIME, MOUNT_ATTR_RELATIME),
    "strictatime": (MS_STRICTATIME, MOUNT_ATTR_STRICTATIME),
    "nosymfollow": (MS_NOSYMFOLLOW, MOUNT_ATTR_NOSYMFOLLOW),
}
# options that only restate the default
NO_OP_OPTIONS = frozenset({"rw", "suid", "dev", "exec", "defaults", "async"})


def mount(spec: MountSpec, target: str, *, force_legacy: bool = False) -> None:
    """Mount ``spec`` on the existing directory (or, for a bind of a file, file) ``target``.

    ``force_legacy`` uses mount(2) even where the new mount API would serve (for tests and
    for comparing the two). Raises ``NotFound`` (target or a layer missing),
    ``InvalidArgument`` (options the kernel refuses), ``FailedPrecondition`` (EBUSY: an
    upper/work dir in use by another overlay), ``Unsupported`` (no overlay, no privilege,
    too many layers).
    """
    target = os.path.abspath(target)
    if not os.path.lexists(target):
        raise NotFound(f"cannot mount {spec.type} on {target}: the target does not exist")
    if spec.type == OVERLAY:
        _mount_overlay(spec, target, force_legacy)
    elif spec.type == BIND:
        _mount_bind(spec, target)
    elif spec.type.startswith("fuse"):
        raise InvalidArgument(
            f"{spec.type} mounts are run by the FUSE backend (layerfs-fuse), not the kernel one"
        )
    else:
        raise InvalidArgument(f"the kernel backend cannot mount type {spec.type!r} (on {target})")


def unmount(target: str, *, detach: bool = False) -> None:
    """Unmount the topmost mount on ``target`` (never following a final symlink).

    ``detach`` (MNT_DETACH) removes it from the namespace at once and lets the kernel free
    it when the last user (open file, cwd) lets go; without it a busy mount raises
    ``InUse``. Submounts must be unmounted first, or detached with it.
    """
    path = os.path.abspath(target)
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0)
    try:
        umount2(path, flags)
        return
    except OSError as e:
        cause = e
    err = cause.errno or 0
    if err == errno.EINVAL:
        raise FailedPrecondition(f"cannot unmount {path}: it is not a mount point") from cause
    if err == errno.ENOENT:
        raise NotFound(f"cannot unmount {path}: it does not exist") from cause
    if err == errno.EBUSY:
        raise InUse(
            f"cannot unmount {path}: busy (open files, a cwd or submounts inside); "
            "unmount(detach=True) detaches it lazily"
        ) from cause
    raise _generic(err, f"cannot unmount {path}") from cause


def is_mountpoint(path: str) -> bool:
    """Whether something is mounted on ``path`` (after resolving symlinks), per mountinfo."""
    real = os.path.realpath(path)
    return any(entry.mount_point == real for entry in mount_table())


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path``, one per mount, in mountinfo order.

    That order is the order of mounting (parents before children, a mount before the one
    stacked on top of it), so a point appears once per mount stacked on it, and unmounting
    in reverse order always unmounts what is visible.
    """
    real = os.path.realpath(path)
    prefix = real.rstrip("/") + "/"
    return [e.mount_point for e in mount_table() if e.mount_point == real or e.mount_point.startswith(prefix)]


def unmount_all(path: str, *, detach: bool = True) -> list[str]:
    """Unmount every mount at or below ``path``, newest first; returns the points unmounted."""
    done: list[str] = []
    for mount_point in reversed(mounts_under(path)):
        unmount(mount_point, detach=detach)
        done.append(mount_point)
    return done


# --- overlay ----------------------------------------------------------------------------


@dataclass
class OverlayPlan:
    """A spec's options sorted into what each mount call wants them as."""

    lowers: tuple[str, ...]
    upper: str | None
    work: str | None
    ms_flags: int = 0  # mount(2) flags
    attrs: int = 0  # fsmount() MOUNT_ATTR_* flags
    params: list[tuple[str, str | None]] = field(default_factory=list)  # fs parameters

    @property
    def readonly(self) -> bool:
        return bool(self.ms_flags & MS_RDONLY)

    def where(self, target: str) -> str:
        top = self.lowers[0] if self.lowers else "?"
        return f"overlay on {target} ({len(self.lowers)} layers, top {top})"


def plan_overlay(spec: MountSpec) -> OverlayPlan:
    plan = OverlayPlan(spec.lowers, spec.upper, spec.work)
    if not plan.lowers:
        raise InvalidArgument(f"overlay spec without lowerdir: {spec}")
    if (plan.upper is None) != (plan.work is None):
        raise InvalidArgument(f"overlay spec needs both upperdir and workdir or neither: {spec}")
    for option in spec.options:
        key, sep, value = option.partition("=")
        if key in ("lowerdir", "upperdir", "workdir") and sep:
            continue
        if option in MOUNT_FLAGS:
            ms, attr = MOUNT_FLAGS[option]
            plan.ms_flags |= ms
            plan.attrs |= attr
        elif option in NO_OP_OPTIONS:
            continue
        elif key in ("bind", "rbind", "lowerdir+", "upperdir+", "workdir+", "datadir+", "source"):
            raise InvalidArgument(f"option {option!r} does not belong in an overlay spec: {spec}")
        else:
            plan.params.append((key, value if sep else None))
    return plan


def _mount_overlay(spec: MountSpec, target: str, force_legacy: bool) -> None:
    plan = plan_overlay(spec)
    if len(plan.lowers) > OVL_MAX_STACK:
        raise Unsupported(
            f"{len(plan.lowers)} layers exceeds kernel overlayfs' limit of {OVL_MAX_STACK}; use --backend fuse"
        )
    info = probe()
    if not info.overlay_available:
        raise Unsupported(
            f"kernel overlayfs is not available ({info.why['overlay_available']}); use --backend fuse"
        )
    if info.lowerdir_plus and not force_legacy:
        _overlay_new_api(spec, plan, target)
    else:
        _overlay_legacy(spec, plan, target)


def _overlay_new_api(spec: MountSpec, plan: OverlayPlan, target: str) -> None:
    try:
        ctx = FsContext("overlay")
    except OSError as e:
        raise _mount_error(e, spec, plan, target, "fsopen('overlay')", []) from e
    with ctx:
        step = "source"
        try:
            ctx.set_string("source", spec.source)
            for i, lower in enumerate(plan.lowers):
                step = f"lower layer {i + 1} of {len(plan.lowers)} ({lower})"
                _set_layer(ctx, "lowerdir+", lower, verbatim=True)
            if plan.upper is not None and plan.work is not None:
                step = f"upperdir {plan.upper}"
                _set_layer(ctx, "upperdir", plan.upper, verbatim=False)
                step = f"workdir {plan.work}"
                _set_layer(ctx, "workdir", plan.work, verbatim=False)
            if plan.readonly:
                step = "ro"
                ctx.set_flag("ro")  # the superblock too, as mount(2) with MS_RDONLY does
            for key, value in plan.params:
                step = f"option {key}" + (f"={value}" if value is not None else "")
                if value is None:
                    ctx.set_flag(key)
                else:
                    ctx.set_string(key, value)
            step = "creating the overlay (FSCONFIG_CMD_CREATE)"
            ctx.create()
            step = "fsmount"
            mount_fd = syscall("fsmount", ctx.fd, FSMOUNT_CLOEXEC, plan.attrs)
        except OSError as e:
            raise _mount_error(e, spec, plan, target, step, ctx.messages()) from e
    try:
        syscall("move_mount", mount_fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH)
    except OSError as e:
        raise _mount_error(e, spec, plan, target, f"attaching at {target} (move_mount)", []) from e
    finally:
        # before move_mount this fd is the only reference (closing it frees the mount);
        # after, the mount lives in the namespace and the fd merely pinned it
        os.close(mount_fd)


def _set_layer(ctx: FsContext, key: str, path: str, *, verbatim: bool) -> None:
    """One layer parameter; as an O_PATH fd when the string would pass fsconfig's 255 bytes."""
    value = path if verbatim else escape_path(path)
    if len(value.encode()) <= FSCONFIG_MAX_STRING:
        ctx.set_string(key, value)
        return
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # the fd goes under the same key: "lowerdir+", or plain "upperdir"/"workdir"
        # (kernel 6.13+; there is no "upperdir+" despite early versions of the patch)
        ctx.set_fd(key, fd)
    except OSError as e:
        if e.errno == errno.EINVAL:
            e.strerror = f"{e.strerror} (a path over {FSCONFIG_MAX_STRING} bytes needs kernel >= 6.13)"
        raise
    finally:
        os.close(fd)


def legacy_data(plan: OverlayPlan, name: Callable[[str], str] = lambda p: p) -> str:
    """The mount(2) data string of an overlay plan, with each layer path passed through ``name``."""
    options = ["lowerdir=" + ":".join(escape_path(name(p)) for p in plan.lowers)]
    if plan.upper is not None and plan.work is not None:
        options += ["upperdir=" + escape_path(name(plan.upper)), "workdir=" + escape_path(name(plan.work))]
    options += [key if value is None else f"{key}={value}" for key, value in plan.params]
    return ",".join(options)


def _fits(data: str) -> bool:
    return len(data.encode()) + 1 <= PAGE_SIZE


def _overlay_legacy(spec: MountSpec, plan: OverlayPlan, target: str) -> None:
    data = legacy_data(plan)
    base: str | None = None
    if not _fits(data):
        base = os.path.commonpath(plan.lowers)
        relative = legacy_data(plan, lambda p: os.path.relpath(p, base))
        if not _fits(relative):
            raise Unsupported(
                f"cannot mount {plan.where(target)} with mount(2): its options take {len(data.encode())} bytes "
                f"({len(relative.encode())} relative to {base}), one page holds {PAGE_SIZE - 1}, and this kernel "
                "lacks the new mount API's lowerdir+ (6.8); use --backend fuse or a shorter store path"
            )
        data = relative

    def call() -> None:
        mount_syscall(spec.source, target, "overlay", plan.ms_flags, data)

    try:
        if base is None:
            call()
        else:
            in_private_cwd(base, call)
    except OSError as e:
        raise _mount_error(e, spec, plan, target, "mount(2)", []) from e


T = TypeVar("T")


def in_private_cwd(directory: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a helper thread whose cwd is ``directory``; the process' cwd stays.

    The thread calls ``unshare(CLONE_FS)`` first, which gives it its own root/cwd/umask
    (fs_struct); the chdir then changes only the thread's. The thread exits afterwards, so
    the private fs_struct never leaks into other work.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            unshare(CLONE_FS)
            os.chdir(directory)
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread below
            failure.append(e)

    thread = threading.Thread(target=run, name="layerfs-private-cwd")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


# --- bind -------------------------------------------------------------------------------


def _mount_bind(spec: MountSpec, target: str) -> None:
    remount_flags = 0
    for option in spec.options:
        if option in MOUNT_FLAGS:
            remount_flags |= MOUNT_FLAGS[option][0]
        elif option not in NO_OP_OPTIONS and option not in ("bind", "rbind"):
            raise InvalidArgument(f"option {option!r} does not apply to a bind mount of {spec.source}")
    flags = MS_BIND | (MS_REC if spec.recursive else 0)
    where = f"bind mount {spec.source} on {target}"
    try:
        mount_syscall(spec.source, target, None, flags, None)
    except OSError as e:
        raise _errno_error(e.errno or 0, where, [("bind source", spec.source), ("target", target)]) from e
    if not remount_flags:
        return
    # per-mount flags cannot be set by the bind itself; a remount of the new mount sets them
    try:
        mount_syscall(None, target, None, MS_REMOUNT | MS_BIND | remount_flags, None)
    except OSError as e:
        with contextlib.suppress(OSError):
            umount2(target, MNT_DETACH | UMOUNT_NOFOLLOW)  # do not leave it writable
        raise _errno_error(e.errno or 0, f"{where}: remount with {spec.options}", []) from e


# --- errors -----------------------------------------------------------------------------


def _roles(spec: MountSpec, plan: OverlayPlan, target: str) -> list[tuple[str, str]]:
    n = len(plan.lowers)
    roles = [("target", target)] + [(f"lower layer {i + 1} of {n}", p) for i, p in enumerate(plan.lowers)]
    if plan.upper is not None and plan.work is not None:
        roles += [("upperdir", plan.upper), ("workdir", plan.work)]
    return roles


def _mount_error(
    e: OSError, spec: MountSpec, plan: OverlayPlan, target: str, step: str, messages: Sequence[str]
) -> LayerfsError:
    err = e.errno or errno.EIO
    what = f"cannot mount {plan.where(target)}: {step}: {e.strerror}"
    if messages:
        what += "; kernel: " + "; ".join(messages)
    elif err in (errno.EINVAL, errno.ELOOP, errno.EBUSY):
        what += " (overlayfs logs its reason to the kernel log: dmesg | grep overlayfs)"
    return _errno_error(err, what, _roles(spec, plan, target))


def _errno_error(err: int, what: str, roles: Sequence[tuple[str, str]]) -> LayerfsError:
    if err in (errno.ENOENT, errno.ENOTDIR):
        for role, path in roles:
            if not os.path.lexists(path):
                return NotFound(f"{what}: {role} {path} does not exist")
        return NotFound(what) if err == errno.ENOENT else InvalidArgument(what)
    if err == errno.EBUSY:
        return FailedPrecondition(f"{what} (is the upper/work dir in use by another overlay?)")
    if err in (errno.EINVAL, errno.ELOOP, errno.ENAMETOOLONG):
        return InvalidArgument(what)
    if err in (errno.EPERM, errno.EACCES):
        return Unsupported(f"{what} (mounting needs CAP_SYS_ADMIN; without it use --backend fuse)")
    if err == errno.ENODEV:
        return Unsupported(f"{what} (no overlay filesystem in this kernel; use --backend fuse)")
    return _generic(err, what)


def _generic(err: int, what: str) -> LayerfsError:
    error = LayerfsError(what)
    error.errno = err
    return error
