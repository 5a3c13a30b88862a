"""layerfs: a union/overlay filesystem layer manager for container images."""

__version__ = "0.1.0"
