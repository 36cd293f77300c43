"""tadistill: task-agnostic distillation of Transformer models.

The public API::

    from tadistill import distill, resolve_config, DistillConfig
"""

from tadistill.api import DistillResult, distill
from tadistill.config import DistillConfig
from tadistill.errors import TadistillError
from tadistill.resolve import resolve_config

__all__ = ["DistillConfig", "DistillResult", "TadistillError", "distill", "resolve_config"]
__version__ = "0.1.0"
