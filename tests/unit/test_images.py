"""Image formats in and out (layerfs.image), against images built by umoci/skopeo and by hand."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from layerfs.digest import Digest, VerifyingReader
from layerfs.errors import (
    AlreadyExists,
    DigestMismatch,
    FailedPrecondition,
    InvalidArgument,
    InvalidImage,
    NotFound,
)
from layerfs.image.oci import DOCKER_LAYER, DOCKER_LAYER_GZIP, OCI_LAYER, OCI_MANIFEST, Platform, entry_name
from layerfs.image.ref import repo_name_from_path
from layerfs.image.source import (
    ExportImage,
    ExportLayer,
    ImageSource,
    LayerBlob,
    ResolvedImage,
    export_docker_archive,
    export_oci,
    normalize_ref,
    open_source,
    synthesize_manifest,
)
from tests.support import imagebuild as ib
from tests.support.markers import IS_ROOT, needs_skopeo, needs_umoci

LAYER_A = ib.layer_tar({"a.txt": "a\n", "etc/os-release": "ID=layerfs\n"})
LAYER_B = ib.layer_tar({"b.txt": "b\n", ib.whiteout("a.txt"): b"", ib.opaque("etc"): b""})


def _read(layer_blob: LayerBlob) -> bytes:
    with layer_blob.open() as f:
        reader = VerifyingReader(f, "layer", layer_blob.digest, layer_blob.size)
        data = reader.read()
        reader.verify()
    return data


def _uncompressed(data: bytes, media_type: str) -> bytes:
    if media_type.endswith("gzip"):
        return gzip.decompress(data)
    if media_type.endswith("zstd"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _check_diff_ids(img: ResolvedImage) -> None:
    """Every layer decompresses to the tar its config's diff_id names."""
    for layer, diff_id in zip(img.layers, img.diff_ids, strict=True):
        assert Digest.of(_uncompressed(_read(layer), layer.media_type)) == diff_id


def _export_of(img: ResolvedImage) -> ExportImage:
    manifest = img.manifest_bytes
    digests = [layer.digest or diff_id for layer, diff_id in zip(img.layers, img.diff_ids, strict=True)]
    if manifest is None:  # old docker archive: its layer.tars are uncompressed, so digest = diffID
        manifest = synthesize_manifest(
            img.config_bytes,
            [(d, layer.size or 0, layer.media_type) for d, layer in zip(digests, img.layers, strict=True)],
        )
    media_types = [layer["mediaType"] for layer in json.loads(manifest)["layers"]]
    layers = [
        ExportLayer(d, layer.size or 0, mt, diff_id, layer.open)
        for d, mt, layer, diff_id in zip(digests, media_types, img.layers, img.diff_ids, strict=True)
    ]
    return ExportImage(list(img.names), manifest, img.config_bytes, layers)


_OPEN: list[ImageSource] = []


@pytest.fixture(autouse=True)
def _close_sources() -> Iterator[None]:
    """Sources opened by ``_images`` stay open for the test (layers are read later)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def _images(path: Path, platform: str | None = None, check: bool = True) -> list[ResolvedImage]:
    src = open_source(str(path))
    _OPEN.append(src)
    images = src.images(platform)
    for img in images if check else ():
        _check_diff_ids(img)
    return images


# -- images built with umoci and skopeo ----------------------------------------------------


@pytest.fixture(scope="module")
def umoci_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bb-oci:latest (busybox + a file) and bb-oci:v2 (deletes, a recreated dir, an opaque dir)."""
    if shutil.which("umoci") is None:
        pytest.skip("umoci not installed")
    work = tmp_path_factory.mktemp("umoci")
    layout = ib.build_busybox_image(work, work / "bb-oci")
    v2_layers = [
        ib.Layer(delete=["etc/hello.txt"], recreate=["tmp"], files={"tmp/new": "new\n"}, created_by="RUN rm"),
        ib.Layer(raw_tar=ib.layer_tar({ib.opaque("etc"): b"", "etc/motd": "hi\n"}), created_by="ADD etc"),
    ]
    return ib.build_busybox_image(work, layout, tag="v2", base_tag="latest", layers=v2_layers)


