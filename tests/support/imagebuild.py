"""Build real container images for tests, with the real tools or by hand.

Nothing here reaches a registry and nothing is cached: every function writes only under the
paths its caller passes (pytest tmp dirs), and the tools get ``TMPDIR`` pointed there too.

Tool-made images (mark tests ``needs_umoci`` / ``needs_skopeo`` from ``tests.support.markers``):

- ``build_busybox_image(workdir, layout, tag, layers)``: ``umoci init/new``, then per
  ``Layer`` one ``umoci unpack`` -> change ``bundle/rootfs`` -> ``umoci repack`` (or a
  verbatim ``umoci raw add-layer`` of a hand-made tar), then ``umoci config``.
- ``to_docker_archive``/``to_oci_archive``: ``skopeo copy oci:L:TAG docker-archive:/oci-archive:``.

Hand-made images (pure Python, for what the tools will not write):

- ``tar_bytes``/``layer_tar``/``read_tar``: deterministic tars (and reading one back), with ``Symlink``, ``Hardlink``, ``Dir``,
  ``whiteout()`` and ``opaque()`` entries (umoci never writes an opaque-dir marker: a
  deleted and recreated directory becomes one ``.wh.`` file per old child).
- ``add_image``/``add_index``/``set_index``: an OCI layout blob by blob;
  ``build_multiplatform_layout`` puts several platforms behind one tag.
- ``build_old_docker_archive``: ``docker save`` before Docker 25 (``<id>/layer.tar``,
  ``<id>/json``, ``<id>/VERSION``, a repeated layer's ``layer.tar`` linked to the first).
- ``build_docker25_archive``: an OCI layout plus ``manifest.json``, as Docker >= 25 saves.
- ``tar_directory``: a deterministic tar of a layout directory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
BUSYBOX = "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "true")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def run(*args: str | os.PathLike[str], cwd: Path | None = None, tmpdir: Path | None = None) -> str:
    """Run a tool; on failure raise with its stderr so the test report says why."""
    env = dict(os.environ)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)  # skopeo stages big files in $TMPDIR (default /var/tmp)
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


# -- tars ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Hardlink:
    target: str  # named from the tar's root, as tar hardlinks are


Entry = bytes | str | Dir | Symlink | Hardlink


def whiteout(path: str) -> str:
    """The OCI whiteout entry name that deletes ``path`` (``a/b`` -> ``a/.wh.b``)."""
    head, _, name = path.rstrip("/").rpartition("/")
    return f"{head}/.wh.{name}" if head else f".wh.{name}"


def opaque(directory: str) -> str:
    """The OCI marker entry that makes ``directory`` opaque (hides all lower content)."""
    return f"{directory.rstrip('/')}/.wh..wh..opq"


def tar_bytes(
    entries: Mapping[str, Entry] | Iterable[tuple[str, Entry]], *, add_parents: bool = True
) -> bytes:
    """A deterministic tar (mtime 0, root owned) of ``entries`` in the order given.

    ``str``/``bytes`` values are regular files. With ``add_parents``, missing parent
    directories are inserted before their first child.
    """
    items = list(entries.items()) if isinstance(entries, Mapping) else list(entries)
    buf = io.BytesIO()
    seen: set[str] = set()
    listed = {name for name, _ in items}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, value in items:
            if add_parents:
                parts = name.strip("/").split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    parent = "/".join(parts[:i])
                    if parent not in seen and parent not in listed:
                        seen.add(parent)
                        tar.addfile(_ti(parent, Dir()))
            seen.add(name)
            data = value.encode() if isinstance(value, str) else value
            if isinstance(data, bytes):
                tar.addfile(_ti(name, data), io.BytesIO(data))
            else:
                tar.addfile(_ti(name, data))
    return buf.getvalue()


def _ti(name: str, value: bytes | Dir | Symlink | Hardlink) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode = 0, 0, 0, "", "", 0o644
    if isinstance(value, bytes):
        ti.size = len(value)
    elif isinstance(value, Dir):
        ti.type, ti.mode = tarfile.DIRTYPE, value.mode
    elif isinstance(value, Symlink):
        ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, value.target, 0o777
    else:
        ti.type, ti.linkname = tarfile.LNKTYPE, value.target
    return ti


def read_tar(path: Path) -> list[tuple[str, Entry]]:
    """A tar's members as ``tar_bytes`` entries (to tamper with and write back)."""
    out: list[tuple[str, Entry]] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if m.isdir():
                out.append((m.name, Dir(m.mode)))
            elif m.issym():
                out.append((m.name, Symlink(m.linkname)))
            elif m.islnk():
                out.append((m.name, Hardlink(m.linkname)))
            else:
                f = tar.extractfile(m)
                assert f is not None, m.name
                out.append((m.name, f.read()))
    return out


