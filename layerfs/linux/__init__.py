"""The syscall wing: the only code in layerfs that talks to libc through ctypes.

- ``libc``: the one ``CDLL`` handle, syscall numbers per architecture, ``syscall``/``check``;
- ``mountapi``: fs contexts of the new mount API (``fsopen``/``fsconfig``);
- ``mountinfo``: ``/proc/self/mountinfo`` parsed;
- ``files``: ``renameat2``, ``utimensat``, ``FICLONE``, ``getdents64``, ``/proc/self/fd`` paths;
- ``proc``: the one "is this pid alive" rule, and the boot id;
- ``fusedev``: ``/dev/fuse``, mounting it (mount(2), fusermount3's fd passing), its ioctls
  (passthrough backing files).

It imports nothing from layerfs but ``layerfs.errors``; everything else may import it.
"""
