"""One conformance suite for union semantics, run over kernel overlayfs, the FUSE mount and the model.

Kernel overlayfs (``redirect_dir=on,index=off``) is the oracle: every case runs on it and on
the backend under test, from identical fresh layers, and the two observation logs must be
equal. Modules:

- ``layers``: lower layers in the kernel's on-disk format (built fresh per case and backend);
- ``facade``: path-based operations over a mounted directory (``OsFacade``) or over the
  model's inode API with the kernel VFS's part emulated (``ModelFacade``), plus the tree
  and upper-directory snapshots;
- ``backends``: mounting and cleaning up each way (kernel, ``layerfs-fuse``, ``UnionFS``);
- ``runner``: ``@case`` registration, the recording ``Session``, ``run_case``, log diffs;
- ``cases``: the cases; ``conftest``: the ``kernel``/``fuse``/``model`` fixtures;
- ``test_cases`` (every case x backend), ``test_crossmount`` (uppers read by the other
  backend, and as a lower layer), ``test_stateful`` (hypothesis, random sequences).

Run: ``.venv/bin/python -m pytest tests/conformance -q`` (root; ``-k "CASE and fuse"`` for
one case; ``LAYERFS_CONFORMANCE_KEEP=1`` keeps the layers, uppers and daemon logs).

A package (``tests.conformance``) like the rest of the suite: its modules import each other
relatively.
"""
