"""Running one case on one backend, and comparing what two backends observed.

A case is a function of a ``Session``: it calls facade operations through the session,
which records each call with its result (or the errno name it failed with) in an
observation log. After the case, the session appends ``("tree", <the merged tree>)``, the
backend is unmounted, and ``("upper", <normalized dump of the upper directory on disk>)``
ends the log. Kernel overlayfs' log is the expected one; ``diff_logs`` lists every way
another backend's log differs from it.
"""

from __future__ import annotations

import dataclasses
import os
import pprint
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import Backend, Mounted, params_for
from .facade import Facade, Node, Tree, call_logged, dump_upper, errno_name, short_hash
from .layers import LAYER_SETS

LogEntry = tuple[str, Any]
Log = list[LogEntry]


@dataclass(frozen=True)
class Case:
    """One conformance case: ``run(session)`` on a fresh union of the layer set ``layers``.

    ``os_only``: the reason the case cannot run on the model (it is skipped there).
    ``index``: the oracle is kernel overlayfs with ``index=on`` (lower hardlinks stay one
    file across copy-up, as in the FUSE model); the upper directories are then compared
    without the lower hardlink's names and without non-directory link counts (the kernel
    keeps those links in ``work/index``, the model in the upper itself).
    """

    name: str
    run: Callable[[Session], None]
    layers: str = "standard"
    os_only: str | None = None
    doc: str = ""
    index: bool = False


CASES: list[Case] = []


def case(*, layers: str = "standard", os_only: str | None = None,
         index: bool = False) -> Callable[[Callable[[Session], None]], Case]:
    """Register the decorated function as a case named after it."""
    if layers not in LAYER_SETS:
        raise ValueError(f"unknown layer set {layers!r}")

    def register(fn: Callable[[Session], None]) -> Case:
        c = Case(fn.__name__, fn, layers, os_only, (fn.__doc__ or "").strip(), index)
        if any(other.name == c.name for other in CASES):
            raise ValueError(f"duplicate case {c.name}")
        CASES.append(c)
        return c

    return register


class Session:
    """A case's view of one mounted backend: recorded operations plus ``note`` and ``remount``.

    ``s.unlink("a")`` calls ``facade.unlink("a")``, records ``("unlink('a')", result)`` (or
    the errno name) and returns the result (or the errno name). ``s.quiet.op(...)`` does the
    same without recording, for values compared only within one backend (inode numbers).
    """

    def __init__(self, backend: Backend, mounted: Mounted) -> None:
        self.backend = backend
        self.mounted = mounted
        self.log: Log = []

    @property
    def fs(self) -> Facade:
        return self.mounted.facade

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op.startswith("_"):
            raise AttributeError(op)
        method = getattr(self.fs, op)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            result = call_logged(method, *args, **kwargs)
            self.log.append((_label(op, args, kwargs), normalize(result)))
            return result

        return recorded

    @property
    def quiet(self) -> _Quiet:
        return _Quiet(self)

    def note(self, label: str, value: Any) -> None:
        """Record a value the case computed (e.g. "st_ino unchanged by copy-up": True)."""
        self.log.append((label, normalize(value)))

    def note_ino_kept(self, what: str, before: object, after: object) -> None:
        """Record whether an inode number (from ``quiet.ino``) stayed the same."""
        self.note(f"st_ino of {what} unchanged", isinstance(before, int) and before == after)

    def remount(self) -> None:
        """Unmount and mount the same layers and upper again."""
        self.mounted = self.backend.remount(self.mounted)
        self.log.append(("remount", None))


class _Quiet:
    def __init__(self, session: Session) -> None:
        self._session = session

    def __getattr__(self, op: str) -> Callable[..., Any]:
        method = getattr(self._session.fs, op)
        return lambda *args, **kwargs: call_logged(method, *args, **kwargs)


def normalize(value: Any) -> Any:
    """Long byte strings become ``<N bytes #hash>`` so logs and diffs stay readable."""
    if isinstance(value, bytes) and len(value) > 64:
        return f"<{len(value)} bytes #{short_hash(value)}>"
    if isinstance(value, tuple):
        return tuple(normalize(v) for v in value)
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    return value


def _open_flags(flags: int) -> str:
    names = [{os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}[flags & os.O_ACCMODE]]
    names += [n for n in ("O_CREAT", "O_EXCL", "O_TRUNC", "O_APPEND") if flags & getattr(os, n)]
    return "|".join(names)


def _flag_names(table: dict[int, str]) -> Callable[[int], str]:
    return lambda v: "|".join(n for bit, n in table.items() if v & bit) or "0"


# how to show an argument (op -> {position: formatter}) in a log label
_ARG_FORMAT: dict[str, dict[int, Callable[[int], str]]] = {
    "write_file": {2: _open_flags, 3: oct},
    "mkdir": {1: oct},
    "chmod": {1: oct},
    "mkfifo": {1: oct},
    "mknod": {1: oct},
    "rename": {2: _flag_names({1: "RENAME_NOREPLACE", 2: "RENAME_EXCHANGE"})},
    "setxattr": {3: _flag_names({os.XATTR_CREATE: "XATTR_CREATE", os.XATTR_REPLACE: "XATTR_REPLACE"})},
}


