"""The ``layerfs-fuse`` program: serve a union of layers over FUSE, fuse-overlayfs style.

Command lines it accepts (every one may carry several ``-o``, merged in order):

- ``layerfs-fuse -o lowerdir=L1:L2,upperdir=U,workdir=W MOUNTPOINT`` (fuse-overlayfs, and
  containers/storage's ``mount_program``, which may add ``context=...``);
- ``layerfs-fuse SOURCE MOUNTPOINT -o ...``, the order ``mount.fuse3`` uses when run as
  ``mount -t fuse.layerfs-fuse SOURCE MOUNTPOINT -o ...``.

Transports (``--transport``, default ``$LAYERFS_FUSE_TRANSPORT`` or pyfuse3): ``pyfuse3``
(``layerfs.fuse.ops`` through libfuse) or ``kernel`` (``layerfs.fuse.session``, the FUSE
protocol spoken on /dev/fuse by layerfs itself). Both serve the same model the same way.

Lifecycle without ``-f``: the program forks; the child detaches (setsid, cwd ``/``, stdio on
/dev/null or ``--log``), builds the model, mounts (``pyfuse3.init``; the kernel transport:
mount(2), as libfuse's programs do: the kernel holds every request to the new mount until
the daemon answers INIT) and only then reports "ok" through a pipe, so the parent exits 0
exactly when the mount is live (or 1 with the child's error). On the kernel transport
trio and the request loop are imported after that, off the mount time; a failure there
unmounts again and is logged (``--log``). The
child serves until the mount goes away (``umount``/``fusermount3 -u``) or it gets
SIGTERM/SIGINT/SIGHUP (then it unmounts itself, lazily); either way the model's
``destroy()`` runs before it exits. Nothing is resolved through PATH: ``mount.fuse3`` and
``mount`` run helpers with a sanitized environment.

Exit codes: 0 ok, 1 failure, 2 usage.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import resource
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from layerfs import __version__, failpoint
from layerfs.errors import LayerfsError, UsageError
from layerfs.fuse.connection import MountConfig, connect
from layerfs.linux import fusedev
from layerfs.mount.spec import split_lowerdir, split_options, unescape_path
from layerfs.mount.users import check_upper_free
from layerfs.union import whiteout
from layerfs.union.api import UnionOps

if TYPE_CHECKING:
    import logging

PROG = "layerfs-fuse"
DEFAULT_MODEL = "layerfs.union.fs:UnionFS"
MODEL_ENV = "LAYERFS_FUSE_MODEL"
TRANSPORTS = ("pyfuse3", "kernel")
DEFAULT_TRANSPORT = "kernel"
TRANSPORT_ENV = "LAYERFS_FUSE_TRANSPORT"
STATS_ENV = "LAYERFS_FUSE_STATS"
# a model that raises EBUSY/EAGAIN (its upper still locked by a daemon that is just
# exiting after an unmount) is retried this long, so an immediate remount works
BUSY_RETRY_SECONDS = 3.0

HELP = f"""\
usage: {PROG} [-f] [-d] [-o OPTIONS]... [SOURCE] MOUNTPOINT

Mount a union of layer directories on MOUNTPOINT over FUSE (type fuse.{PROG}), with
kernel overlayfs' semantics and on-disk format and fuse-overlayfs' command line.

Layer options (-o, comma separated; a backslash escapes ',' ':' and '\\\\' in a path;
empty options, as in "a,,b" or a trailing comma, are skipped):
  lowerdir=L1:L2:...   read-only layers, leftmost on top (required)
  upperdir=U           writable layer; without it the mount is read-only
  workdir=W            work directory on U's filesystem (required with upperdir; not
                       inside U, nor U inside it)
  userxattr            opaque markers are user.overlay.* xattrs (unprivileged stores)
  layer_format=trusted|userxattr|files
                       the store's on-disk format for what the upper gets (layerfs
                       stores say it; default trusted as root, userxattr otherwise)
Layer paths are resolved once, at mount (symlinks followed, as containers/storage's
overlay/l/<id> links need); a missing or non-directory layer is an error (exit 1) and
nothing is mounted. Inside the layers no symlink is ever followed.

