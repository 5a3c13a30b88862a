"""What this kernel and a store's filesystem let the kernel overlay backend do.

``probe()`` runs once per process (``functools.cache``; tests call ``probe.cache_clear()``)
and answers with a ``KernelInfo``; ``backing_fs(path)`` checks one store directory and
answers with a ``BackingFS``. Both carry ``why``: one sentence per field saying how it was
decided, for error messages ("kernel overlay unusable: ...").

The probes act rather than guess from version numbers wherever acting is cheap: they open
an overlay fs context and feed it a ``lowerdir+`` to see whether the kernel takes it, they
list a directory with getdents64 to see real d_type values, they set the very xattrs
overlayfs would set. None of them mounts anything.

The Linux primitives it acts with (libc, syscall numbers, fs contexts, mountinfo,
getdents64) live in ``layerfs.linux``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

from layerfs.linux.files import getdents
from layerfs.linux.fusedev import FUSERMOUNT
from layerfs.linux.mountapi import FsContext
from layerfs.linux.mountinfo import MountEntry, mount_table
from layerfs.linux.proc import in_initial_userns

OVL_MAX_STACK = 500  # fs/overlayfs/params.h: the most lower layers one overlay may have
CAP_SYS_ADMIN = 21

# --- the kernel -------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelInfo:
    """What the running kernel offers the overlay backend. ``why[field]`` says how we know."""

    kernel_release: str
    overlay_available: bool
    privileged: bool
    userns_overlay: bool
    needs_userxattr: bool
    lowerdir_plus: bool
    layers_via_fd: bool
    redirect_dir: bool
    max_layers: int = OVL_MAX_STACK
    # CAP_SYS_ADMIN in this process's own user namespace: enough for an overlay with
    # ``userxattr`` in a user namespace (kernel >= 5.11), not for trusted.* xattrs
    can_mount: bool = False
    # FUSE mounts: /dev/fuse readable and writable, and (not as root) a setuid fusermount3
    fuse_usable: bool = False
    why: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def explain(self) -> str:
        """Every field with its reason, one per line (for ``layerfs info`` and bug reports)."""
        return "\n".join(f"{k}: {getattr(self, k)} ({v})" for k, v in self.why.items())


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of a release string like ``6.18.44-fc-v509``."""
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _filesystems() -> set[str]:
    with open("/proc/filesystems", encoding="ascii") as f:
        return {line.split()[-1] for line in f if line.strip()}


def _effective_caps() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


@functools.cache
def probe() -> KernelInfo:
    """Probe the kernel once per process. Never raises for a missing feature: it says False."""
    why: dict[str, str] = {}
    release = os.uname().release
    version = kernel_version(release)
    why["kernel_release"] = "os.uname()"

    available = "overlay" in _filesystems()
    if available:
        why["overlay_available"] = "overlay is listed in /proc/filesystems"
    else:
        # fsopen() resolves the type with get_fs_type(), which loads the module on demand
        try:
            FsContext("overlay").close()
            available = True
            why["overlay_available"] = "fsopen('overlay') loaded the overlay module"
        except OSError as e:
            why["overlay_available"] = (
                f"overlay is not in /proc/filesystems and fsopen('overlay') failed: {e.strerror}"
            )

    in_init_ns = in_initial_userns()
    has_admin = bool(_effective_caps() >> CAP_SYS_ADMIN & 1)
    privileged = os.geteuid() == 0 and has_admin and in_init_ns
    why["privileged"] = (
        f"euid {os.geteuid()}, CAP_SYS_ADMIN {'present' if has_admin else 'absent'}, "
        f"{'initial' if in_init_ns else 'a child'} user namespace"
        + ("" if in_init_ns else " (trusted.* xattrs and 0/0 whiteouts need the initial one)")
    )
    can_mount = has_admin and (in_init_ns or version >= (5, 11))
    why["can_mount"] = (
        f"CAP_SYS_ADMIN {'present' if has_admin else 'absent'} in "
        f"{'the initial' if in_init_ns else 'this'} user namespace"
        + ("" if has_admin else " (mount overlays as root, or inside unshare --user --map-root-user --mount)")
    )
    fuse_usable, why["fuse_usable"] = _probe_fuse(os.geteuid() == 0)
    userns = version >= (5, 11)
    why["userns_overlay"] = (
        f"kernel {version[0]}.{version[1]} {'>=' if userns else '<'} 5.11 (FS_USERNS_MOUNT for overlay)"
    )
    why["needs_userxattr"] = (
        "not privileged: overlay keeps its xattrs in user.overlay.*"
        if not privileged
        else "privileged: overlay uses trusted.overlay.*"
    )

    lowerdir_plus, layers_via_fd = False, False
    if available:
        lowerdir_plus, layers_via_fd, why["lowerdir_plus"], why["layers_via_fd"] = _probe_lowerdir_plus()
    else:
        why["lowerdir_plus"] = why["layers_via_fd"] = "overlay not available"

    redirect = os.path.exists("/sys/module/overlay/parameters/redirect_dir")
    if redirect:
        why["redirect_dir"] = "/sys/module/overlay/parameters/redirect_dir exists"
    elif available:
        redirect, why["redirect_dir"] = _probe_parameter("redirect_dir", "on")
    else:
        why["redirect_dir"] = "overlay not available"
    why["max_layers"] = "OVL_MAX_STACK in fs/overlayfs"

    return KernelInfo(
        kernel_release=release,
        overlay_available=available,
        privileged=privileged,
        userns_overlay=userns,
        needs_userxattr=not privileged,
        lowerdir_plus=lowerdir_plus,
        layers_via_fd=layers_via_fd,
        redirect_dir=redirect,
        can_mount=can_mount,
        fuse_usable=fuse_usable,
        why=why,
    )


