"""Image formats in and out, independent of the store: the public face.

Formats (each read or written by the module named):

- OCI image layout, directory or tar, nested indexes, multi-platform (``oci``);
- docker archives: old style (``<id>/layer.tar``, symlinked layers) and Docker >= 25
  (OCI layout + ``manifest.json``) (``docker``);
- writing both back out, byte for byte for OCI (``export``);
- image references (``ref``); file access inside dirs and tars (``files``).

How the importer uses it::

    with open_source(path) as src:
        for img in src.images(platform=None):        # ResolvedImage, verified metadata
            for layer in img.layers:                   # LayerBlob
                with layer.open() as f:
                    reader = VerifyingReader(f, what=..., expected=layer.digest,
                                             expected_size=layer.size)
        manifest = img.manifest_bytes or synthesize_manifest(img.config_bytes, [...])

Naming: ``io.containerd.image.name`` if a layout entry has it; otherwise
``org.opencontainers.image.ref.name``, a full reference as is, or a bare tag (what skopeo
and umoci write) as ``<layout or archive basename>:<tag>``; docker archives use RepoTags.
Names are validated by ``normalize_ref`` and never get a ``docker.io/library/`` prefix.
"""

from __future__ import annotations

from typing import Literal

from layerfs.errors import InvalidImage
from layerfs.image.docker import DockerArchive
from layerfs.image.export import ExportImage, ExportLayer, export_docker_archive, export_oci
from layerfs.image.files import ImageFiles, open_files
from layerfs.image.oci import (
    LayerBlob,
    OciLayout,
    Platform,
    ResolvedImage,
    layer_compression,
    synthesize_manifest,
)
from layerfs.image.ref import Reference, normalize_ref, parse_ref, repo_name_from_path

__all__ = [
    "ExportImage",
    "ExportLayer",
    "ImageSource",
    "LayerBlob",
    "Platform",
    "Reference",
    "ResolvedImage",
    "export_docker_archive",
    "export_oci",
    "layer_compression",
    "normalize_ref",
    "open_source",
    "parse_ref",
    "synthesize_manifest",
]

SourceFormat = Literal["oci-layout", "docker-archive"]


class ImageSource:
    """An open image layout or archive. Close it (or use ``with``) when done: layer streams
    read from it are valid until then."""

    def __init__(self, path: str, files: ImageFiles) -> None:
        self.path = path
        self._files = files
        repo_base = repo_name_from_path(path)
        self._reader: OciLayout | DockerArchive
        # A Docker >= 25 archive is both; it is read as a docker archive, which reads its
        # layout and adds manifest.json's RepoTags.
        if files.exists("manifest.json"):
            self.format: SourceFormat = "docker-archive"
            self._reader = DockerArchive(files, repo_base)
        elif files.exists("oci-layout"):
            self.format = "oci-layout"
            self._reader = OciLayout(files, repo_base)
        else:
            raise InvalidImage(
                f"{path}: neither an OCI image layout (no oci-layout) nor a docker archive (no manifest.json)"
            )

    def images(self, platform: str | None = None) -> list[ResolvedImage]:
        """The images of the source, one per selected manifest (docker archives: per image ID).

        ``platform`` is ``os/arch[/variant]``. When an index offers a choice of platforms
        and ``platform`` is None, the host's is taken; a lone image is taken whatever its
        platform unless ``platform`` is given. ``NotFound`` lists the platforms available.
        """
        return self._reader.images(platform)

    def close(self) -> None:
        self._files.close()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(path: str) -> ImageSource:
    """Open an OCI layout (dir or tar) or a docker archive (tar or unpacked dir)."""
    files = open_files(path)
    try:
        return ImageSource(path, files)
    except BaseException:
        files.close()
        raise