def _index_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    return next(m["digest"] for m in index["manifests"] if m["annotations"][ib.REF_NAME] == tag)


@needs_umoci
def test_umoci_layout_dir(umoci_layout: Path) -> None:
    with open_source(str(umoci_layout)) as src:
        assert src.format == "oci-layout"
    images = {tuple(img.names): img for img in _images(umoci_layout)}
    assert set(images) == {("bb-oci:latest",), ("bb-oci:v2",)}
    latest, v2 = images[("bb-oci:latest",)], images[("bb-oci:v2",)]
    assert latest.manifest_digest == _index_digest(umoci_layout, "latest")
    assert latest.config_digest == Digest.of(latest.config_bytes)
    assert latest.config["config"]["Cmd"] == ["/bin/sh"]
    assert latest.platform == str(Platform.host())
    assert [h.get("created_by") for h in latest.config["history"]][:2] == [
        "COPY busybox /bin/",
        "RUN echo hello > /etc/hello.txt",
    ]
    assert len(latest.layers) == 2 and len(v2.layers) == 4
    assert v2.layers[:2] == latest.layers  # v2 is built on latest: same blobs
    assert all(layer.media_type == "application/vnd.oci.image.layer.v1.tar+gzip" for layer in v2.layers)
    for img in images.values():
        _check_diff_ids(img)
    top = tarfile.open(fileobj=io.BytesIO(gzip.decompress(_read(v2.layers[3]))))
    assert "etc/.wh..wh..opq" in top.getnames()


@needs_umoci
def test_layout_as_plain_and_gzipped_tar(umoci_layout: Path, tmp_path: Path) -> None:
    expected = {img.manifest_digest for img in _images(umoci_layout)}
    for out in (tmp_path / "bb.tar", tmp_path / "bb.tar.gz"):
        ib.tar_directory(umoci_layout, out, gzipped=out.suffix == ".gz")
        images = _images(out)
        assert {img.manifest_digest for img in images} == expected
        assert sorted(n for img in images for n in img.names) == ["bb:latest", "bb:v2"]


