"""The store: the only code in layerfs that speaks SQL or lays out the store directory.

- ``schema``: the SQLite schema, its version and the connection/transaction helper;
- ``content``: the verified, content-addressed blob store (``blobs/sha256/<hex>``);
- ``core``: ``Store``: snapshots (layers and uppers), images, blobs, labels, gc;
- ``fsck``: checking a store against its database, and repairing it.

Everything above the store calls ``Store`` methods; no module outside this package issues
a statement or opens a transaction. The store describes what is on disk; it never mounts.
"""

from layerfs.store.core import BlobRecord, Image, Snapshot, StagedLayer, Store, default_root, disk_usage

__all__ = ["BlobRecord", "Image", "Snapshot", "StagedLayer", "Store", "default_root", "disk_usage"]
