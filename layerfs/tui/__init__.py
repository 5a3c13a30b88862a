"""The terminal explorer of an image (``layerfs explore REF``, ``layerfs analyze -i REF``),
on textual: the layers on the left with what each costs and wastes, the merged tree as of
the selected layer on the right with A/C/M/D marks, collapse, a path filter, changes only.

Its own level between the operations and the CLI: it reads what ``layerfs.analysis`` computes
(``ExplorerModel``) and never opens the store itself.
"""

from __future__ import annotations

from layerfs.tui.explorer import ExplorerApp, ExplorerModel

__all__ = ["ExplorerApp", "ExplorerModel"]