def layer_tar(entries: Mapping[str, Entry]) -> bytes:
    """An uncompressed layer tar; see ``tar_bytes``, ``whiteout`` and ``opaque``."""
    return tar_bytes(entries)


def write_tar(out: Path, entries: Mapping[str, Entry] | Iterable[tuple[str, Entry]], **kw: Any) -> Path:
    out.write_bytes(tar_bytes(entries, **kw))
    return out


def tar_directory(src: Path, out: Path, *, gzipped: bool = False) -> Path:
    """A deterministic tar of the tree under ``src`` (names relative to it)."""
    entries: list[tuple[str, Entry]] = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        rel = os.path.relpath(root, src)
        if rel != ".":
            entries.append((rel, Dir()))
        for f in sorted(files):
            path = os.path.join(root, f)
            name = os.path.normpath(os.path.join(rel, f))
            entries.append(
                (name, Symlink(os.readlink(path)) if os.path.islink(path) else Path(path).read_bytes())
            )
    data = tar_bytes(entries, add_parents=False)
    out.write_bytes(gzip.compress(data, mtime=0) if gzipped else data)
    return out


# -- OCI layouts by hand -------------------------------------------------------------------


def _put_blob(layout: Path, data: bytes) -> str:
    digest = sha256(data)
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest[7:]).write_bytes(data)
    if not (layout / "oci-layout").exists():
        (layout / "oci-layout").write_bytes(compact({"imageLayoutVersion": "1.0.0"}))
    return digest


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def add_image(
    layout: Path,
    layers: Sequence[bytes],
    *,
    platform: str = "linux/amd64",
    gzipped: bool = True,
    descriptor_platform: bool = True,
    config_extra: Mapping[str, Any] | None = None,
    layer_media_type: str | None = None,
) -> dict[str, Any]:
    """Write one image's blobs (layers, config, manifest) into ``layout``.

    ``layers`` are uncompressed layer tars. Returns the manifest descriptor for
    ``set_index``/``add_index`` (with ``platform`` unless ``descriptor_platform`` is False).
    """
    os_, arch, *variant = platform.split("/")
    config: dict[str, Any] = {
        "architecture": arch,
        "os": os_,
        **({"variant": variant[0]} if variant else {}),
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
        **(config_extra or {}),
    }
    layer_descs = []
    for layer in layers:
        blob = gzip.compress(layer, mtime=0) if gzipped else layer
        media_type = layer_media_type or (OCI_LAYER_GZIP if gzipped else OCI_LAYER)
        layer_descs.append({"mediaType": media_type, "digest": _put_blob(layout, blob), "size": len(blob)})
    config_bytes = compact(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": _put_blob(layout, config_bytes),
            "size": len(config_bytes),
        },
        "layers": layer_descs,
    }
    manifest_bytes = compact(manifest)
    desc: dict[str, Any] = {
        "mediaType": OCI_MANIFEST,
        "digest": _put_blob(layout, manifest_bytes),
        "size": len(manifest_bytes),
    }
    if descriptor_platform:
        desc["platform"] = {"os": os_, "architecture": arch, **({"variant": variant[0]} if variant else {})}
    return desc


