"""The FUSE backend: a pyfuse3 protocol adapter over the union model.

- ``ops``: ``UnionOperations``, the ``pyfuse3.Operations`` subclass that translates FUSE
  requests into ``layerfs.union.api.UnionOps`` calls (inode numbers and
  ``EntryAttributes`` out, ``FUSEError`` out on failure) and sets the kernel caching levers.

- ``main``: the ``layerfs-fuse`` program (fuse-overlayfs' command line) that mounts and
  serves it.

The backend that starts and stops that program for ``layerfs mount`` is
``layerfs.mount.fuse``, which runs it as a separate process and never imports this package.
Only this package imports pyfuse3.
"""
