"""What a model costs: parameter counts and forward FLOPs per token, from a model or from a config.

Students are compared with their teachers by size and compute (AutoDistil, Xu et al. 2022, searches
under a FLOPs budget; Kaplan et al. 2020, section 2.1, give the per-token forward count used here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from tadistill.measure.flops import (
    flops_per_token,  # defined below training (run summaries); importable from here
)
from tadistill.measure.parameters import (
    count_parameters,  # defined below training; importable from here
)
from tadistill.students.build import build_student, config_shape


def parameters_from_config(config: PretrainedConfig, *, head: str = "base") -> int:
    """Parameter count of the model ``build_student(config, head=head)`` would build.

    The model is instantiated on the meta device, so no memory is allocated and no weights are drawn.
    """
    with torch.device("meta"):
        model = build_student(config, head=head)
    return count_parameters(model)


@dataclass
class ModelSummary:
    """Sizes and cost of one model config (as used in reports and by the size search).

    ``intermediate_size`` is the FFN width; ``vocab_size`` is None for models without a vocabulary;
    ``flops_per_token`` is forward FLOPs per token at the ``seq_len`` given to ``summarize``.
    """

    family: str
    layers: int
    hidden_size: int
    heads: int
    intermediate_size: int
    vocab_size: int | None
    parameters: int
    flops_per_token: int


def summarize(config: PretrainedConfig, *, seq_len: int = 128, head: str = "base") -> ModelSummary:
    """Sizes, parameter count (meta-device build) and forward FLOPs per token of ``config``."""
    shape = config_shape(config)
    return ModelSummary(
        family=shape.family,
        layers=shape.layers,
        hidden_size=shape.hidden_size,
        heads=shape.heads,
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        parameters=parameters_from_config(config, head=head),
        flops_per_token=flops_per_token(config, seq_len=seq_len, head=head),
    )
