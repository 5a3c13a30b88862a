"""Mount descriptions: what to mount, never the mounting itself.

A ``MountSpec`` is layerfs' twin of containerd's ``mount.Mount`` (type, source, options).
The store and the snapshotter *return* these; only ``layerfs.mount`` executes them. This
module is pure: no syscalls, so option building is testable without root.

``snapshot_spec`` is the one rule that turns a snapshot (committed layers, an optional
upper) into a ``MountSpec``; ``MountSpec.as_fuse`` hands the same overlay to FUSE.

FUSE mount types (``is_fuse_type``): ``fuse3.layerfs-fuse`` (``FUSE``) or ``fuse.layerfs-fuse``,
or either prefix before the program's absolute path, ``fuse3./opt/x/.venv/bin/layerfs-fuse``:
``mount.fuse3`` runs everything after the prefix (containerd strips exactly ``fuse3.``) as a
command through /bin/sh with a default PATH, so a description for others to mount names the
program absolutely. Whatever the type says, the mount in /proc/self/mountinfo is
``fuse.layerfs-fuse``: the program sets that subtype itself.

Option strings follow containerd and mount(8):

- overlay: ``lowerdir=TOP:...:BOTTOM`` (top layer first, as overlayfs reads it),
  ``upperdir=U``, ``workdir=W``, ``ro``, and any overlay parameter
  (``index=off``, ``redirect_dir=on``, ``userxattr``, ``volatile``, ``metacopy=on`` ...)
  or mount flag (``nodev``, ``nosuid``, ``noexec`` ...);
- bind: ``rbind`` (or ``bind``), ``ro`` or ``rw``, mount flags.

Layer paths inside ``lowerdir=``/``upperdir=``/``workdir=`` are escaped the way overlayfs
unescapes them: a backslash goes before every backslash, colon and comma in a path
(``/l/a:b`` becomes ``/l/a\\:b``). The escaped form is
what goes into the option strings (and into legacy mount(2) data); ``lowers``, ``upper``
and ``work`` give the plain paths back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from layerfs.errors import InvalidArgument

OVERLAY = "overlay"
BIND = "bind"
FUSE_PROGRAM = "layerfs-fuse"
FUSE = f"fuse3.{FUSE_PROGRAM}"
FUSE_PREFIXES = ("fuse3.", "fuse.")

# Options for every writable overlay layerfs describes (containers, snapshotter actives):
# renaming a directory that comes from a lower layer must work, which overlayfs records as
# a redirect xattr (redirect_dir=on; layerfs.layer.changes and the union view read it), and no
# inode index, so upper directories stay portable between mounts and backends.
WRITABLE_OVERLAY_OPTIONS = ("redirect_dir=on", "index=off")

_LAYER_KEYS = ("lowerdir", "upperdir", "workdir")
_ESCAPED = "\\:,"


def escape_path(path: str) -> str:
    """Escape ``\\``, ``:`` and ``,`` in a layer path for an overlay option string."""
    return "".join("\\" + c if c in _ESCAPED else c for c in path)


def unescape_path(value: str) -> str:
    """Undo ``escape_path`` (overlayfs' rule: a backslash takes the next character as is)."""
    return "".join(_unescaped_chars(value))


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


def split_lowerdir(value: str) -> list[str]:
    """Split a ``lowerdir=`` value at unescaped ``:`` and unescape each path (top first)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(value)
    for c in chars:
        if c == "\\":
            current.append(next(chars, ""))
        elif c == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    if any(p == "" for p in parts):
        # '::' introduces overlayfs data-only layers, which layerfs does not describe
        raise InvalidArgument(
            f"lowerdir={value!r} has an empty layer path (data-only layers are not supported)"
        )
    return parts


def _unescaped_chars(value: str) -> Iterator[str]:
    chars = iter(value)
    for c in chars:
        yield next(chars, "") if c == "\\" else c


def is_fuse_type(fstype: str) -> bool:
    """Whether ``fstype`` is a mount type served by the layerfs-fuse program: a FUSE prefix
    (``fuse3.``, ``fuse.``) before ``layerfs-fuse`` or before an absolute path to it."""
    for prefix in FUSE_PREFIXES:
        if fstype.startswith(prefix):
            program = fstype[len(prefix):]
            return program == FUSE_PROGRAM or (program.startswith("/") and program.rsplit("/", 1)[1] == FUSE_PROGRAM)
    return False


def _check_path(path: str, what: str) -> str:
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"{what} must be a non-empty path, got {path!r}")
    if "\0" in path:
        raise InvalidArgument(f"{what} {path!r} contains a NUL byte")
    if not path.startswith("/"):
        # a description must mean the same thing whatever the executor's cwd is
        raise InvalidArgument(f"{what} {path!r} is not an absolute path")
    return path


def _check_extra(option: str) -> str:
    if not isinstance(option, str) or not option or "," in option or "\0" in option:
        raise InvalidArgument(f"invalid mount option {option!r}: must be one non-empty option without ','")
    key = option.partition("=")[0]
    if key in _LAYER_KEYS or key in ("lowerdir+", "upperdir+", "workdir+", "datadir+"):
        raise InvalidArgument(f"mount option {option!r}: pass layers as arguments, not as extra options")
    if key in ("bind", "rbind"):
        raise InvalidArgument(f"mount option {option!r} makes no sense for an overlay mount")
    return option


def snapshot_spec(
    layers: Sequence[str],
    upper: str | None = None,
    work: str | None = None,
    *,
    readonly: bool = False,
    extra: Sequence[str] = (),
) -> MountSpec:
    """How to mount a snapshot: committed ``layers`` (top first) under an optional ``upper``.

    The one place a snapshot becomes a mount description (image views, containers, and
    the snapshotter's views and active snapshots), with the rules of containerd's overlay
    snapshotter:

    - no layers: a bind mount of ``upper`` (a snapshot without parents is its own
      directory), read-only if ``readonly``;
    - no upper: a read-only view of the layers. One layer is a read-only bind mount of it;
      more are a read-only overlay that follows redirects (``redirect_dir=follow``):
      committed layers may hold redirects (renamed lower directories), followed even where
      the kernel's ``redirect_always_follow`` default is off;
    - layers and an upper (with its ``work`` dir): a writable overlay with
      ``WRITABLE_OVERLAY_OPTIONS`` (and ``ro`` if ``readonly``).

    ``extra`` (mount flags such as ``nodev``, ``nosuid``) is added to whichever it is.
    """
    if isinstance(layers, str):
        raise InvalidArgument("layers must be a sequence of paths, not one string")
    if not layers:
        if upper is None:
            raise InvalidArgument("nothing to mount: no layers and no upper")
        spec = MountSpec.bind(upper, readonly=readonly)
    elif upper is None:
        if not readonly:
            raise InvalidArgument("a view of committed layers without an upper can only be read-only")
        if len(layers) > 1:
            return MountSpec.overlay(layers, readonly=True, extra=("redirect_dir=follow", *extra))
        spec = MountSpec.bind(layers[0], readonly=True)
    else:
        return MountSpec.overlay(layers, upper, work, readonly=readonly, extra=(*WRITABLE_OVERLAY_OPTIONS, *extra))
    return MountSpec(spec.type, spec.source, (*spec.options, *(_check_extra(o) for o in extra)))


@dataclass(frozen=True)
class MountSpec:
    """One mount, described: ``type``, ``source`` and containerd-style ``options``.

    Build with ``MountSpec.overlay`` or ``MountSpec.bind``; the constructor takes the
    fields as they are (for specs that come back from containerd or a test).
    """

    type: str
    source: str
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.type or not self.source:
            raise InvalidArgument(f"mount spec needs a type and a source, got {self.type!r}, {self.source!r}")
        object.__setattr__(self, "options", tuple(self.options))
        for option in self.options:
            if not isinstance(option, str) or "\0" in option:
                raise InvalidArgument(f"invalid mount option {option!r}")

    # --- building ---------------------------------------------------------------------

    @classmethod
    def overlay(
        cls,
        lowers: Sequence[str],
        upper: str | None = None,
        work: str | None = None,
        *,
        readonly: bool = False,
        extra: Sequence[str] = (),
    ) -> MountSpec:
        """An overlay of ``lowers`` (top layer first), writable into ``upper`` if given.

        ``upper`` and ``work`` come together (overlayfs needs a workdir on the upper's
        filesystem). Without an upper the overlay is read-only and gets ``ro``.

        One lower and no upper is not a valid overlay (the kernel wants two lowers for a
        read-only overlay), so, as containerd does, that returns a read-only recursive
        bind mount of the single layer instead.
        """
        if isinstance(lowers, str):
            raise InvalidArgument("lowers must be a sequence of paths, not one string")
        lowers = [_check_path(p, "lower layer") for p in lowers]
        if not lowers:
            raise InvalidArgument("an overlay needs at least one lower layer")
        if (upper is None) != (work is None):
            raise InvalidArgument("upperdir and workdir come together: give both or neither")
        extras = [_check_extra(o) for o in extra]
        if upper is None and len(lowers) == 1:
            return cls.bind(lowers[0], readonly=True)
        options = ["lowerdir=" + ":".join(escape_path(p) for p in lowers)]
        if upper is not None and work is not None:
            options.append("upperdir=" + escape_path(_check_path(upper, "upperdir")))
            options.append("workdir=" + escape_path(_check_path(work, "workdir")))
        if readonly or upper is None:
            options.append("ro")
        options.extend(o for o in dict.fromkeys(extras) if o not in options)
        return cls(OVERLAY, OVERLAY, tuple(options))

    @classmethod
    def bind(cls, source: str, readonly: bool) -> MountSpec:
        """A recursive bind mount of ``source``, read-only if asked (``ro``/``rw`` + ``rbind``)."""
        _check_path(source, "bind source")
        return cls(BIND, source, ("ro" if readonly else "rw", "rbind"))

    @classmethod
    def from_containerd(cls, mount: Mapping[str, Any]) -> MountSpec:
        """Inverse of ``to_containerd``: ``{"type", "source", "options"}``."""
        try:
            return cls(str(mount["type"]), str(mount["source"]), tuple(mount.get("options") or ()))
        except KeyError as e:
            raise InvalidArgument(f"mount description lacks {e.args[0]!r}: {dict(mount)!r}") from e

    def as_fuse(self, program: str | None = None) -> MountSpec:
        """The same overlay for the FUSE backend, fuse-overlayfs' options: type
        ``fuse3.PROGRAM`` with ``program`` the absolute path of layerfs-fuse (what a mount
        helper can run without a PATH), or ``fuse3.layerfs-fuse`` without one."""
        if self.type != OVERLAY:
            raise InvalidArgument(f"only an overlay can be served by FUSE, not a {self.type} mount")
        if program is None:
            return MountSpec(FUSE, "layerfs", self.options)
        fstype = f"{FUSE_PREFIXES[0]}{_check_path(program, 'FUSE program')}"
        if not is_fuse_type(fstype):
            raise InvalidArgument(f"FUSE program {program!r} is not named {FUSE_PROGRAM}")
        return MountSpec(fstype, "layerfs", self.options)

    # --- reading back -----------------------------------------------------------------

    def option_value(self, key: str) -> str | None:
        """The raw (still escaped) value of the last ``key=value`` option, or None."""
        found = None
        for option in self.options:
            k, sep, v = option.partition("=")
            if sep and k == key:
                found = v
        return found

    def has_option(self, flag: str) -> bool:
        return flag in self.options

    @property
    def lowers(self) -> tuple[str, ...]:
        """Lower layer paths, top first, unescaped (empty for a bind mount)."""
        value = self.option_value("lowerdir")
        return tuple(split_lowerdir(value)) if value is not None else ()

    @property
    def upper(self) -> str | None:
        value = self.option_value("upperdir")
        return unescape_path(value) if value is not None else None

    @property
    def work(self) -> str | None:
        value = self.option_value("workdir")
        return unescape_path(value) if value is not None else None

    @property
    def readonly(self) -> bool:
        """``ro`` is set, or an overlay without upperdir (which can only be read-only)."""
        if "ro" in self.options:
            return True
        return self.type != BIND and self.upper is None

    @property
    def recursive(self) -> bool:
        """For a bind mount: ``rbind`` (submounts come along) rather than ``bind``."""
        return "rbind" in self.options

    # --- export -----------------------------------------------------------------------

    def to_containerd(self) -> dict[str, Any]:
        """``{"type", "source", "options": [...]}`` as containerd's ``types.Mount`` carries it."""
        return {"type": self.type, "source": self.source, "options": list(self.options)}

    def __str__(self) -> str:
        return f"{self.type} {self.source} -o {','.join(self.options)}"