Mount flags, passed to the kernel: ro, nodev, nosuid, noexec, noatime, atime, sync,
dirsync. rw, dev, suid, exec, relatime, defaults, async are the defaults (as root the
mount honours device files and setuid bits unless nodev/nosuid, like mount(8)).

Also accepted: fsname=NAME (the source shown in mountinfo; default SOURCE or {PROG}),
timeout=SECONDS (entry/attribute cache of changeable entries, default 1; lower-layer
entries are cached for an hour), debug (as -d), default_permissions and allow_other
(always on; allow_other as root or with user_allow_other in /etc/fuse.conf).
Accepted silently, as they describe what {PROG} does anyway: redirect_dir=on|follow,
index=off, metacopy=off, xino=off|auto, nfs_export=off.
Honoured: volatile (fsync of upper files is skipped, as kernel overlayfs does; a crash
may lose recent writes).
Ignored with a warning: context=, fscontext=, defcontext=, rootcontext= (SELinux labels),
fuse-overlayfs tuning (fsync=, threaded=, fast_ino=,
writeback=, noacl, static_nlink, max_threads=, max_idle_threads=, clone_fd,
auto_unmount), other overlay parameters (index=on, metacopy=on, ...) and unknown options
(kernel overlayfs refuses unknown options; {PROG}, like fuse-overlayfs, warns).
Refused (exit 2), as they change semantics {PROG} does not implement: uidmapping=,
gidmapping=, squash_to_root, squash_to_uid=, squash_to_gid=, plugins=,
xattr_permissions=1|2, noxattrs=1|2.

Program options:
  -f              stay in the foreground (default: return once the mount is live and
                  keep serving in the background)
  -d, --debug     log every FUSE request to stderr (implies -f)
  -s              accepted for fuse-overlayfs compatibility (no effect)
  --print-pid     print the serving daemon's pid on stdout once the mount is live
  --log FILE      the background daemon's stderr (default /dev/null)
  --model M:C     the union model class (default {DEFAULT_MODEL}, or ${MODEL_ENV});
                  M is a module or a .py file: for testing the adapter
  --transport T   how FUSE is spoken: pyfuse3 (through libfuse) or kernel (layerfs reads
                  and writes /dev/fuse itself: readdir caching, passthrough as root);
                  default ${TRANSPORT_ENV} or {DEFAULT_TRANSPORT}
  --passthrough auto|off
                  kernel transport: FUSE passthrough of file data when root (default auto)
  --dir-cache on|off
                  kernel transport: let the kernel cache directory listings (default on;
                  off re-lists every directory through the daemon, as pyfuse3 must)
  --splice on|off kernel transport: answer READ by splicing the file's pages to /dev/fuse
                  (default on; off reads them into a buffer and writes that)
  --writeback on|off
                  kernel transport: let the kernel cache writes (FUSE writeback cache;
                  default off)
  --stats FILE    kernel transport: write request counters (JSON) to FILE on SIGUSR1 and
                  at exit (default ${STATS_ENV})
  -V, --version   print the version
  -h, --help      print this help

