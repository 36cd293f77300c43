"""AMMD's alternating updates (Jia 2024): the Q head and the student take turns.

The moment-matching term (``training/terms.py``, ``objectives/moment_matching.py``) gives the student's
descent and the Q head's ascent in one backward; with ``alternate: true`` (the default) odd optimizer
steps move the Q head only and even steps the student only, as in alternating gradient descent-ascent.
"""

from __future__ import annotations

from torch import nn

from tadistill.config import DistillConfig
from tadistill.training.hooks import MethodHooks


class AlternatingUpdates(MethodHooks):
    name = "ammd-alternate"

    def __init__(self, q_head: nn.Module, everything: list[nn.Parameter]):
        self.q_params = list(q_head.parameters())
        ids = {id(p) for p in self.q_params}
        self.others = [p for p in everything if id(p) not in ids]

    def held_parameters(self, step: int) -> list[nn.Parameter]:
        return self.others if step % 2 == 1 else self.q_params  # odd: the Q head's turn, the student waits


def build(config: DistillConfig, parts) -> AlternatingUpdates | None:
    mm = config.objective("moment-matching")
    if mm is None or mm.weight <= 0 or not mm.alternate:
        return None
    term = next(t for t in parts.terms if t.kind == "moment-matching")
    everything = [*parts.student.parameters(), *(p for t in parts.terms for p in t.parameters())]
    return AlternatingUpdates(term.q_head, everything)