def _probe_fuse(root: bool) -> tuple[bool, str]:
    """Whether this process can serve a FUSE mount: /dev/fuse open for read and write, and
    unless root a setuid-root ``fusermount3`` to mount it."""
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse does not exist"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        mode = oct(os.stat("/dev/fuse").st_mode & 0o777)
        return False, f"/dev/fuse (mode {mode}) is not readable and writable by uid {os.getuid()}"
    if root:
        return True, "/dev/fuse is readable and writable; root mounts it itself"
    for prog in FUSERMOUNT:
        try:
            st = os.stat(prog)
        except OSError:
            continue
        if st.st_uid == 0 and st.st_mode & 0o4000:
            return True, f"/dev/fuse is readable and writable; {prog} is setuid root"
        return False, f"{prog} is not setuid root, so an unprivileged user cannot mount FUSE"
    return False, "fusermount3 is not installed (Debian package fuse3)"


def _probe_lowerdir_plus() -> tuple[bool, bool, str, str]:
    """Feed ``lowerdir+`` (as a string, then as an O_PATH fd) to an overlay context."""
    tmp = tempfile.mkdtemp(prefix="layerfs-probe-")
    try:
        with FsContext("overlay") as ctx:
            try:
                ctx.set_string("lowerdir+", tmp)
            except OSError as e:
                reason = (
                    "fsconfig(lowerdir+) refused: EINVAL (kernel < 6.8)"
                    if e.errno == errno.EINVAL
                    else f"fsconfig(lowerdir+) failed: {e.strerror}"
                )
                return False, False, reason, "no lowerdir+ at all"
            fd = os.open(tmp, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                ctx.set_fd("lowerdir+", fd)
                by_fd, fd_why = True, "fsconfig(FSCONFIG_SET_FD, lowerdir+) accepted (kernel >= 6.13)"
            except OSError as e:
                by_fd, fd_why = False, f"fsconfig(FSCONFIG_SET_FD, lowerdir+) failed: {e.strerror}"
            finally:
                os.close(fd)
        return True, by_fd, "fsconfig(FSCONFIG_SET_STRING, lowerdir+) accepted", fd_why
    except OSError as e:
        return False, False, f"fsopen('overlay') failed: {e.strerror}", "no fs context"
    finally:
        os.rmdir(tmp)


def _probe_parameter(key: str, value: str) -> tuple[bool, str]:
    """Whether overlay's parameter parser accepts ``key=value`` (no mount happens)."""
    try:
        with FsContext("overlay") as ctx:
            ctx.set_string(key, value)
        return True, f"fsconfig({key}={value}) accepted"
    except OSError as e:
        return False, f"fsconfig({key}={value}) refused: {e.strerror}"


# --- a store's filesystem ---------------------------------------------------------------

DT_UNKNOWN, DT_DIR, DT_REG = 0, 4, 8


@dataclass(frozen=True)
class BackingFS:
    """What the filesystem under a store directory supports. ``why[field]`` says how we know."""

    path: str
    fs_type: str
    d_type: bool
    trusted_xattrs: bool
    user_xattrs: bool
    why: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def overlay_problem(self, privileged: bool) -> str | None:
        """Why kernel overlay cannot use layers here, or None when it can."""
        if not self.d_type:
            return (
                f"{self.path} ({self.fs_type}) lacks d_type, which overlayfs requires: {self.why['d_type']}"
            )
        if self.fs_type == "overlay":
            return f"{self.path} is itself on overlayfs, which cannot hold an overlay's upper layer"
        if privileged and not self.trusted_xattrs:
            return f"{self.path} ({self.fs_type}) cannot store trusted.* xattrs: {self.why['trusted_xattrs']}"
        if not privileged and not self.user_xattrs:
            return f"{self.path} ({self.fs_type}) cannot store user.* xattrs: {self.why['user_xattrs']}"
        return None


def fs_type_of(path: str) -> tuple[str, str]:
    """The filesystem type of the mount holding ``path``, and how it was found.

    Matches the path's st_dev against mountinfo's major:minor; where a filesystem hands out
    other device numbers than its superblock's (btrfs subvolumes), the longest mount point
    that is a prefix of the real path decides.
    """
    st = os.stat(path)
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    table = mount_table()
    for entry in reversed(table):  # the last mount listed on a point is the visible one
        if entry.dev == dev:
            return entry.fs_type, f"st_dev {dev[0]}:{dev[1]} is {entry.mount_point} in /proc/self/mountinfo"
    real = os.path.realpath(path)
    best: MountEntry | None = None
    for entry in table:
        mp = entry.mount_point
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) >= len(best.mount_point)
        ):
            best = entry
    if best is None:
        return "unknown", "no mount in /proc/self/mountinfo holds it"
    return best.fs_type, f"longest mount point prefix {best.mount_point} in /proc/self/mountinfo"


