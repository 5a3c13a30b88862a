"""The FUSE backend: the union model served over FUSE, by one of two transports.

- ``ops``: ``UnionOperations``, the ``pyfuse3.Operations`` subclass that translates FUSE
  requests into ``layerfs.union.api.UnionOps`` calls (inode numbers and
  ``EntryAttributes`` out, ``FUSEError`` out on failure) and sets the kernel caching levers
  (the ``pyfuse3`` transport, through libfuse).
- ``protocol``, ``dispatch``, ``session``: the ``kernel`` transport, which speaks the FUSE
  protocol on ``/dev/fuse`` itself (wire structs; requests -> ``UnionOps`` calls; the
  connection: mount, INIT, the request loop, notifications), for what libfuse via pyfuse3
  cannot do: readdir caching, passthrough, ``st_ino`` apart from the node id, INIT tuning.
- ``main``: the ``layerfs-fuse`` program (fuse-overlayfs' command line) that mounts and
  serves it (``--transport pyfuse3|kernel``).

The backend that starts and stops that program for ``layerfs mount`` is
``layerfs.mount.fuse``, which runs it as a separate process and never imports this package.
Only this package imports pyfuse3 (``ops`` and ``main``'s pyfuse3 transport).
"""