def test_zstd_outer_archive_is_refused(tmp_path: Path) -> None:
    layout = ib.set_index(tmp_path / "l", [(ib.add_image(tmp_path / "l", [LAYER_A]), None)])
    plain = ib.tar_directory(layout, tmp_path / "l.tar").read_bytes()
    (tmp_path / "l.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    with pytest.raises(InvalidImage, match="zstd-compressed; decompress it first"):
        open_source(str(tmp_path / "l.tar.zst"))


@needs_umoci
@needs_skopeo
def test_skopeo_oci_archive(umoci_layout: Path, tmp_path: Path) -> None:
    out = ib.to_oci_archive(umoci_layout, "v2", tmp_path / "bb-archive.tar")
    [img] = _images(out)
    assert img.names == ["bb-archive:v2"]
    [orig] = [i for i in _images(umoci_layout) if i.names == ["bb-oci:v2"]]
    assert [layer.digest for layer in img.layers] == [layer.digest for layer in orig.layers]


@needs_umoci
@needs_skopeo
def test_skopeo_docker_archive(umoci_layout: Path, tmp_path: Path) -> None:
    out = ib.to_docker_archive(umoci_layout, "latest", tmp_path / "da.tar", "foo/bar:v1")
    with open_source(str(out)) as src:
        assert src.format == "docker-archive"
        [img] = src.images()
        _check_diff_ids(img)
        # skopeo writes docker's normal form; we keep names as the archive has them.
        assert img.names == ["docker.io/foo/bar:v1"]
        assert img.manifest_bytes is None and img.manifest_digest is None
        assert all(layer.digest is None and layer.media_type == DOCKER_LAYER for layer in img.layers)
        assert [Digest.of(_read(layer)) for layer in img.layers] == img.diff_ids
        [orig] = [i for i in _images(umoci_layout) if i.names == ["bb-oci:latest"]]
        assert img.config_digest == orig.config_digest  # the image ID survives the copy


# -- docker archives by hand ---------------------------------------------------------------


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_old_docker_archive_with_linked_layer(tmp_path: Path, link: str) -> None:
    out = ib.build_old_docker_archive(tmp_path / "old.tar", [LAYER_A, LAYER_B, LAYER_A], link=link)
    assert any(
        name.endswith("layer.tar") and isinstance(v, ib.Symlink | ib.Hardlink) for name, v in ib.read_tar(out)
    )
    for path in (out, _unpack(out, tmp_path / "old-dir")):
        with open_source(str(path)) as src:
            [img] = src.images()
            assert img.names == ["old/image:1.0"]
            assert img.manifest_bytes is None
            assert [layer.digest for layer in img.layers] == [None, None, None]
            assert [layer.size for layer in img.layers] == [len(LAYER_A), len(LAYER_B), len(LAYER_A)]
            assert _read(img.layers[2]) == LAYER_A
            if path == out or link == "symlink":  # unpacked, a hardlink is just another file
                assert img.layers[2].location == img.layers[0].location  # resolved to the first copy
        with pytest.raises(FailedPrecondition, match="closed"):
            img.layers[0].open()


def _unpack(archive: Path, dest: Path) -> Path:
    """Unpack a trusted test archive with the system tar (symlinks and hardlinks included)."""
    dest.mkdir()
    ib.run("tar", "-xf", archive, "-C", dest)
    return dest


def test_old_docker_archive_gzip_layer_is_sniffed(tmp_path: Path) -> None:
    out = ib.build_old_docker_archive(tmp_path / "old.tar", [LAYER_A], link=None)
    entries = [
        (n, gzip.compress(v, mtime=0) if n.endswith("layer.tar") and isinstance(v, bytes) else v)
        for n, v in ib.read_tar(out)
    ]
    [img] = _images(ib.write_tar(tmp_path / "gz.tar", entries, add_parents=False))
    assert img.layers[0].media_type == DOCKER_LAYER_GZIP


@pytest.mark.parametrize(
    ("links", "message"),
    [
        ({"x/layer.tar": ib.Symlink("../../outside.tar")}, "outside the archive"),
        ({"x/layer.tar": ib.Symlink("/etc/passwd")}, "absolute path"),
        ({"x/layer.tar": ib.Symlink("../y/layer.tar"), "y/layer.tar": ib.Symlink("../x/layer.tar")}, "loop"),
        ({"x/layer.tar": ib.Hardlink("x/layer.tar")}, "loop"),
    ],
)
def test_docker_archive_links_stay_inside(tmp_path: Path, links: dict[str, ib.Entry], message: str) -> None:
    config = ib.compact(
        {
            "os": "linux",
            "architecture": "amd64",
            "rootfs": {"type": "layers", "diff_ids": [ib.sha256(LAYER_A)]},
        }
    )
    manifest = [{"Config": "config.json", "RepoTags": ["evil:1"], "Layers": ["x/layer.tar"]}]
    entries = {"config.json": config, "manifest.json": ib.compact(manifest), **links}
    out = ib.write_tar(tmp_path / "evil.tar", entries)
    with open_source(str(out)) as src, pytest.raises(InvalidImage, match=message):
        src.images()


def test_docker_archive_errors(tmp_path: Path) -> None:
    out = ib.build_old_docker_archive(tmp_path / "old.tar", [LAYER_A], link=None)
    entries = ib.read_tar(out)
    config_name = json.loads(dict(entries)["manifest.json"])[0]["Config"]  # type: ignore[arg-type]
    # a config whose content-addressed name it does not match
    bad = [(n, v + b" " if n == config_name and isinstance(v, bytes) else v) for n, v in entries]
    with open_source(str(ib.write_tar(tmp_path / "bad.tar", bad, add_parents=False))) as src:
        with pytest.raises(DigestMismatch, match=f"config sha256:{config_name[:64]}"):
            src.images()
    # a missing layer
    gone = [(n, v) for n, v in entries if not n.endswith("layer.tar")]
    with open_source(str(ib.write_tar(tmp_path / "gone.tar", gone, add_parents=False))) as src:
        with pytest.raises(InvalidImage, match="layer 0 .* is missing"):
            src.images()
    # neither format
    with pytest.raises(InvalidImage, match="neither an OCI image layout"):
        open_source(str(ib.write_tar(tmp_path / "none.tar", {"hello": "x"})))
    with pytest.raises(NotFound):
        open_source(str(tmp_path / "does-not-exist.tar"))


def test_docker25_archive(tmp_path: Path) -> None:
    out = ib.build_docker25_archive(
        tmp_path / "d25.tar", [LAYER_A, LAYER_B], repo_tags=["busybox:latest", "bb:1"]
    )
    with open_source(str(out)) as src:
        assert src.format == "docker-archive"
        [img] = src.images()
        _check_diff_ids(img)
    assert img.names == ["busybox:latest", "bb:1"]  # RepoTags, not the index's docker.io/library/...
    assert img.manifest_bytes is not None and img.manifest_digest == Digest.of(img.manifest_bytes)
    assert [layer.digest for layer in img.layers] == img.diff_ids  # Docker 25 stores layers uncompressed
    assert all(layer.media_type == OCI_LAYER for layer in img.layers)


# -- multi-platform ------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [True, False])
def test_platform_selection(tmp_path: Path, nested: bool) -> None:
    layout = ib.build_multiplatform_layout(tmp_path / "multi", nested=nested)

    def pick(platform: str | None) -> str:
        [img] = _images(layout, platform)
        assert img.names == ["multi:latest"]
        return f"{img.config['os']}/{img.config['architecture']}/{img.config.get('variant', '')}".rstrip("/")

    assert pick("linux/arm64") == "linux/arm64/v8"  # arm64 means arm64/v8
    assert pick("linux/aarch64/v8") == "linux/arm64/v8"
    assert pick("linux/arm/v7") == "linux/arm/v7"
    assert pick("linux/arm/v8") == "linux/arm/v7"  # armv8 runs v7 binaries
    assert pick("linux/amd64") == "linux/amd64"
    if Platform.host().architecture in ("amd64", "arm64"):
        assert pick(None).startswith(f"linux/{Platform.host().architecture}")
    with pytest.raises(NotFound, match=r"linux/s390x; available: linux/amd64, linux/arm/v7, linux/arm64"):
        _images(layout, "linux/s390x")
    with pytest.raises(NotFound, match="linux/arm/v6"):
        _images(layout, "linux/arm/v6")  # v6 cannot run v7
    with pytest.raises(InvalidArgument, match="os/arch"):
        _images(layout, "amd64")


def test_attestation_manifests_are_not_images(tmp_path: Path) -> None:
    layout = tmp_path / "attested"
    image = ib.add_image(layout, [LAYER_A], platform="linux/arm64")
    attestation = {
        **ib.add_image(layout, [LAYER_B], platform="unknown/unknown"),
        "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
    }
    ib.set_index(layout, [(ib.add_index(layout, [image, attestation]), {ib.REF_NAME: "1"})])
    with pytest.raises(NotFound, match=r"available: linux/arm64$"):
        _images(layout, "linux/amd64")
    [img] = _images(layout, "linux/arm64")
    assert img.names == ["attested:1"]


def test_artifacts_beside_images_are_skipped(tmp_path: Path) -> None:
    layout = tmp_path / "signed"
    image = ib.add_image(layout, [LAYER_A], descriptor_platform=False)
    sig = ib.add_image(layout, [LAYER_B], descriptor_platform=False)
    manifest = json.loads(ib.blob_path(layout, sig["digest"]).read_bytes())
    manifest["config"]["mediaType"] = "application/vnd.dev.cosign.simplesigning.v1+json"
    data = ib.compact(manifest)
    sig.update(digest=ib._put_blob(layout, data), size=len(data))
    ib.set_index(layout, [(image, {ib.REF_NAME: "1"}), (sig, {ib.REF_NAME: "sha256-abc.sig"})])
    assert [img.names for img in _images(layout)] == [["signed:1"]]
    ib.set_index(layout, [(sig, {ib.REF_NAME: "sha256-abc.sig"})])
    with pytest.raises(InvalidImage, match="cosign.simplesigning.v1.json' is not a container image"):
        _images(layout)


def test_platform_from_config_when_index_has_none(tmp_path: Path) -> None:
    layout = ib.build_multiplatform_layout(
        tmp_path / "m", ["linux/amd64", "linux/arm64"], descriptor_platform=False
    )
    [img] = _images(layout, "linux/arm64")
    assert img.config["architecture"] == "arm64"
    assert _read(img.layers[0]) == gzip.compress(ib.platform_layer("linux/arm64"), mtime=0)


def test_lone_image_ignores_host_platform_unless_asked(tmp_path: Path) -> None:
    layout = tmp_path / "s390"
    ib.set_index(layout, [(ib.add_image(layout, [LAYER_A], platform="linux/s390x"), None)])
    [img] = _images(layout)
    assert img.names == [] and img.platform == "linux/s390x"
    with pytest.raises(NotFound, match="available: linux/s390x"):
        _images(layout, "linux/amd64")


# -- naming --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotations", "name"),
    [
        ({ib.REF_NAME: "latest"}, "base:latest"),
        ({ib.REF_NAME: "1.36.1"}, "base:1.36.1"),
        ({ib.REF_NAME: "busybox:1.36"}, "busybox:1.36"),
        ({ib.REF_NAME: "docker.io/library/busybox:1.36"}, "docker.io/library/busybox:1.36"),
        ({ib.REF_NAME: "localhost:5000/x"}, "localhost:5000/x:latest"),
        ({ib.REF_NAME: "latest", ib.CONTAINERD_NAME: "example.com/a/b:c"}, "example.com/a/b:c"),
        ({}, None),
    ],
)
def test_entry_names(annotations: dict[str, str], name: str | None) -> None:
    assert entry_name(annotations, "base") == name