Unmount with `umount MOUNTPOINT` or `fusermount3 -u MOUNTPOINT`: the daemon then exits.
As a mount(8) type: `mount -t fuse.{PROG} -o lowerdir=... SOURCE MOUNTPOINT` runs
mount.fuse3, which runs `{PROG} SOURCE MOUNTPOINT -o ...` through /bin/sh with no
PATH of its own (so the shell's default: /usr/local/sbin:/usr/local/bin:/usr/sbin:
/usr/bin:/sbin:/bin). Install or link {PROG} there, or name it absolutely:
`-t fuse3 '/path/to/{PROG}#SOURCE'` (mount(8) cuts `-t fuse./path` at its last dot).
Exit status: 0 ok, 1 failure, 2 usage.
"""

# kernel mount flags libfuse 3.14 takes as -o (it refuses relatime, strictatime, nodiratime, nosymfollow)
KERNEL_FLAGS = frozenset({"ro", "nodev", "nosuid", "noexec", "noatime", "atime", "sync", "dirsync"})
DEFAULT_FLAGS = frozenset({"rw", "dev", "suid", "exec", "relatime", "defaults", "async"})
ALWAYS_ON = frozenset({"default_permissions", "allow_other", "allow_root"})
QUIET_OVERLAY = {"redirect_dir": ("on", "follow"), "index": ("off",), "metacopy": ("off",),
                 "nfs_export": ("off",), "xino": ("off", "auto")}
IGNORED = frozenset({"fsync", "threaded", "fast_ino", "writeback", "noacl", "static_nlink", "max_threads",
                     "max_idle_threads", "clone_fd", "auto_unmount", "redirect_dir", "index",
                     "metacopy", "xino", "nfs_export", "uuid", "verity", "lazytime", "subtype"})
SELINUX = frozenset({"context", "fscontext", "defcontext", "rootcontext"})
REFUSED = {
    "uidmapping": "uid mapping", "gidmapping": "gid mapping", "squash_to_root": "owner squashing",
    "squash_to_uid": "owner squashing", "squash_to_gid": "owner squashing", "plugins": "layer plugins",
}


class Options:
    """A parsed command line.

    A plain class, not a dataclass: this module is on the mount path, and generating a
    dataclass of this size costs ~2 ms of every mount."""

    __slots__ = ("mountpoint", "lowers", "upper", "work", "source", "fsname", "flags", "userxattr",
                 "layer_format", "volatile", "timeout", "foreground", "debug", "print_pid", "log", "model",
                 "transport", "passthrough", "dir_cache", "splice", "writeback", "stats", "warnings")

    def __init__(self, mountpoint: str, lowers: list[str], *, upper: str | None = None, work: str | None = None,
                 source: str | None = None, fsname: str | None = None, flags: list[str] | None = None,
                 userxattr: bool = False, layer_format: str | None = None, volatile: bool = False,
                 timeout: float | None = None, foreground: bool = False, debug: bool = False,
                 print_pid: bool = False, log: str | None = None, model: str = DEFAULT_MODEL,
                 transport: str = DEFAULT_TRANSPORT, passthrough: str = "auto", dir_cache: str = "on",
                 splice: str = "on", writeback: str = "off", stats: str | None = None,
                 warnings: list[str] | None = None) -> None:
        self.mountpoint = mountpoint
        self.lowers = lowers
        self.upper = upper
        self.work = work
        self.source = source
        self.fsname = fsname
        self.flags: list[str] = [] if flags is None else flags  # kernel mount flags to pass on
        self.userxattr = userxattr
        self.layer_format = layer_format  # a whiteout.FORMATS name: what the upper gets written in
        self.volatile = volatile  # no fsyncs of upper files, as the kernel option
        self.timeout = timeout
        self.foreground = foreground
        self.debug = debug
        self.print_pid = print_pid
        self.log = log
        self.model = model
        self.transport = transport
        self.passthrough = passthrough
        self.dir_cache = dir_cache
        self.splice = splice
        self.writeback = writeback
        self.stats = stats
        self.warnings: list[str] = [] if warnings is None else warnings

    def __repr__(self) -> str:
        return f"Options({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"

    @property
    def readonly(self) -> bool:
        return self.upper is None or "ro" in self.flags


def parse_args(argv: Sequence[str]) -> Options | str:
    """The options of a command line, or the text to print for ``--help``/``--version``.

    Raises ``UsageError`` for a command line that cannot be acted on.
    """
    raw: list[str] = []
    positional: list[str] = []
    flags: dict[str, Any] = {"foreground": False, "debug": False, "print_pid": False, "log": None,
                             "model": os.environ.get(MODEL_ENV) or DEFAULT_MODEL,
                             "transport": os.environ.get(TRANSPORT_ENV) or DEFAULT_TRANSPORT,
                             "passthrough": "auto", "dir_cache": "on", "splice": "on", "writeback": "off",
                             "stats": os.environ.get(STATS_ENV) or None}
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            return HELP
        if arg in ("-V", "--version"):
            return f"{PROG} {__version__}"
        if arg == "-o":
            value = next(args, None)
            if value is None:
                raise UsageError("-o needs an argument")
            raw += split_options(value)
        elif arg.startswith("-o"):
            raw += split_options(arg[2:])
        elif arg == "-f":
            flags["foreground"] = True
        elif arg in ("-d", "--debug"):
            flags["debug"] = flags["foreground"] = True
        elif arg == "-s":
            pass
        elif arg == "--print-pid":
            flags["print_pid"] = True
        elif arg in ("--log", "--model", "--transport", "--passthrough", "--dir-cache", "--splice",
                     "--writeback", "--stats"):
            value = next(args, None)
            if value is None:
                raise UsageError(f"{arg} needs an argument")
            flags[arg[2:].replace("-", "_")] = value
        elif arg == "--":
            positional += list(args)
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown argument {arg!r}")
        else:
            positional.append(arg)
    if len(positional) not in (1, 2):
        raise UsageError("expected MOUNTPOINT, or SOURCE MOUNTPOINT" if not positional
                         else f"too many arguments: {' '.join(positional)}")
    if flags["transport"] not in TRANSPORTS:
        raise UsageError(f"--transport {flags['transport']!r}: expected one of {', '.join(TRANSPORTS)}")
    if flags["passthrough"] not in ("auto", "off"):
        raise UsageError(f"--passthrough {flags['passthrough']!r}: expected auto or off")
    if flags["dir_cache"] not in ("on", "off"):
        raise UsageError(f"--dir-cache {flags['dir_cache']!r}: expected on or off")
    if flags["splice"] not in ("on", "off"):
        raise UsageError(f"--splice {flags['splice']!r}: expected on or off")
    if flags["writeback"] not in ("on", "off"):
        raise UsageError(f"--writeback {flags['writeback']!r}: expected on or off")
    for key in ("log", "stats"):
        if flags[key] is not None:
            flags[key] = os.path.abspath(flags[key])  # the daemon runs in /
    model_target, sep, model_name = flags["model"].rpartition(":")
    if sep and model_target.endswith(".py"):
        flags["model"] = f"{os.path.abspath(model_target)}:{model_name}"
    opts = Options(mountpoint=os.path.abspath(positional[-1]), lowers=[], **flags)
    if len(positional) == 2:
        opts.source = positional[0]
    lowerdir: str | None = None
    for option in raw:
        key, sep, value = option.partition("=")
        if key == "lowerdir" and sep:
            lowerdir = value
        elif key == "upperdir" and sep:
            opts.upper = os.path.abspath(unescape_path(value))
        elif key == "workdir" and sep:
            opts.work = os.path.abspath(unescape_path(value))
        else:
            _other_option(opts, option, key, value if sep else None)
    if not lowerdir:
        raise UsageError("no lowerdir= given (-o lowerdir=TOP:...:BOTTOM)")
    try:
        opts.lowers = [os.path.abspath(p) for p in split_lowerdir(lowerdir)]
    except LayerfsError as e:
        raise UsageError(str(e)) from e
    if (opts.upper is None) != (opts.work is None):
        raise UsageError("upperdir= and workdir= come together: give both or neither")
    return opts


def _other_option(opts: Options, option: str, key: str, value: str | None) -> None:
    if option in KERNEL_FLAGS:
        if option not in opts.flags:
            opts.flags.append(option)
    elif option in DEFAULT_FLAGS or option in ALWAYS_ON:
        pass
    elif option == "userxattr":
        opts.userxattr = True
    elif key == "layer_format" and value is not None:
        if value not in whiteout.FORMATS:
            raise UsageError(f"layer_format={value!r}: expected one of {', '.join(whiteout.FORMATS)}")
        opts.layer_format = value
    elif option == "volatile":
        opts.volatile = True
    elif option == "debug":
        opts.debug = opts.foreground = True
    elif key == "fsname" and value:
        opts.fsname = value
    elif key == "timeout" and value is not None:
        try:
            opts.timeout = float(value)
        except ValueError:
            raise UsageError(f"timeout={value!r} is not a number of seconds") from None
    elif key in REFUSED:
        raise UsageError(f"option {option!r} asks for {REFUSED[key]}, which {PROG} does not implement")
    elif key in ("xattr_permissions", "noxattrs"):
        if value not in ("0", None):
            raise UsageError(f"option {option!r} changes xattr semantics, which {PROG} does not implement")
    elif key in SELINUX:
        opts.warnings.append(f"ignoring {key}=: SELinux labels are not supported")
    elif key in QUIET_OVERLAY and value in QUIET_OVERLAY[key]:
        pass
    elif key in IGNORED:
        opts.warnings.append(f"ignoring option {option!r}")
    else:
        opts.warnings.append(f"ignoring unknown option {option!r}")


# --- mount options ----------------------------------------------------------------------


def user_allow_other(conf: str = "/etc/fuse.conf") -> bool:
    """Whether fuse.conf lets non-root users pass ``allow_other``."""
    try:
        with open(conf, encoding="utf-8", errors="replace") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def _escape_fuse(value: str) -> str:
    """libfuse's option parser treats backslash as an escape and comma as a separator."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def fuse_options(opts: Options, euid: int | None = None) -> set[str]:
    """The option set for ``pyfuse3.init`` (only what pyfuse3 3.5 and libfuse accept)."""
    root = (os.geteuid() if euid is None else euid) == 0
    fsname = opts.fsname or opts.source or PROG
    out = {f"fsname={_escape_fuse(fsname)}", f"subtype={PROG}", "default_permissions"}
    if root or user_allow_other():
        out.add("allow_other")
    out.update(opts.flags)
    if root:
        # libfuse mounts nodev,nosuid unless told otherwise; mount(8) and kernel overlayfs
        # default to dev,suid, and a container root filesystem needs setuid binaries
        if "nodev" not in opts.flags:
            out.add("dev")
        if "nosuid" not in opts.flags:
            out.add("suid")
    if opts.debug:
        out.add("debug")
    return out


