"""Image analysis: what each layer costs and wastes (``waste``), and the merged file tree with
where each entry comes from (``tree``).

An operation (level 8, after ``layerfs.catalog``): it reads the store through its functions,
a layer's own files through a plain directory listing, the union through the one lookup walk
(``layerfs.union.view.LayerStack``) and per-layer A/C/D through ``layerfs.layer.changes``.
Read-only: nothing here changes the store.
"""

from __future__ import annotations

from layerfs.analysis.tree import TreeEntry, image_tree
from layerfs.analysis.waste import (
    Analysis,
    Duplicate,
    LayerCost,
    Offender,
    RuleResult,
    Rules,
    analyze,
    analyze_dirs,
    check_rules,
    read_rules,
)

__all__ = [
    "Analysis",
    "Duplicate",
    "LayerCost",
    "Offender",
    "RuleResult",
    "Rules",
    "TreeEntry",
    "analyze",
    "analyze_dirs",
    "check_rules",
    "image_tree",
    "read_rules",
]