def test_entry_name_invalid() -> None:
    with pytest.raises(InvalidImage, match="neither a tag nor a reference"):
        entry_name({ib.REF_NAME: "foo+bar"}, "base")
    with pytest.raises(InvalidImage, match="lowercase"):
        entry_name({ib.REF_NAME: "Foo/Bar:1"}, "base")


def test_repo_name_from_path() -> None:
    assert repo_name_from_path("/x/busybox-oci.tar") == "busybox-oci"
    assert repo_name_from_path("/x/My_Image.tar.gz") == "my_image"
    assert repo_name_from_path("/x/My Image.oci/") == "my-image-oci"
    assert repo_name_from_path("/x/__") == "image"


def test_tags_untagged_and_shared_manifests(tmp_path: Path) -> None:
    layout = tmp_path / "Tagged.OCI"
    a, b = ib.add_image(layout, [LAYER_A]), ib.add_image(layout, [LAYER_B])
    ib.set_index(
        layout, [(a, {ib.REF_NAME: "1"}), (a, {ib.REF_NAME: "latest"}), (b, {ib.REF_NAME: "2"}), (b, None)]
    )
    names = sorted(tuple(img.names) for img in _images(layout))
    # one image per manifest, all its names; the untagged entry beside tagged ones is dropped
    assert names == [("tagged.oci:1", "tagged.oci:latest"), ("tagged.oci:2",)]
    ib.set_index(layout, [(b, None)])
    assert [img.names for img in _images(layout)] == [[]]


