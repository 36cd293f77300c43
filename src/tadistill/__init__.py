"""tadistill: task-agnostic distillation of Transformer models.

The public API::

    from tadistill import distill, resolve_config, DistillConfig

Names are imported on first use (PEP 562), so ``tadistill recipes`` or ``import tadistill.objectives``
do not pay for loading transformers and accelerate.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DistillConfig": "tadistill.config",
    "DistillResult": "tadistill.api",
    "TadistillError": "tadistill.errors",
    "compress": "tadistill.lingua.compress",  # prompt compression (LLMLingua-2): compress(text, model=..., rate=...)
    "distill": "tadistill.api",
    "resolve_config": "tadistill.resolve",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tadistill' has no attribute {name!r}")
