"""Union semantics in plain Python: how a stack of overlay layers reads as one tree.

- ``whiteout``: every overlay on-disk convention (whiteouts, opaque directories, redirects,
  origins, the private xattr prefixes), defined once;
- ``dirindex``: the one overlayfs lookup walk, fd-based and cached (the FUSE model uses it
  below its upper layer, ``view`` for everything);
- ``view``: a read-only union of layer directories (``LayerStack``: path strings over
  ``dirindex``) for the store's readers (layer changes and tars, tree diffs, bundles, the
  extraction of a layer over its lowers);
- ``api``: the contract between the union filesystem model and a FUSE transport;
- ``fs``, ``core``, ``namespace``, ``upper``, ``copyup``, ``inodes``, ``xattrs``: the
  writable union filesystem model behind ``api``.

It never imports pyfuse3, the store or a mount backend; it may import ``layerfs.linux``,
``layerfs.errors`` and ``layerfs.digest``.
"""