@pytest.mark.parametrize(
    ("ref", "normal"),
    [
        ("busybox", "busybox:latest"),
        ("busybox:1.36", "busybox:1.36"),
        ("library/busybox", "library/busybox:latest"),
        ("docker.io/library/busybox:1.36", "docker.io/library/busybox:1.36"),
        ("localhost:5000/my-app:v1.0_rc", "localhost:5000/my-app:v1.0_rc"),
        ("localhost/x", "localhost/x:latest"),
        ("[::1]:5000/a__b/c.d", "[::1]:5000/a__b/c.d:latest"),
        ("quay.io/a/b@sha256:" + "a" * 64, "quay.io/a/b@sha256:" + "a" * 64),
        ("a/b:t@sha256:" + "0" * 64, "a/b:t@sha256:" + "0" * 64),
    ],
)
def test_normalize_ref_valid(ref: str, normal: str) -> None:
    assert normalize_ref(ref) == normal


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("", "empty"),
        ("Busybox", "lowercase"),
        ("busybox:", "bad tag"),
        ("busybox:-x", "bad tag"),
        ("busybox:" + "t" * 129, "bad tag"),
        ("a//b", "component ''"),
        ("a/-b", "component"),
        ("bad_host:x:5000/a", "bad registry host"),
        ("a@sha256:abc", "64 lowercase hex"),
        ("a@md5:" + "0" * 32, "unsupported digest algorithm"),
        ("x" * 256, "longer than 255"),
        (":tag", "empty repository"),
    ],
)
def test_normalize_ref_invalid(ref: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        normalize_ref(ref)


# -- corruption ----------------------------------------------------------------------------


def _hand_layout(root: Path) -> tuple[Path, dict]:  # type: ignore[type-arg]
    layout = root / "hand"
    desc = ib.add_image(layout, [LAYER_A, LAYER_B])
    ib.set_index(layout, [(desc, {ib.REF_NAME: "latest"})])
    return layout, json.loads(ib.blob_path(layout, desc["digest"]).read_bytes()) | {"digest": desc["digest"]}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("blob", ["config", "manifest"])
def test_corrupted_metadata_blob(tmp_path: Path, blob: str) -> None:
    layout, manifest = _hand_layout(tmp_path)
    digest = manifest["config"]["digest"] if blob == "config" else manifest["digest"]
    _flip(ib.blob_path(layout, digest))
    with pytest.raises(DigestMismatch, match=f"{blob} {digest}: digest mismatch"):
        _images(layout)
    ib.blob_path(layout, digest).write_bytes(b"{}")
    with pytest.raises(DigestMismatch, match=f"{blob} {digest}: size mismatch"):
        _images(layout)


def test_missing_and_corrupted_layer(tmp_path: Path) -> None:
    layout, manifest = _hand_layout(tmp_path)
    layer = manifest["layers"][1]["digest"]
    _flip(ib.blob_path(layout, layer))
    [img] = _images(layout, check=False)  # layers are verified by the importer while streaming
    with pytest.raises(DigestMismatch, match="digest mismatch"):
        _read(img.layers[1])
    ib.blob_path(layout, layer).unlink()
    with pytest.raises(InvalidImage, match=f"layer {layer} is missing"):
        _images(layout)
    layout, manifest = _hand_layout(tmp_path / "again")
    ib.blob_path(layout, manifest["config"]["digest"]).unlink()
    with pytest.raises(InvalidImage, match=f"config {manifest['config']['digest']} is missing"):
        _images(layout)


def _rewrite_image(layout: Path, manifest_edit=None, config_edit=None) -> None:  # type: ignore[no-untyped-def]
    """Re-point the index at a modified (but correctly hashed) manifest and config."""
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(ib.blob_path(layout, index["manifests"][0]["digest"]).read_bytes())
    if config_edit:
        config = json.loads(ib.blob_path(layout, manifest["config"]["digest"]).read_bytes())
        config_edit(config)
        data = ib.compact(config)
        manifest["config"].update(digest=ib._put_blob(layout, data), size=len(data))
    if manifest_edit:
        manifest_edit(manifest)
    data = ib.compact(manifest)
    index["manifests"][0].update(digest=ib._put_blob(layout, data), size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("manifest_edit", "config_edit", "message"),
    [
        (
            lambda m: m["config"].update(mediaType="application/vnd.cncf.helm.config.v1+json"),
            None,
            "not a container image",
        ),
        (
            lambda m: m.update(mediaType="application/vnd.oci.image.index.v1+json"),
            None,
            "differs from its descriptor",
        ),
        (lambda m: m["layers"][0].update(mediaType="application/x-foo"), None, "unsupported media type"),
        (lambda m: m["layers"][0].pop("digest"), None, r"layers\[0\]: digest must be a string"),
        (lambda m: m.pop("layers"), None, "layers is not a list"),
        (lambda m: m.update(schemaVersion=1), None, "schemaVersion must be 2"),
        (None, lambda c: c["rootfs"]["diff_ids"].pop(), "1 diff_ids for 2 layers"),
        (None, lambda c: c["rootfs"].update(type="foo"), 'rootfs.type must be "layers"'),
        (None, lambda c: c["rootfs"]["diff_ids"].__setitem__(0, "sha256:XYZ"), "diff_ids"),
    ],
)
def test_invalid_image_metadata(tmp_path: Path, manifest_edit, config_edit, message: str) -> None:  # type: ignore[no-untyped-def]
    layout, _ = _hand_layout(tmp_path)
    _rewrite_image(layout, manifest_edit, config_edit)
    with pytest.raises(InvalidImage, match=message):
        _images(layout)


def test_invalid_layout_files(tmp_path: Path) -> None:
    layout, _ = _hand_layout(tmp_path)
    (layout / "index.json").write_text("{not json")
    with pytest.raises(InvalidImage, match="index.json: not valid JSON"):
        open_source(str(layout))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    with pytest.raises(InvalidImage, match="imageLayoutVersion '2.0.0'"):
        open_source(str(layout))


def test_foreign_layers(tmp_path: Path) -> None:
    layout = tmp_path / "foreign"
    nd = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    desc = ib.add_image(layout, [LAYER_A], layer_media_type=nd)
    ib.set_index(layout, [(desc, None)])
    [img] = _images(layout)  # present: fine
    assert img.layers[0].media_type == nd
    ib.blob_path(layout, img.layers[0].digest or "").unlink()
    with pytest.raises(InvalidImage, match="foreign .*not in"):
        _images(layout)


# -- export --------------------------------------------------------------------------------


def _inspect_layers(ref: str) -> tuple[str, list[str]]:
    info = ib.skopeo_inspect(ref)
    return info["Digest"], info["Layers"]


@needs_umoci
@needs_skopeo
def test_export_oci_round_trip(umoci_layout: Path, tmp_path: Path) -> None:
    images = _images(umoci_layout)
    exports = [_export_of(img) for img in images]
    exports[0].names.append("example.com/extra/name:extra")
    out_dir, out_tar = tmp_path / "out", tmp_path / "out.tar"
    out_dir.mkdir()  # an empty directory is fine
    export_oci(exports, str(out_dir))
    export_oci(exports, str(out_tar))

    for out in (out_dir, out_tar):
        again = {img.manifest_digest: img for img in _images(out)}
        for img in images:
            copy = again[img.manifest_digest]
            assert copy.config_digest == img.config_digest
            assert [layer.digest for layer in copy.layers] == [layer.digest for layer in img.layers]
        assert sorted(n for img in again.values() for n in img.names) == sorted(
            [*(n for img in images for n in img.names), "example.com/extra/name:extra"]
        )
    # skopeo finds images by tag (ref.name) and umoci unpacks them
    for img in images:
        tag = img.names[0].rpartition(":")[2]
        digest, layers = _inspect_layers(f"oci:{out_dir}:{tag}")
        assert digest == img.manifest_digest and layers == [layer.digest for layer in img.layers]
        assert _inspect_layers(f"oci-archive:{out_tar}:{tag}")[0] == img.manifest_digest
    if IS_ROOT:
        ib.run("umoci", "unpack", "--image", f"{out_dir}:v2", tmp_path / "bundle")
        rootfs = tmp_path / "bundle" / "rootfs"
        assert (rootfs / "bin" / "busybox").read_bytes() == Path(ib.BUSYBOX).read_bytes()
        assert (rootfs / "etc" / "motd").read_text() == "hi\n"
        assert not (rootfs / "etc" / "hello.txt").exists()
    # deterministic: the same export twice gives the same bytes
    export_oci(exports, str(tmp_path / "again.tar"))
    assert (tmp_path / "again.tar").read_bytes() == out_tar.read_bytes()
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tarfile.open(out_tar).getmembers())


