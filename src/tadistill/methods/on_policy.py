"""GKD's on-policy and sequence-level continuations (Agarwal et al. 2024, algorithm 1; Kim & Rush 2016).

Each micro-batch draws, from a generator seeded by (train.seed, batch number), where its continuations
come from: the student with probability lambda (``on_policy.fraction``), the teacher with
``on_policy.teacher_fraction`` (sequence-level KD), otherwise the dataset. The fraction drawn from each
source so far is logged as ``policy/<source>``.
"""

from __future__ import annotations

from typing import Any

from tadistill.config import DistillConfig
from tadistill.errors import ConfigError
from tadistill.training.hooks import Continuation, ContinuationRequest, MethodHooks, continuation_count
from tadistill.training.sampling import SOURCES, draw_source


class OnPolicySampling(MethodHooks):
    name = "on-policy"

    def __init__(self, config: DistillConfig):
        self.cfg = config.on_policy
        self.counts: dict[str, int] = {}  # micro-batches per source so far
        self.uses_teacher = self.cfg.teacher_fraction > 0

    def continuation(self, request: ContinuationRequest) -> Continuation | None:
        source = draw_source(self.cfg, request.generator("policy"))
        self.counts[source] = self.counts.get(source, 0) + 1
        if source == "dataset":
            return None
        return Continuation(source, request.sample(source, **sampling_settings(self.cfg)), request.prompt_lengths)

    def log_values(self) -> dict[str, float]:
        return continuation_count(self.counts, SOURCES)

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {k: int(v) for k, v in state["counts"].items()}


def build(config: DistillConfig, parts) -> OnPolicySampling | None:
    op = config.on_policy
    if not (op.fraction > 0 or op.teacher_fraction > 0) or op.adaptive:
        return None
    require_causal(parts)
    return OnPolicySampling(config)


def sampling_settings(cfg) -> dict:
    """What ``ContinuationRequest.sample`` takes from the on_policy config."""
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens}


def require_causal(parts) -> None:
    if not parts.student_arch.causal:
        raise ConfigError("on-policy sampling needs a causal-LM teacher and student: set on_policy.fraction=0")