def _label(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    formats = _ARG_FORMAT.get(op, {})
    parts = [formats[i](a) if i in formats and isinstance(a, int) else _short(a) for i, a in enumerate(args)]
    parts += [f"{k}={_short(v)}" for k, v in kwargs.items()]
    return f"{op}({', '.join(parts)})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


def new_workspace(root: Path, tag: str) -> Path:
    """A fresh, world-traversable directory below ``root`` (other uids must reach mounts)."""
    path = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=root))
    os.chmod(path, 0o755)
    return path


def run_case(case: Case, backend: Backend, base: Path) -> Log:
    """Build fresh layers under ``base``, mount them with ``backend``, run ``case`` and
    return its observation log (operations, then the tree, then the upper on disk)."""
    lowers = LAYER_SETS[case.layers](base / "layers")
    params = params_for(base, lowers, index=case.index)
    session = Session(backend, backend.mount(params))
    try:
        case.run(session)
        session.log.append(("tree", session.fs.tree()))
    finally:
        backend.unmount(session.mounted)
    assert params.upper is not None
    upper = dump_upper(str(params.upper))
    if case.index:
        # the kernel keeps the other names of a copied-up lower hardlink in work/index (and
        # counts those links), the model links them in the upper: those are compared merged
        # (and the directories copied up only to hold such names)
        only_links = {d for d in upper
                      if any(q.startswith(d + "/") for q in upper)
                      and all(q in CASE_HARDLINK_NAMES for q in upper if q.startswith(d + "/"))}
        upper = {p: dataclasses.replace(n, nlink=None) if isinstance(n, Node) else n
                 for p, n in upper.items() if p not in CASE_HARDLINK_NAMES and p not in only_links}
    session.log.append(("upper", upper))
    return session.log


# --- comparing -------------------------------------------------------------------------


def diff_trees(expected: Tree, actual: Tree, other: str, what: str = "tree", left: str = "kernel") -> list[str]:
    """Per-path differences between two snapshots, ``left`` (expected) against ``other``."""
    out = []
    for path in sorted(set(expected) | set(actual)):
        shown = repr(path) if path else "'' (root)"
        if path not in actual:
            out.append(f"  {what} {shown}: {left} {expected[path]!r}, missing on {other}")
        elif path not in expected:
            out.append(f"  {what} {shown}: absent on {left}, {other} {actual[path]!r}")
        elif expected[path] != actual[path]:
            out.append(f"  {what} {shown}: {left} {expected[path]!r} != {other} {actual[path]!r}")
    return out


def diff_logs(expected: Log, actual: Log, other: str) -> list[str]:
    """Every difference between the kernel's log and ``other``'s, one line each."""
    out: list[str] = []
    for i in range(max(len(expected), len(actual))):
        if i >= len(actual):
            out.append(f"  #{i} {expected[i][0]}: kernel {_short(expected[i][1])}, missing on {other}")
            continue
        if i >= len(expected):
            out.append(f"  #{i} {actual[i][0]}: only on {other}: {_short(actual[i][1])}")
            continue
        (elabel, evalue), (alabel, avalue) = expected[i], actual[i]
        if elabel != alabel:
            out.append(f"  #{i} kernel did {elabel!r} but {other} did {alabel!r} (logs diverge)")
            break
        if elabel in ("tree", "upper") and isinstance(evalue, dict) and isinstance(avalue, dict):
            out.extend(diff_trees(evalue, avalue, other, "merged" if elabel == "tree" else "upper"))
        elif evalue != avalue:
            out.append(f"  #{i} {elabel}: kernel {pprint.pformat(evalue, width=200)} != "
                       f"{other} {pprint.pformat(avalue, width=200)}")
    return out


def format_log(log: Log) -> str:
    lines = []
    for label, value in log:
        if label in ("tree", "upper") and isinstance(value, dict):
            lines.append(f"{label}: {len(value)} entries")
        else:
            lines.append(f"{label} -> {value!r}")
    return "\n".join(lines)


__all__ = ["CASES", "Case", "Log", "Session", "case", "diff_logs", "diff_trees", "errno_name", "run_case"]


# Known divergences from the kernel oracle, each with the reason it cannot be closed now.
# A case listed here is a strict xfail for that backend: it must keep failing (if it starts
# passing, the entry is stale and the test fails), and the reason shows in every run.
KNOWN_DIVERGENCES: dict[tuple[str, str], str] = {
    **{("fallocate_collapse_insert", backend): (
        "the kernel's FUSE module refuses COLLAPSE_RANGE and INSERT_RANGE with EOPNOTSUPP itself "
        "(fuse_file_fallocate passes only KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE to the daemon)"
    ) for backend in ("fuse", "fuse-kernel")},
    **{(name, "fuse"): (
        "pyfuse3 3.5 registers no fallocate handler with libfuse, which answers FALLOCATE with "
        "ENOSYS; the kernel then fails every fallocate on the mount with EOPNOTSUPP (the kernel "
        "transport, backend fuse-kernel, serves it)"
    ) for name in ("fallocate_modes", "fallocate_lower_file")},
}
# the names of the standard layer set's lower hardlink
CASE_HARDLINK_NAMES = ("hl1", "hl2", "dir/hl3")
# names of the stateful test's layer set that are one lower hardlink (their upper entries
# differ: kernel overlayfs with index=on keeps the other names in work/index, the model in the upper)
LOWER_HARDLINK_ALIASES = ("hl", "d/hl")