@needs_umoci
@needs_skopeo
def test_export_docker_archive(umoci_layout: Path, tmp_path: Path) -> None:
    images = _images(umoci_layout)
    out = tmp_path / "docker.tar"
    export_docker_archive([_export_of(img) for img in images], str(out))
    for img in images:
        info = ib.skopeo_inspect(f"docker-archive:{out}:{img.names[0]}")
        assert info["Layers"] == img.diff_ids  # uncompressed, so digests are diffIDs
    again = {img.config_digest: img for img in _images(out)}
    assert {d: img.names for d, img in again.items()} == {img.config_digest: img.names for img in images}
    # and back out as OCI via a synthesized manifest: skopeo accepts that too
    with open_source(str(out)) as src:
        [v2] = [img for img in src.images() if img.names == ["bb-oci:v2"]]
        export_oci([_export_of(v2)], str(tmp_path / "from-docker"))
    info = ib.skopeo_inspect(f"oci:{tmp_path / 'from-docker'}")  # the only image: no tag needed
    assert info["Layers"] == v2.diff_ids
    raw = ib.skopeo_inspect(f"oci:{tmp_path / 'from-docker'}:v2", raw=True)
    assert raw["mediaType"] == OCI_MANIFEST and raw["config"]["digest"] == v2.config_digest