# --- the model --------------------------------------------------------------------------


def load_model(spec: str) -> Callable[..., Any]:
    """The class named by ``module:Name`` or ``/path/file.py:Name``."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise UsageError(f"--model {spec!r}: expected MODULE:CLASS or FILE.py:CLASS")
    try:
        if target.endswith(".py"):
            from importlib.util import module_from_spec, spec_from_file_location  # (only a model file)

            mod_spec = spec_from_file_location(f"_layerfs_model_{os.getpid()}", target)
            if mod_spec is None or mod_spec.loader is None:
                raise ImportError(f"cannot load {target}")
            module = module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module  # dataclasses (and pickling) look classes up there
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        cls: Callable[..., Any] = getattr(module, name)
    except (ImportError, AttributeError, OSError) as e:
        raise LayerfsError(f"the union model {spec} is not available: {e}") from e
    return cls


def _realpath(path: str, parents: dict[str, str]) -> tuple[str, os.stat_result | None]:
    """``os.path.realpath(path)``, resolving each parent directory once for all its children
    (``parents`` remembers them): 500 layers side by side cost one lstat each, not a walk
    of every component each. Also that lstat when the path is no symlink (it is the stat of
    the resolved path then), else None."""
    head, tail = os.path.split(path)
    if not tail or tail in (".", ".."):
        return os.path.realpath(path), None
    parent = parents.get(head)
    if parent is None:
        parent = parents[head] = os.path.realpath(head)
    candidate = os.path.join(parent, tail)
    try:
        st = os.lstat(candidate)
        if not stat.S_ISLNK(st.st_mode):
            return candidate, st
    except OSError:
        pass
    return os.path.realpath(candidate), None  # a symlink (overlay/l/<id>), or missing: the plain way


def _layer_dir(path: str, what: str, parents: dict[str, str] | None = None) -> str:
    """``path`` with its symlinks resolved, checked to be a directory (else LayerfsError)."""
    real, st = _realpath(path, {} if parents is None else parents)
    shown = path if real == path else f"{path} (-> {real})"
    try:
        if st is None:
            st = os.stat(real)
    except OSError as e:
        raise LayerfsError(f"{what} {shown}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise LayerfsError(f"{what} {shown}: not a directory")
    return real


def resolve_layers(opts: Options) -> None:
    """Resolve the layer paths once, at mount, as kernel overlayfs and fuse-overlayfs do.

    containers/storage names lower layers by ``overlay/l/<short id>`` symlinks to
    ``../<layer>/diff``; the model opens its layer roots (and everything inside them) with
    O_NOFOLLOW, so it is given the real directories. Refuses (LayerfsError, exit 1 before
    anything is mounted) a path that is missing or not a directory, and an upperdir and
    workdir that are not separate subtrees (the model empties ``WORKDIR/work``).
    """
    parents: dict[str, str] = {}
    opts.lowers = [_layer_dir(p, "lowerdir", parents) for p in opts.lowers]
    if opts.upper is not None and opts.work is not None:
        opts.upper = _layer_dir(opts.upper, "upperdir")
        opts.work = _layer_dir(opts.work, "workdir")
        if opts.upper == opts.work or opts.work.startswith(opts.upper.rstrip("/") + "/") \
                or opts.upper.startswith(opts.work.rstrip("/") + "/"):
            raise LayerfsError(f"upperdir {opts.upper} and workdir {opts.work} must be separate subtrees")


def build_model(opts: Options) -> UnionOps:
    """Check the directories and construct the union model (retrying briefly while busy).
    An upperdir another live mount writes into (kernel or FUSE) is refused, naming it."""
    resolve_layers(opts)
    if opts.upper is not None:  # (this process and the parent waiting for it are not a user)
        check_upper_free(opts.upper, f"upperdir {opts.upper}", exclude_pids={os.getpid(), os.getppid()})
    if not opts.mountpoint.startswith("/dev/fd/") and not os.path.isdir(opts.mountpoint):
        raise LayerfsError(f"mount point {opts.mountpoint} does not exist or is not a directory")
    cls = load_model(opts.model)
    fmt = whiteout.FORMATS[opts.layer_format] if opts.layer_format else None
    if fmt is None and opts.userxattr:
        fmt = whiteout.USERXATTR
    deadline = time.monotonic() + BUSY_RETRY_SECONDS
    while True:
        try:
            extra = {"volatile": True} if opts.volatile else {}  # other --model classes need not know it
            model: UnionOps = cls(opts.lowers, upper=opts.upper, work=opts.work, fmt=fmt, **extra)
            return model
        except (OSError, LayerfsError) as e:
            busy = getattr(e, "errno", None) in (errno.EBUSY, errno.EAGAIN)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- serving ----------------------------------------------------------------------------


class Readiness:
    """The write end of the pipe a daemon reports on: one "ok" or one "error MESSAGE"."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def ok(self) -> None:
        """The mount is live. Raises BrokenPipeError when nobody waits any more."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.write(fd, b"ok\n")
            finally:
                os.close(fd)

    def fail(self, message: str) -> None:
        """Why the mount did not happen (a no-op once ``ok`` was sent: the fd is gone)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.write(fd, b"error " + message.encode(errors="replace") + b"\n")
            os.close(fd)


