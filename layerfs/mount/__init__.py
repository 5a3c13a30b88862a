"""Mounts: described once (``spec``), executed only here.

- ``spec``: ``MountSpec`` (containerd's Mount: type, source, options), the option
  syntax of overlay layer paths, and ``snapshot_spec``, the one rule from a snapshot
  (layers, upper) to a ``MountSpec``;

- ``probe``: what the kernel and a store's filesystem allow (one probe per process);
- ``backend``: which backend (``auto``, ``kernel``, ``fuse``) mounts a spec;
- ``kernel``: overlay and bind mounts with the mount syscalls;
- ``fuse``: overlays served by the ``layerfs-fuse`` program (started, waited for, stopped).

The rest of layerfs describes mounts with ``spec`` and hands them to ``kernel`` or
``fuse``. This package never imports the store.
"""