def test_export_failures_leave_nothing(tmp_path: Path) -> None:
    layout, _ = _hand_layout(tmp_path)
    [img] = _images(layout, check=False)
    good = _export_of(img)
    broken_layer = ExportLayer(**{**good.layers[1].__dict__, "open": lambda: io.BytesIO(b"garbage")})
    broken = ExportImage(good.names, good.manifest_bytes, good.config_bytes, [good.layers[0], broken_layer])
    out = tmp_path / "exports"
    out.mkdir()
    for target, fn in (
        (out / "o.tar", export_oci),
        (out / "o", export_oci),
        (out / "d.tar", export_docker_archive),
    ):
        with pytest.raises(DigestMismatch, match="layer sha256:"):
            fn([broken], str(target))
        assert os.listdir(out) == []  # no output, no staging directory
    (out / "full").mkdir()
    (out / "full" / "x").write_text("x")
    with pytest.raises(AlreadyExists, match="not an empty directory"):
        export_oci([good], str(out / "full"))
    mismatched = ExportImage(good.names, good.manifest_bytes, good.config_bytes + b" ", good.layers)
    with pytest.raises(InvalidArgument, match="manifest names config"):
        export_oci([mismatched], str(out / "m"))
    with pytest.raises(InvalidArgument, match="no images"):
        export_oci([], str(out / "m"))