@contextlib.contextmanager
def _captured_stderr(out: list[str]) -> Iterator[None]:
    """Collect what C code (libfuse) writes to fd 2 meanwhile into ``out``."""
    import tempfile  # pyfuse3 only: not imported by a mount on the kernel transport

    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace").strip())


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def serve(opts: Options, ready: Readiness | None = None) -> int:
    """Build the model, mount, report readiness, serve until unmounted; returns 0.

    With ``ready`` (a daemon), what libfuse prints about a failed mount goes into the
    error message instead of a stderr nobody reads.
    """
    os.umask(0)  # the kernel already applied the caller's umask to every mode it sends
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one fd per open file and layer
    model = build_model(opts)
    # SIGTERM between the mount and trio's own handler must still end in an unmount
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    if opts.transport == "kernel":
        return _serve_kernel(opts, model, ready)
    return _serve_pyfuse3(opts, model, ready)


def _serve_kernel(opts: Options, model: UnionOps, ready: Readiness | None) -> int:
    """``serve`` on the kernel transport: mount, report readiness, then import trio and serve.

    Readiness is reported right after mount(2) (or fusermount3) succeeded, as libfuse's
    programs do: the kernel holds every request to the new mount until INIT is answered, so
    the caller may use the mount at once, and the ~0.2 s of importing trio and the request
    loop is not part of the mount time. Anything that fails after that point (before the
    loop runs) unmounts again and is logged (``--log``), since the caller is gone.
    """
    config = kernel_mount_config(opts, os.geteuid())
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a statistics request must never kill the daemon
    try:
        connection = connect(config)
    except LayerfsError:
        model.destroy()
        raise
    try:
        if ready is not None:
            ready.ok()
        log = _setup_logging(opts)  # (not needed before: logging is imported off the mount time)
        failpoint.hit("fuse.mounted")  # (tests: a stop signal here)
        failpoint.fault("fuse.serve")  # (tests: a failure between the mount and the loop)
        from layerfs.fuse import session as session_module  # trio: after the mount is live
    except BaseException as e:
        # nothing serves the connection: take the mount away before saying why
        log = _setup_logging(opts)
        try:
            model.destroy()
        finally:
            connection.abandon()
        if isinstance(e, SystemExit):
            log.warning("stopped by a signal before serving %s: unmounted it", opts.mountpoint)
        if isinstance(e, Exception) and not isinstance(e, (BrokenPipeError, LayerfsError)):
            raise LayerfsError(f"cannot serve {opts.mountpoint} (unmounted it): {type(e).__name__}: {e}") from e
        raise

    def on_ready() -> None:
        log.info("serving %s on %s", ":".join(opts.lowers), opts.mountpoint)

    return session_module.serve(config, model, on_ready, connection=connection)


