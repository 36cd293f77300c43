"""DistiLLM's adaptive off-policy schedule with a replay buffer (Ko et al. 2024, section 3.2).

The schedule and the buffer themselves live in ``training/replay.py`` (pure bookkeeping, no model);
this file connects them to the loop: each micro-batch draws "dataset", "generate" (the student samples,
the samples go to the buffer) or "replay" (a draw from the buffer); each held-out evaluation feeds the
loss to the schedule, which raises phi, the probability of student outputs, when the loss rises.
"""

from __future__ import annotations

from typing import Any

from tadistill.config import DistillConfig
from tadistill.methods.on_policy import require_causal, sampling_settings
from tadistill.training.hooks import Continuation, ContinuationRequest, MethodHooks, continuation_count
from tadistill.training.replay import AdaptiveOffPolicy, ReplayBuffer
from tadistill.training.sampling import SOURCES


class AdaptiveReplay(MethodHooks):
    name = "distillm"

    def __init__(self, config: DistillConfig):
        op = self.cfg = config.on_policy
        self.schedule = AdaptiveOffPolicy(total_steps=config.train.steps, capacity=op.replay_capacity,
                                          initial=op.adaptive_initial, schedule=op.replay_schedule)
        self.replay = ReplayBuffer(op.replay_capacity)
        self.counts: dict[str, int] = {}

    def continuation(self, request: ContinuationRequest) -> Continuation | None:
        decision = self.schedule.decide(request.generator("policy"), len(self.replay), step=request.step - 1)
        source = {"dataset": "dataset", "generate": "student", "replay": "replay"}[decision]
        self.counts[source] = self.counts.get(source, 0) + 1
        if source == "dataset":
            return None
        if source == "replay":
            sequences, prompt_lengths = self.replay.sample(len(request.sequences), request.generator("replay"))
            return Continuation("replay", sequences, prompt_lengths)
        sequences = request.sample("student", **sampling_settings(self.cfg))
        self.replay.push(sequences, request.prompt_lengths)
        return Continuation("student", sequences, request.prompt_lengths)

    def after_evaluation(self, row: dict[str, float]) -> dict[str, float]:
        return {"policy/phi": self.schedule.update(row["eval/loss"])}

    def log_values(self) -> dict[str, float]:
        return {**continuation_count(self.counts, SOURCES), "policy/phi": self.schedule.probability}

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "schedule": self.schedule.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self.schedule.load_state_dict(state["schedule"])
        self.replay.load_state_dict(state["replay"])


def build(config: DistillConfig, parts) -> AdaptiveReplay | None:
    if not config.on_policy.adaptive:
        return None
    require_causal(parts)
    return AdaptiveReplay(config)
