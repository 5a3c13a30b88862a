"""Tests that mount for real, start ``layerfs-fuse``, the snapshotter server, containerd or runc,
run the CLI against real stores, or crash and race processes on purpose."""