def kernel_mount_config(opts: Options, euid: int) -> MountConfig:
    """How the kernel transport mounts ``opts``: as libfuse does, nosuid,nodev by default,
    as root ``dev``/``suid`` unless nodev/nosuid were asked for (mount(8) and kernel
    overlayfs default to dev,suid). A union without an upper is mounted read-only (kernel
    overlayfs does the same): writes fail with EROFS in the VFS, and reading a directory
    does not expire its atime in the kernel's attribute cache."""
    root = euid == 0
    options = ["default_permissions"]
    if root or user_allow_other():
        options.append("allow_other")
    flags = fusedev.MS_RDONLY if opts.upper is None else 0
    for flag in opts.flags:
        flags |= fusedev.MOUNT_FLAGS.get(flag, 0)
    if not root:
        flags |= fusedev.MS_NOSUID | fusedev.MS_NODEV
    fsname = opts.fsname or opts.source or PROG
    user = [f"fsname={_escape_fuse(fsname)}", f"subtype={PROG}", *options, *opts.flags]
    if opts.upper is None and "ro" not in opts.flags:
        user.append("ro")
    return MountConfig(mountpoint=opts.mountpoint, source=fsname, subtype=PROG, flags=flags,
                                      options=options, fusermount_options=user, timeout=opts.timeout,
                                      passthrough=opts.passthrough != "off",
                                      dir_cache=opts.dir_cache == "on", debug=opts.debug, stats=opts.stats,
                                      splice=opts.splice == "on", writeback=opts.writeback == "on")