def add_index(layout: Path, manifests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Write a nested image index blob listing ``manifests``; returns its descriptor."""
    data = compact({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(manifests)})
    return {"mediaType": OCI_INDEX, "digest": _put_blob(layout, data), "size": len(data)}


def set_index(layout: Path, entries: Sequence[tuple[Mapping[str, Any], Mapping[str, str] | None]]) -> Path:
    """Write ``index.json``: one entry per (descriptor, annotations or None)."""
    manifests = [{**desc, **({"annotations": dict(ann)} if ann else {})} for desc, ann in entries]
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "index.json").write_bytes(compact({"schemaVersion": 2, "manifests": manifests}))
    if not (layout / "oci-layout").exists():
        (layout / "oci-layout").write_bytes(compact({"imageLayoutVersion": "1.0.0"}))
    return layout


def platform_layer(platform: str) -> bytes:
    """A small layer that says which platform it is for (``etc/platform``)."""
    return layer_tar({"etc/platform": platform + "\n"})


def build_multiplatform_layout(
    layout: Path,
    platforms: Sequence[str] = ("linux/amd64", "linux/arm64/v8", "linux/arm/v7"),
    *,
    tag: str = "latest",
    nested: bool = True,
    descriptor_platform: bool = True,
) -> Path:
    """One image per platform behind ``tag``: in a nested index (as ``skopeo copy --all``
    and buildx write it), or as sibling ``index.json`` entries sharing the tag."""
    descs = [
        add_image(layout, [platform_layer(p)], platform=p, descriptor_platform=descriptor_platform)
        for p in platforms
    ]
    if nested:
        return set_index(layout, [(add_index(layout, descs), {REF_NAME: tag})])
    return set_index(layout, [(d, {REF_NAME: tag}) for d in descs])


# -- docker archives by hand ---------------------------------------------------------------


def _docker_config(layers: Sequence[bytes], platform: str) -> bytes:
    os_, arch, *_ = platform.split("/")
    return compact(
        {
            "architecture": arch,
            "os": os_,
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
            "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
        }
    )


def build_old_docker_archive(
    out: Path,
    layers: Sequence[bytes],
    *,
    repo_tags: Sequence[str] = ("old/image:1.0",),
    link: str | None = "symlink",
    platform: str = "linux/amd64",
) -> Path:
    """A ``docker save`` archive from before Docker 25.

    Each layer gets a v1 id directory with ``layer.tar``, ``json`` and ``VERSION``. When a
    layer's content repeats an earlier one and ``link`` is ``"symlink"`` (``../<id>/layer.tar``)
    or ``"hardlink"``, its ``layer.tar`` links to the first copy, as docker and skopeo write it.
    """
    config = _docker_config(layers, platform)
    config_name = sha256(config)[7:] + ".json"
    entries: list[tuple[str, Entry]] = [(config_name, config)]
    first_copy: dict[str, str] = {}
    ids: list[str] = []
    parent = ""
    for layer in layers:
        diff_id = sha256(layer)
        v1_id = hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()  # chain-like, unique per position
        ids.append(v1_id)
        entries += [
            (v1_id, Dir()),
            (f"{v1_id}/VERSION", b"1.0"),
            (f"{v1_id}/json", compact({"id": v1_id, **({"parent": parent} if parent else {})})),
        ]
        if link and diff_id in first_copy:
            target = first_copy[diff_id]
            value: Entry = Symlink(f"../{target}") if link == "symlink" else Hardlink(target)
            entries.append((f"{v1_id}/layer.tar", value))
        else:
            first_copy[diff_id] = f"{v1_id}/layer.tar"
            entries.append((f"{v1_id}/layer.tar", layer))
        parent = v1_id
    manifest = [
        {
            "Config": config_name,
            "RepoTags": list(repo_tags) or None,
            "Layers": [f"{i}/layer.tar" for i in ids],
        }
    ]
    repositories: dict[str, dict[str, str]] = {}
    for ref in repo_tags:
        repo, _, tag = ref.rpartition(":")
        repositories.setdefault(repo, {})[tag] = ids[-1]
    entries += [("manifest.json", compact(manifest)), ("repositories", compact(repositories))]
    return write_tar(out, entries, add_parents=False)


def _docker_full_name(ref: str) -> str:
    """docker's normal form (``busybox:1`` -> ``docker.io/library/busybox:1``), as Docker 25
    writes it into ``io.containerd.image.name``."""
    first, slash, _ = ref.partition("/")
    if not slash:
        return f"docker.io/library/{ref}"
    if "." in first or ":" in first or first == "localhost":
        return ref
    return f"docker.io/{ref}"


def build_docker25_archive(
    out: Path,
    layers: Sequence[bytes],
    *,
    repo_tags: Sequence[str] = ("busybox:latest",),
    platform: str = "linux/amd64",
) -> Path:
    """A Docker >= 25 ``docker save``: an OCI layout (uncompressed layers, containerd name
    annotations) that is also a docker archive (``manifest.json`` with ``blobs/`` paths)."""
    layout = out.parent / (out.name + ".d")
    desc = add_image(layout, layers, platform=platform, gzipped=False, descriptor_platform=False)
    manifest = json.loads(blob_path(layout, desc["digest"]).read_bytes())
    set_index(
        layout,
        [(desc, {CONTAINERD_NAME: _docker_full_name(t), REF_NAME: t.rpartition(":")[2]}) for t in repo_tags]
        or [(desc, None)],
    )
    entry = {
        "Config": "blobs/sha256/" + manifest["config"]["digest"][7:],
        "RepoTags": list(repo_tags) or None,
        "Layers": ["blobs/sha256/" + layer["digest"][7:] for layer in manifest["layers"]],
    }
    (layout / "manifest.json").write_bytes(compact([entry]))
    (layout / "repositories").write_bytes(
        compact({t.rpartition(":")[0]: {t.rpartition(":")[2]: entry["Layers"][-1][13:]} for t in repo_tags})
    )
    tar_directory(layout, out)
    shutil.rmtree(layout)
    return out


# -- images made by umoci and skopeo -------------------------------------------------------


@dataclass
class Layer:
    """The changes of one layer. A plain ``Layer`` is one ``umoci repack`` of an unpacked
    bundle; with ``raw_tar`` the tar is added verbatim instead (``umoci raw add-layer``)."""

    files: Mapping[str, bytes | str] = field(default_factory=dict)  # path -> content
    symlinks: Mapping[str, str] = field(default_factory=dict)  # path -> target
    dirs: Sequence[str] = ()
    delete: Sequence[str] = ()  # -> whiteouts
    recreate: Sequence[str] = ()  # directories deleted and made again, empty
    busybox: bool = False  # /bin/busybox and a few applet links (sh, ls, ...)
    edit: Callable[[Path], None] | None = None  # anything else, given the rootfs
    raw_tar: bytes | None = None
    created_by: str | None = None  # the history entry's created_by


DEFAULT_LAYERS = (
    Layer(busybox=True, dirs=["etc", "tmp"], created_by="COPY busybox /bin/"),
    Layer(files={"etc/hello.txt": "hello\n"}, created_by="RUN echo hello > /etc/hello.txt"),
)


def _apply(rootfs: Path, layer: Layer) -> None:
    if layer.busybox:
        (rootfs / "bin").mkdir(exist_ok=True)
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in BUSYBOX_APPLETS:
            (rootfs / "bin" / applet).symlink_to("busybox")
    for d in layer.dirs:
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    for path in layer.delete:
        target = rootfs / path
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    for path in layer.recreate:
        shutil.rmtree(rootfs / path)
        (rootfs / path).mkdir()
    for path, content in layer.files.items():
        (rootfs / path).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / path).write_bytes(content.encode() if isinstance(content, str) else content)
    for path, link_target in layer.symlinks.items():
        (rootfs / path).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / path).symlink_to(link_target)
    if layer.edit is not None:
        layer.edit(rootfs)


def build_busybox_image(
    workdir: Path,
    layout: Path | None = None,
    tag: str = "latest",
    layers: Sequence[Layer] = DEFAULT_LAYERS,
    *,
    base_tag: str | None = None,
    cmd: Sequence[str] | None = ("/bin/sh",),
    config_args: Sequence[str] = (),
) -> Path:
    """Build ``layout:tag`` with umoci, one layer per ``Layer``; returns the layout path.

    The layout is created if missing (so several calls can add tags to one layout).
    ``base_tag`` starts from an existing tag instead of an empty image. ``cmd`` and
    ``config_args`` (raw ``umoci config`` flags) are applied last, with their own history.
    Works unprivileged too (``--rootless``), but ownership then is the caller's.
    """
    layout = layout or workdir / "layout"
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    image = f"{layout}:{tag}"
    if not (layout / "oci-layout").exists():
        run("umoci", "init", "--layout", layout)
    if base_tag:
        run("umoci", "tag", "--image", f"{layout}:{base_tag}", tag)
    else:
        run("umoci", "new", "--image", image)
    for n, layer in enumerate(layers):
        history = ["--history.created_by", layer.created_by] if layer.created_by else []
        if layer.raw_tar is not None:
            tar = workdir / f"raw-{tag}-{n}.tar"
            tar.write_bytes(layer.raw_tar)
            run("umoci", "raw", "add-layer", *history, "--image", image, tar)
            tar.unlink()
            continue
        bundle = workdir / f"bundle-{tag}-{n}"
        run("umoci", "unpack", *rootless, "--image", image, bundle)
        _apply(bundle / "rootfs", layer)
        run("umoci", "repack", *history, "--image", image, bundle)
        shutil.rmtree(bundle)
    args = [*config_args]
    for arg in cmd or ():
        args += ["--config.cmd", arg]
    if args:
        run("umoci", "config", "--image", image, *args)
    run("umoci", "gc", "--layout", layout)  # drop the intermediate manifests and configs
    return layout


def to_docker_archive(layout: Path, tag: str, out: Path, name: str) -> Path:
    """``skopeo copy oci:LAYOUT:TAG docker-archive:OUT:NAME`` (skopeo writes docker's normal
    form into RepoTags: ``foo/bar:v1`` -> ``docker.io/foo/bar:v1``)."""
    run(
        "skopeo", "--insecure-policy", "copy", "-q", f"oci:{layout}:{tag}", f"docker-archive:{out}:{name}",
        tmpdir=out.parent,
    )  # fmt: skip
    return out


def to_oci_archive(layout: Path, tag: str, out: Path) -> Path:
    """``skopeo copy oci:LAYOUT:TAG oci-archive:OUT:TAG``: a tar of a layout."""
    run(
        "skopeo",
        "--insecure-policy",
        "copy",
        "-q",
        f"oci:{layout}:{tag}",
        f"oci-archive:{out}:{tag}",
        tmpdir=out.parent,
    )
    return out


def skopeo_inspect(transport_ref: str, *, raw: bool = False) -> dict[str, Any]:
    """``skopeo inspect [--raw] REF`` parsed (no network: local transports only)."""
    args = ["skopeo", "--insecure-policy", "inspect", *(["--raw"] if raw else []), transport_ref]
    return json.loads(run(*args))
