"""The ``layerfs-fuse`` program: serve a union of layers over FUSE, fuse-overlayfs style.

Command lines it accepts (every one may carry several ``-o``, merged in order):

- ``layerfs-fuse -o lowerdir=L1:L2,upperdir=U,workdir=W MOUNTPOINT`` (fuse-overlayfs, and
  containers/storage's ``mount_program``, which may add ``context=...``);
- ``layerfs-fuse SOURCE MOUNTPOINT -o ...``, the order ``mount.fuse3`` uses when run as
  ``mount -t fuse.layerfs-fuse SOURCE MOUNTPOINT -o ...``.

Lifecycle without ``-f``: the program forks; the child detaches (setsid, cwd ``/``, stdio on
/dev/null or ``--log``), builds the model, mounts (``pyfuse3.init``) and only then reports
"ok" through a pipe, so the parent exits 0 exactly when the mount is live (or 1 with the
child's error). The child serves until the mount goes away (``umount``/``fusermount3 -u``)
or it gets SIGTERM/SIGINT/SIGHUP (then it unmounts itself, lazily); either way the model's
``destroy()`` runs before it exits. Nothing is resolved through PATH: ``mount.fuse3`` and
``mount`` run helpers with a sanitized environment.

Exit codes: 0 ok, 1 failure, 2 usage.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import logging
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from layerfs import __version__
from layerfs.errors import LayerfsError, UsageError
from layerfs.mount.spec import split_lowerdir, unescape_path
from layerfs.union import whiteout
from layerfs.union.api import UnionOps

PROG = "layerfs-fuse"
DEFAULT_MODEL = "layerfs.union.fs:UnionFS"
MODEL_ENV = "LAYERFS_FUSE_MODEL"
# a model that raises EBUSY/EAGAIN (its upper still locked by a daemon that is just
# exiting after an unmount) is retried this long, so an immediate remount works
BUSY_RETRY_SECONDS = 3.0

HELP = f"""\
usage: {PROG} [-f] [-d] [-o OPTIONS]... [SOURCE] MOUNTPOINT

Mount a union of layer directories on MOUNTPOINT over FUSE (type fuse.{PROG}), with
kernel overlayfs' semantics and on-disk format and fuse-overlayfs' command line.

Layer options (-o, comma separated; a backslash escapes ',' ':' and '\\\\' in a path):
  lowerdir=L1:L2:...   read-only layers, leftmost on top (required)
  upperdir=U           writable layer; without it the mount is read-only
  workdir=W            work directory on U's filesystem (required with upperdir)
  userxattr            opaque markers are user.overlay.* xattrs (unprivileged stores)

Mount flags, passed to the kernel: ro, nodev, nosuid, noexec, noatime, atime, sync,
dirsync. rw, dev, suid, exec, relatime, defaults, async are the defaults (as root the
mount honours device files and setuid bits unless nodev/nosuid, like mount(8)).

Also accepted: fsname=NAME (the source shown in mountinfo; default SOURCE or {PROG}),
timeout=SECONDS (entry/attribute cache of changeable entries, default 1; lower-layer
entries are cached for an hour), debug (as -d), default_permissions and allow_other
(always on; allow_other as root or with user_allow_other in /etc/fuse.conf).
Accepted silently, as they describe what {PROG} does anyway: redirect_dir=on|follow,
index=off, metacopy=off, xino=off|auto, nfs_export=off.
Ignored with a warning: context=, fscontext=, defcontext=, rootcontext= (SELinux labels),
fuse-overlayfs tuning (fsync=, threaded=, fast_ino=, writeback=, noacl, static_nlink,
max_threads=, max_idle_threads=, clone_fd, auto_unmount), other overlay parameters
(index=on, metacopy=on, volatile, ...) and unknown options.
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
  -V, --version   print the version
  -h, --help      print this help

