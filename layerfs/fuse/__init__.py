"""The FUSE backend: a pyfuse3 protocol adapter over the union model.

- ``ops``: ``UnionOperations``, the ``pyfuse3.Operations`` subclass that translates FUSE
  requests into ``layerfs.union.api.UnionOps`` calls (inode numbers and
  ``EntryAttributes`` out, ``FUSEError`` out on failure) and sets the kernel caching levers.

The program that mounts and serves it is ``layerfs.fuse_main`` (``layerfs-fuse``); the
backend that starts and stops that program for ``layerfs mount`` is ``layerfs.mount.fuse``.
Only this package imports pyfuse3.
"""