def backing_fs(path: str) -> BackingFS:
    """Check the filesystem under the existing directory ``path`` (a store root).

    Creates and removes a private temp directory inside ``path``: a file and a directory to
    list with getdents64, and the opaque xattrs layerfs writes (``trusted.overlay.opaque``,
    ``user.overlay.opaque``) set on it.
    """
    why: dict[str, str] = {}
    fs_type, why["fs_type"] = fs_type_of(path)
    tmp = tempfile.mkdtemp(prefix=".layerfs-probe-", dir=path)
    try:
        os.mkdir(os.path.join(tmp, "d"))
        with open(os.path.join(tmp, "f"), "wb"):
            pass
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            types = {name: t for name, t in getdents(fd) if name not in (".", "..")}
        except OSError as e:
            types = {}
            why["d_type"] = f"getdents64 failed: {e.strerror}"
        finally:
            os.close(fd)
        d_type = types.get("d") == DT_DIR and types.get("f") == DT_REG
        if types:
            why["d_type"] = (
                "getdents64 reported DT_DIR and DT_REG"
                if d_type
                else f"getdents64 reported d_type {sorted(types.items())} (DT_UNKNOWN is 0)"
            )
        trusted, why["trusted_xattrs"] = _try_xattr(tmp, "trusted.overlay.opaque")
        user, why["user_xattrs"] = _try_xattr(tmp, "user.overlay.opaque")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BackingFS(
        path=path, fs_type=fs_type, d_type=d_type, trusted_xattrs=trusted, user_xattrs=user, why=why
    )


def _try_xattr(path: str, name: str) -> tuple[bool, str]:
    try:
        os.setxattr(path, name, b"y")
        ok = os.getxattr(path, name) == b"y"
        with contextlib.suppress(OSError):
            os.removexattr(path, name)
        return ok, f"setxattr({name}) {'worked' if ok else 'read back differently'}"
    except OSError as e:
        return False, f"setxattr({name}) failed: {e.strerror}"
