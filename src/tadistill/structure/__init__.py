"""Structure of a Transformer as prunable units, shared by every structured method (Minitron, DPHuBERT, WID,
AutoDistil): which units exist and where (``units.py``), masks over them applied without touching the
weights (``masks.py``), keeping the most important ones to reach a target shape (``select.py``), and
materialisation: the dense, smaller Hugging Face model a set of kept units describes (``materialize.py``).

A method only decides *scores* (activations, learned gates, compactor norms, a search); the rest is here, with
the scores that need nothing but a model and batches: Minitron's importance from activations (``activations.py``).
"""

from __future__ import annotations

from tadistill.structure.masks import Masks, apply_masks, unit_sites
from tadistill.structure.materialize import Kept, materialize, pruned_config
from tadistill.structure.select import Scores, TargetShape, check_target, select_units
from tadistill.structure.units import PRUNABLE_FAMILIES, Layout, resolve_layout

__all__ = [
    "PRUNABLE_FAMILIES", "Kept", "Layout", "Masks", "Scores", "TargetShape", "apply_masks", "check_target",
    "materialize", "pruned_config", "resolve_layout", "select_units", "unit_sites",
]