Unmount with `umount MOUNTPOINT` or `fusermount3 -u MOUNTPOINT`: the daemon then exits.
As a mount(8) type: `mount -t fuse.{PROG} -o lowerdir=... SOURCE MOUNTPOINT` runs
mount.fuse3, which runs `{PROG} SOURCE MOUNTPOINT -o ...` through /bin/sh with no
PATH of its own (so the shell's default: /usr/local/sbin:/usr/local/bin:/usr/sbin:
/usr/bin:/sbin:/bin). Install or link {PROG} there, or name it absolutely:
`-t fuse./path/to/{PROG}` or `-t fuse '/path/to/{PROG}#SOURCE'`.
Exit status: 0 ok, 1 failure, 2 usage.
"""

# kernel mount flags libfuse 3.14 takes as -o (it refuses relatime, strictatime, nodiratime, nosymfollow)
KERNEL_FLAGS = frozenset({"ro", "nodev", "nosuid", "noexec", "noatime", "atime", "sync", "dirsync"})
DEFAULT_FLAGS = frozenset({"rw", "dev", "suid", "exec", "relatime", "defaults", "async"})
ALWAYS_ON = frozenset({"default_permissions", "allow_other", "allow_root"})
QUIET_OVERLAY = {"redirect_dir": ("on", "follow"), "index": ("off",), "metacopy": ("off",),
                 "nfs_export": ("off",), "xino": ("off", "auto")}
IGNORED = frozenset({"fsync", "threaded", "fast_ino", "writeback", "noacl", "static_nlink", "max_threads",
                     "max_idle_threads", "clone_fd", "auto_unmount", "volatile", "redirect_dir", "index",
                     "metacopy", "xino", "nfs_export", "uuid", "verity", "lazytime", "subtype"})
SELINUX = frozenset({"context", "fscontext", "defcontext", "rootcontext"})
REFUSED = {
    "uidmapping": "uid mapping", "gidmapping": "gid mapping", "squash_to_root": "owner squashing",
    "squash_to_uid": "owner squashing", "squash_to_gid": "owner squashing", "plugins": "layer plugins",
}


@dataclass
class Options:
    """A parsed command line."""

    mountpoint: str
    lowers: list[str]
    upper: str | None = None
    work: str | None = None
    source: str | None = None
    fsname: str | None = None
    flags: list[str] = field(default_factory=list)  # kernel mount flags to pass on
    userxattr: bool = False
    timeout: float | None = None
    foreground: bool = False
    debug: bool = False
    print_pid: bool = False
    log: str | None = None
    model: str = DEFAULT_MODEL
    warnings: list[str] = field(default_factory=list)

    @property
    def readonly(self) -> bool:
        return self.upper is None or "ro" in self.flags


def split_options(text: str) -> list[str]:
    """Split a ``-o`` string at commas that are neither backslash-escaped nor inside "quotes".

    Escapes stay in place (layer paths are unescaped per key); quotes are kept too
    (containers/storage quotes ``context="a,b"``).
    """
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    chars = iter(text)
    for c in chars:
        if c == "\\":
            cur += [c, next(chars, "")]
        elif c == '"':
            quoted = not quoted
            cur.append(c)
        elif c == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    out.append("".join(cur))
    return [o for o in out if o]


def parse_args(argv: Sequence[str]) -> Options | str:
    """The options of a command line, or the text to print for ``--help``/``--version``.

    Raises ``UsageError`` for a command line that cannot be acted on.
    """
    raw: list[str] = []
    positional: list[str] = []
    flags: dict[str, Any] = {"foreground": False, "debug": False, "print_pid": False, "log": None,
                             "model": os.environ.get(MODEL_ENV) or DEFAULT_MODEL}
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
        elif arg in ("--log", "--model"):
            value = next(args, None)
            if value is None:
                raise UsageError(f"{arg} needs an argument")
            flags[arg[2:]] = value
        elif arg == "--":
            positional += list(args)
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown argument {arg!r}")
        else:
            positional.append(arg)
    if len(positional) not in (1, 2):
        raise UsageError("expected MOUNTPOINT, or SOURCE MOUNTPOINT" if not positional
                         else f"too many arguments: {' '.join(positional)}")
    if flags["log"] is not None:
        flags["log"] = os.path.abspath(flags["log"])  # the daemon runs in /
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
            mod_spec = importlib.util.spec_from_file_location(f"_layerfs_model_{os.getpid()}", target)
            if mod_spec is None or mod_spec.loader is None:
                raise ImportError(f"cannot load {target}")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        cls: Callable[..., Any] = getattr(module, name)
    except (ImportError, AttributeError, OSError) as e:
        raise LayerfsError(f"the union model {spec} is not available: {e}") from e
    return cls


def build_model(opts: Options) -> UnionOps:
    """Check the directories and construct the union model (retrying briefly while busy)."""
    for path, what in [(p, "lowerdir") for p in opts.lowers] + [(opts.upper, "upperdir"), (opts.work, "workdir")]:
        if path is not None and not os.path.isdir(path):
            raise LayerfsError(f"{what} {path} does not exist or is not a directory")
    if not opts.mountpoint.startswith("/dev/fd/") and not os.path.isdir(opts.mountpoint):
        raise LayerfsError(f"mount point {opts.mountpoint} does not exist or is not a directory")
    cls = load_model(opts.model)
    fmt = None
    if opts.userxattr:
        fmt = whiteout.USERXATTR if os.geteuid() == 0 else whiteout.UNPRIVILEGED_FILES
    deadline = time.monotonic() + BUSY_RETRY_SECONDS
    while True:
        try:
            model: UnionOps = cls(opts.lowers, upper=opts.upper, work=opts.work, fmt=fmt)
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
    import pyfuse3
    import trio

    from layerfs.fuse.ops import CachePolicy, UnionOperations

    os.umask(0)  # the kernel already applied the caller's umask to every mode it sends
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one fd per open file and layer
    model = build_model(opts)
    ops = UnionOperations(model, CachePolicy(mutable=opts.timeout if opts.timeout is not None else 1.0))
    said: list[str] = []
    # SIGTERM between the mount and trio's own handler must still end in an unmount
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
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
        logging.getLogger(__name__).info("serving %s on %s", ":".join(opts.lowers), opts.mountpoint)
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
        _setup_logging(opts)
        return serve(opts, ready)
    except LayerfsError as e:
        ready.fail(str(e))
        return e.exit_code
    except BrokenPipeError:  # the parent died before it heard "ok": serve() unmounted
        return 1
    except BaseException as e:  # the parent must always hear why
        logging.getLogger(__name__).exception("the daemon failed")
        ready.fail(f"{type(e).__name__}: {e}")
        return 1


def daemonize(opts: Options) -> int:
    """Fork a serving child; return 0 once it reports the mount live, 1 with its error."""
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
        return 0
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if answer.startswith("error "):
        sys.stderr.write(f"{PROG}: error: {answer[6:]}\n")
    else:
        sys.stderr.write(f"{PROG}: error: the daemon exited (status {code}) before {opts.mountpoint} was mounted\n")
    return 2 if code == 2 else 1


def _setup_logging(opts: Options) -> None:
    logging.basicConfig(level=logging.DEBUG if opts.debug else logging.WARNING, stream=sys.stderr,
                        format=f"{PROG}[%(process)d] %(levelname)s %(name)s: %(message)s", force=True)


def run(argv: Sequence[str]) -> int:
    """The program, minus the final exit: returns the exit status."""
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
        return daemonize(opts)
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
    raise SystemExit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
