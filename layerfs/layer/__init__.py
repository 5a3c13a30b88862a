"""One layer, as a tar and as a directory in the store's overlay format.

- ``compression``: bounded gzip/zstd decompression and format sniffing;
- ``apply``: safe application of a layer tar onto a directory (never ``extractall``);
- ``changes``: a layer directory's A/C/D changes against its lowers, the deterministic OCI
  layer tar written from them, and the diff of two trees.

The overlay on-disk conventions these read and write are ``layerfs.union.whiteout``'s;
the lookup through the lower layers is ``layerfs.union``'s. Imports go down only: to
``layerfs.union``, ``layerfs.linux``, ``layerfs.digest`` and ``layerfs.errors``.
"""
