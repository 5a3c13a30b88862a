"""The layerfs test suite (a package, so every module imports helpers as ``tests.support.*``).

- ``unit/``: no mount, no daemon, no program besides the ones that build test images;
- ``conformance/``: union semantics, kernel overlayfs as the oracle against FUSE and the model;
- ``integration/``: real mounts, ``layerfs-fuse``, the snapshotter server, containerd and runc,
  the CLI against real stores, concurrency and crashes;
- ``support/``: helpers, corpora and golden files shared by the above.
"""
