"""The store: the only code in layerfs that speaks SQL or lays out the store directory.

- ``schema``: the SQLite schema, its version and the connection/transaction helper;
- ``content``: the verified, content-addressed blob store (``blobs/sha256/<hex>``);
- ``records``: the records of containers and mounts (``Store.containers``, ``Store.mounts``),
  and the rule that makes a mount record stale;
- ``core``: ``Store``: snapshots (layers and uppers), images, blobs, labels;
- ``garbage``: ``rmi`` and ``gc``, collecting what no image needs;
- ``fsck``: checking a store against its database, and repairing it.

Imports go one way: ``schema``, ``content`` and ``records`` know no ``Store``; ``core``
builds it from them; ``garbage`` and ``fsck`` work on a ``Store``. Everything above the
store calls these; no module outside this package issues a statement or opens a
transaction. The store describes what is on disk; it never mounts.
"""

from layerfs.store.core import BlobRecord, Image, Snapshot, StagedLayer, Store, default_root, disk_usage
from layerfs.store.records import ContainerRecord, MountRecord

__all__ = ["BlobRecord", "ContainerRecord", "Image", "MountRecord", "Snapshot", "StagedLayer", "Store",
           "default_root", "disk_usage"]