def _serve_pyfuse3(opts: Options, model: UnionOps, ready: Readiness | None) -> int:
    """``serve`` through pyfuse3 (libfuse): mount, report readiness, run its loop."""
    import pyfuse3
    import trio

    from layerfs.fuse.ops import CachePolicy, UnionOperations

    _setup_logging(opts)  # before libfuse and pyfuse3 say anything
    ops = UnionOperations(model, CachePolicy(mutable=opts.timeout if opts.timeout is not None else 1.0))
    said: list[str] = []
    try:
        with _captured_stderr(said) if ready is not None else contextlib.nullcontext():
            pyfuse3.init(ops, opts.mountpoint, fuse_options(opts))
    except RuntimeError as e:
        ops.destroy()
        detail = " ".join(s for s in said if s)
        raise LayerfsError(f"cannot mount on {opts.mountpoint}: {e}" + (f" ({detail})" if detail else "")) from e
    signalled: list[int] = []
    try:
        if ready is not None:
            ready.ok()
        _setup_logging(opts).info("serving %s on %s", ":".join(opts.lowers), opts.mountpoint)
        trio.run(_main_loop, signalled)
    except BaseException:
        signalled.append(0)
        raise
    finally:
        try:
            ops.destroy()
        finally:
            # unmounted by umount/fusermount: nothing to undo. Stopped by a signal or an
            # error: detach the mount ourselves, so nothing hangs on a dead daemon.
            pyfuse3.close(unmount=bool(signalled))
    return 0


