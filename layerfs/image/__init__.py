"""Image formats, independent of the store: what an image *is* on the way in and out.

- ``ref``: image references (``name:tag``, ``@sha256:...``), normalised once;
- ``files``: a directory or a tar read as a set of named files;
- ``oci``: OCI image layouts (index, manifests, configs; media types defined here);
- ``config``: building the image configs layerfs writes itself (import-layer, commit);
- ``docker``: ``docker save`` archives (old and >= 25 style);
- ``export``: writing OCI layouts and docker-archives;
- ``source``: the one entry point that opens any of them as an ``ImageSource``.

Nothing here knows the store; the importer and exporter connect the two.
"""