def test_export_docker_decompresses_zstd(tmp_path: Path) -> None:
    layout = tmp_path / "z"
    desc = ib.add_image(layout, [LAYER_A], gzipped=False)
    ib.set_index(layout, [(desc, {ib.REF_NAME: "1"})])
    [img] = _images(layout, check=False)
    blob = zstandard.ZstdCompressor().compress(LAYER_A)
    manifest = synthesize_manifest(
        img.config_bytes, [(Digest.of(blob), len(blob), "application/vnd.oci.image.layer.v1.tar+zstd")]
    )
    layer = ExportLayer(
        Digest.of(blob),
        len(blob),
        "application/vnd.oci.image.layer.v1.tar+zstd",
        img.diff_ids[0],
        lambda: io.BytesIO(blob),
    )
    export_docker_archive(
        [ExportImage(["z:1"], manifest, img.config_bytes, [layer])], str(tmp_path / "z.tar")
    )
    [back] = _images(tmp_path / "z.tar")
    assert back.names == ["z:1"] and _read(back.layers[0]) == LAYER_A


def test_synthesize_manifest() -> None:
    config = ib.compact(
        {
            "os": "linux",
            "architecture": "amd64",
            "rootfs": {"type": "layers", "diff_ids": [ib.sha256(LAYER_A)]},
        }
    )
    d = Digest.of(LAYER_A)
    data = synthesize_manifest(config, [(d, len(LAYER_A), DOCKER_LAYER)])
    assert data == synthesize_manifest(config, [(d, len(LAYER_A), DOCKER_LAYER)])
    assert b" " not in data  # compact
    manifest = json.loads(data)
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"] == {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": Digest.of(config),
        "size": len(config),
    }
    assert manifest["layers"] == [{"mediaType": OCI_LAYER, "digest": d, "size": len(LAYER_A)}]
    with pytest.raises(InvalidImage, match="1 diff_ids for 2 layers"):
        synthesize_manifest(config, [(d, 1, OCI_LAYER), (d, 1, OCI_LAYER)])


def test_layer_sha_of_raw_file(tmp_path: Path) -> None:
    """LayerBlob.open gives the blob exactly as stored (what the importer hashes)."""
    layout, manifest = _hand_layout(tmp_path)
    [img] = _images(layout)
    for layer, desc in zip(img.layers, manifest["layers"], strict=True):
        raw = ib.blob_path(layout, desc["digest"]).read_bytes()
        assert _read(layer) == raw and hashlib.sha256(raw).hexdigest() == desc["digest"][7:]