async def _main_loop(signalled: list[int]) -> None:
    """Run pyfuse3's loop until the mount goes away or a stop signal arrives."""
    import pyfuse3
    import trio

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                signalled.append(signum)
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def _daemon_child(opts: Options, ready: Readiness) -> int:
    """In the forked child: detach, then serve; errors before readiness go to the parent."""
    try:
        os.setsid()
        os.chdir("/")  # keep no directory busy
        null = os.open(os.devnull, os.O_RDWR)
        err = os.open(opts.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if opts.log else null
        for fd, src in ((0, null), (1, null), (2, err)):
            os.dup2(src, fd)
        for fd in {null, err} - {0, 1, 2}:
            os.close(fd)
        return serve(opts, ready)  # logging is set up once the mount is live (_setup_logging)
    except LayerfsError as e:
        if ready.fd is None:  # after "ok": nobody waits for the answer; the log says it
            _setup_logging(opts).error("%s", e)
        ready.fail(str(e))
        return e.exit_code
    except BrokenPipeError:  # the parent died before it heard "ok": serve() unmounted
        return 1
    except SystemExit as e:  # a stop signal before the loop's own handler (_stop): unmounted
        if ready.fd is None:
            return 0  # after "ok": stopped as asked
        ready.fail(f"stopped by signal {e.code - 128 if isinstance(e.code, int) else e.code} before "
                   f"{opts.mountpoint} was mounted")
        return 1
    except BaseException as e:  # the parent must always hear why
        _setup_logging(opts).exception("the daemon failed")
        ready.fail(f"{type(e).__name__}: {e}")
        return 1


def daemonize(opts: Options, quick_exit: bool = False) -> int:
    """Fork a serving child; return 0 once it reports the mount live, 1 with its error.

    ``quick_exit``: the parent then ends with ``os._exit`` instead of returning, as it has
    nothing of its own to clean up: tearing down the interpreter (~20 ms for the modules the
    mount path imports) would add to the mount time of every caller that waits for us.
    """
    ready_r, ready_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        code = 1
        try:
            code = _daemon_child(opts, Readiness(ready_w))
        finally:
            os._exit(code)
    os.close(ready_w)
    chunks = []
    while chunk := os.read(ready_r, 65536):
        chunks.append(chunk)
    os.close(ready_r)
    answer = b"".join(chunks).decode(errors="replace").strip()
    if answer == "ok":
        if opts.print_pid:
            print(pid, flush=True)
        return _parent_exit(0, quick_exit)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if answer.startswith("error "):
        sys.stderr.write(f"{PROG}: error: {answer[6:]}\n")
    else:
        sys.stderr.write(f"{PROG}: error: the daemon exited (status {code}) before {opts.mountpoint} was mounted\n")
    return _parent_exit(2 if code == 2 else 1, quick_exit)


def _parent_exit(code: int, quick_exit: bool) -> int:
    """``code``, or (``quick_exit``) exit with it at once, once stdout and stderr are out."""
    if quick_exit:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:  # a closed stdout: what the interpreter's exit would have said, as exit 120
            os._exit(120)
        os._exit(code)
    return code


_logger: logging.Logger | None = None


def _setup_logging(opts: Options) -> logging.Logger:
    """The program's logger, logging to stderr (once per process; imports logging)."""
    import logging

    global _logger
    if _logger is not None:
        return _logger
    logging.basicConfig(level=logging.DEBUG if opts.debug else logging.WARNING, stream=sys.stderr,
                        format=f"{PROG}[%(process)d] %(levelname)s %(name)s: %(message)s", force=True)
    _logger = logging.getLogger(__name__)
    return _logger


def run(argv: Sequence[str], quick_exit: bool = False) -> int:
    """The program, minus the final exit: returns the exit status (``quick_exit``: the
    daemonizing parent exits itself, see ``daemonize``)."""
    try:
        parsed = parse_args(argv)
    except UsageError as e:
        sys.stderr.write(f"{PROG}: {e}\nTry '{PROG} --help'.\n")
        return 2
    if isinstance(parsed, str):
        print(parsed, end="" if parsed.endswith("\n") else "\n")
        return 0
    opts = parsed
    for warning in opts.warnings:
        sys.stderr.write(f"{PROG}: warning: {warning}\n")
    if not opts.foreground:
        return daemonize(opts, quick_exit)
    _setup_logging(opts)
    try:
        if opts.print_pid:
            print(os.getpid(), flush=True)
        return serve(opts)
    except LayerfsError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return e.exit_code
    except OSError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 1


def main() -> None:
    """Console entry point of ``layerfs-fuse``."""
    raise SystemExit(run(sys.argv[1:], quick_exit=True))


if __name__ == "__main__":
    main()
