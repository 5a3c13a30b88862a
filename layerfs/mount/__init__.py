"""Mount backends: the only place in layerfs that executes a ``MountSpec``.

- ``probe``: what the kernel and a store's filesystem allow (one probe per process);
- ``kernel``: overlay and bind mounts with the mount syscalls;
- ``fuse``: overlays served by the ``layerfs-fuse`` program (started, waited for, stopped).

The rest of layerfs describes mounts (``layerfs.mountspec``) and hands them here.
"""
