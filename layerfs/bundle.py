"""OCI runtime bundles: ``config.json`` + ``rootfs`` mounted from the store, for runc/crun.

``make_bundle`` creates (or reuses) a writable container, mounts it on ``DIR/rootfs`` and
writes ``DIR/config.json`` from the image config (Entrypoint + Cmd, Env, WorkingDir, User)
with the defaults ``runc spec`` uses (namespaces, masked paths, a minimal capability set,
the standard /proc, /dev, /sys mounts). The runtime's writes land in the container's upper.

Before mounting, the merged rootfs is checked: ``/dev``, ``/proc`` and ``/sys`` must be
directories or absent. A symlink there would make the runtime mount procfs/sysfs/devtmpfs
wherever the image points it, outside the rootfs (the CVE-2026-41579 class of breakouts),
so such a rootfs is refused with a clear error.

Rootless (``rootless_config``, when layerfs runs without CAP_SYS_ADMIN in the initial user
namespace): the config asks for a user namespace mapping container root to the caller's
uid and gid and, where ``/etc/subuid`` and ``/etc/subgid`` give the user ranges, container
ids 1.. to those (runc maps them with ``newuidmap``/``newgidmap``), as ``runc spec
--rootless`` does: no cgroup device rules, ``/sys`` bind-mounted instead of a new sysfs
(which needs a network namespace of one's own), no ``gid=5`` for devpts. The rootfs is
then a FUSE mount (``--backend auto``): the runtime's processes, container root being the
user, may use it.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
from dataclasses import dataclass
from typing import Any

from layerfs import containers, mounting
from layerfs.catalog import read_config, resolve_image
from layerfs.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from layerfs.linux.proc import in_initial_userns
from layerfs.store import Store
from layerfs.union.view import LayerStack

GUARDED = ("dev", "proc", "sys")
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


@dataclass(frozen=True)
class Bundle:
    path: str
    rootfs: str
    container: str


def check_rootfs(stack: LayerStack) -> None:
    """Refuse a rootfs whose /dev, /proc or /sys is a symlink or another non-directory."""
    for name in GUARDED:
        entry = stack.lookup(name)
        if entry is None or entry.is_dir:
            continue
        kind = "a symlink" if stat.S_ISLNK(entry.st.st_mode) else "not a directory"
        target = ""
        if stat.S_ISLNK(entry.st.st_mode):
            target = f" -> {os.readlink(stack.real_path(entry))}"
        raise FailedPrecondition(
            f"refusing rootfs: /{name} is {kind}{target}; a runtime would mount {name} through it "
            "and outside the container (symlinked /dev, /proc or /sys is a known breakout)"
        )


def _user(config: dict[str, Any], stack: LayerStack) -> dict[str, int]:
    spec = str((config.get("config") or {}).get("User") or "")
    if not spec:
        return {"uid": 0, "gid": 0}
    user, _, group = spec.partition(":")

    def lookup(db: str, name: str) -> int | None:
        if name.isdigit():
            return int(name)
        entry = stack.lookup(f"etc/{db}")
        if entry is None or not stat.S_ISREG(entry.st.st_mode):
            return None
        with open(stack.real_path(entry), encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(":")
                if len(fields) > 3 and fields[0] == name:
                    return int(fields[2]) if db == "group" else int(fields[2])
        return None

    uid = lookup("passwd", user)
    if uid is None:
        raise InvalidArgument(f"image user {spec!r}: no such user in the image's /etc/passwd")
    gid: int | None = 0
    if group:
        gid = lookup("group", group)
        if gid is None:
            raise InvalidArgument(f"image user {spec!r}: no such group in the image's /etc/group")
    elif not user.isdigit():
        entry = stack.lookup("etc/passwd")
        if entry is not None:
            with open(stack.real_path(entry), encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.split(":")
                    if len(fields) > 3 and fields[0] == user:
                        gid = int(fields[3])
    return {"uid": uid, "gid": gid or 0}


def runtime_config(config: dict[str, Any], stack: LayerStack, args: list[str] | None, hostname: str) -> dict[str, Any]:
    """A runtime-spec config.json for the image ``config`` (like ``runc spec`` + the image's process)."""
    cfg = config.get("config") or {}
    argv = args or [*(cfg.get("Entrypoint") or []), *(cfg.get("Cmd") or [])]
    if not argv:
        raise InvalidArgument("the image has no Entrypoint or Cmd: give the command after the bundle directory")
    env = list(cfg.get("Env") or [])
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": _user(config, stack),
            "args": argv,
            "env": env,
            "cwd": cfg.get("WorkingDir") or "/",
            "capabilities": {k: list(_CAPS) for k in ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                            "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


SUBID_FILES = {"uid": "/etc/subuid", "gid": "/etc/subgid"}


def subid_ranges(kind: str, user: str, ident: int, path: str | None = None) -> list[tuple[int, int]]:
    """The subordinate ``(start, count)`` ranges of ``user`` (or its numeric id) in
    ``/etc/subuid`` (``kind`` uid) or ``/etc/subgid`` (gid); none without the file."""
    out: list[tuple[int, int]] = []
    try:
        with open(path or SUBID_FILES[kind], encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (user, str(ident)) and fields[1].isdigit() and fields[2].isdigit():
            out.append((int(fields[1]), int(fields[2])))
    return out


def id_mappings(uid: int, gid: int) -> dict[str, list[dict[str, int]]]:
    """``uidMappings``/``gidMappings`` for a rootless container: 0 is the caller, 1.. its
    subordinate ranges in order."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    out: dict[str, list[dict[str, int]]] = {}
    for kind, own in (("uid", uid), ("gid", gid)):
        maps = [{"containerID": 0, "hostID": own, "size": 1}]
        next_id = 1
        for start, count in subid_ranges(kind, user, own):
            maps.append({"containerID": next_id, "hostID": start, "size": count})
            next_id += count
        out[f"{kind}Mappings"] = maps
    return out


def rootless_config(spec: dict[str, Any], uid: int, gid: int) -> dict[str, Any]:
    """``spec`` (from ``runtime_config``) for a runtime started by ``uid``/``gid`` without
    privileges: a user namespace with the user's mappings (see the module's docstring)."""
    linux = spec["linux"]
    linux["namespaces"] = [{"type": "user"}, *linux["namespaces"]]
    linux.update(id_mappings(uid, gid))
    linux.pop("resources", None)
    for m in spec["mounts"]:
        if m["type"] == "sysfs":
            m.update({"type": "none", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]})
        elif m["type"] == "devpts":
            m["options"] = [o for o in m["options"] if not o.startswith("gid=")]
    return spec


def make_bundle(store: Store, ref: str, directory: str, *, name: str | None = None,
                args: list[str] | None = None, backend: str = "auto") -> Bundle:
    """Make ``directory`` an OCI bundle for the container ``ref`` (or a new container over
    the image ``ref``, named ``name`` or after the directory)."""
    directory = os.path.abspath(directory)
    rootfs = os.path.join(directory, "rootfs")
    if os.path.exists(os.path.join(directory, "config.json")):
        raise AlreadyExists(f"{directory} already holds a bundle (config.json)")
    c = containers.find(store, ref)
    created = False
    if c is None:
        img = resolve_image(store, ref)
        cname = containers.validate_name(name or os.path.basename(directory.rstrip("/")))
        c = containers.create(store, cname, img)
        created = True
    try:
        stack = LayerStack([containers.upper(store, c), *containers.lowers(store, c)])
        check_rootfs(stack)
        config = json.loads(store.content.read(c.config_digest))
        spec = runtime_config(config, stack, args, c.name)
        if os.geteuid() != 0 or not in_initial_userns():
            spec = rootless_config(spec, os.getuid(), os.getgid())
        os.makedirs(rootfs, exist_ok=True)
        mounting.mount(store, mounting.container_spec(store, c), c.key, rootfs, backend)
        try:
            tmp = os.path.join(directory, ".config.json.tmp")
            with open(tmp, "w") as f:
                json.dump(spec, f, indent=2)
            os.rename(tmp, os.path.join(directory, "config.json"))
        except BaseException:
            mounting.umount(store, rootfs)
            raise
    except BaseException:
        if created:
            containers.remove(store, c.name)
        raise
    return Bundle(directory, rootfs, c.name)


__all__ = ["Bundle", "make_bundle", "check_rootfs", "runtime_config", "read_config", "rootless_config"]
