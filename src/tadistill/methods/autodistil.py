"""AutoDistil's SuperLM training (Xu et al. 2022, sec. 3; docs/methods.md, AutoDistil): the sandwich rule.

The student is a SuperLM of the teacher's shape, started from the teacher's weights (recipe ``autodistil``:
``student.init: teacher``). Every micro-batch runs several forward + backward passes (``MethodHooks.passes``;
the loop averages their losses and gradients): the largest sub-network of the sub-space, the smallest, and
``autodistil.random_subnets`` (M) drawn uniformly from the sub-space's sub-networks by a generator seeded with
(train.seed, "autodistil", micro-batch number), so a resumed run draws exactly what an uninterrupted one draws
(Yu et al. 2020, BigNAS, and Cai et al. 2020, once-for-all, name the rule; AutoDistil takes it over). A
sub-network is a set of masks over the SuperLM's blocks, heads, FFN units and hidden channels
(``structure/subnets.py``) applied by forward hooks during its pass, so all sub-networks share the weights.

The loss is ``relation-mse`` (``training/relation_mse_term.py``): while a sub-network runs, the term compares
only the Q/K/V columns of the heads it keeps. Held-out evaluation runs outside the passes: it scores the whole
SuperLM. The run saves the SuperLM itself; ``tadistill search RUN`` (``search.py``) reads sub-networks out of it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from tadistill.config import AutoDistilConfig, DistillConfig
from tadistill.errors import ConfigError
from tadistill.structure import Layout, apply_masks, resolve_layout
from tadistill.structure.subnets import PAPER_SPACES, Subnet, SubSpace, auto_space, draw, subnet_masks, subnets
from tadistill.training.hooks import MethodHooks, seed_for

OBJECTIVE = "relation-mse"


def resolve_space(cfg: AutoDistilConfig, layout: Layout) -> SubSpace:
    """The named sub-space with the config's own ranges in place of its."""
    base = auto_space(layout) if cfg.space == "auto" else PAPER_SPACES[cfg.space]
    heads = base.heads if cfg.heads is None else None if cfg.heads == "derived" else cfg.heads
    return SubSpace(layers=cfg.layers or base.layers, hidden=cfg.hidden or base.hidden, heads=heads,
                    ffn_ratio=cfg.ffn_ratio or base.ffn_ratio)


def space_subnets(cfg: AutoDistilConfig, layout: Layout, divisor: int) -> list[Subnet]:
    """The sub-networks of the configured sub-space, smallest first; a one-line ConfigError when there are none."""
    space = resolve_space(cfg, layout)
    for name, span, most, what in (("layers", space.layers, layout.num_layers, "blocks"),
                                   ("hidden", space.hidden, layout.hidden_size, "hidden channels"),
                                   ("heads", space.heads, layout.num_heads, "heads")):
        if span is not None and span[1] > most:
            raise ConfigError(f"autodistil.{name} reaches {span[1]:g} ({cfg.space} space or your range) and the SuperLM "
                              f"has {most} {what}: a sub-network only keeps the SuperLM's units; set autodistil.{name}="
                              f"[{min(span[0], most):g},{most},{span[2]:g}] or a larger teacher")
    found, reasons = subnets(space, layout, divisor=divisor)
    if not found:
        spans = ", ".join(f"{k} {list(v) if v is not None else 'derived'}" for k, v in vars(space).items())
        raise ConfigError(f"the autodistil sub-space ({cfg.space}: {spans}) has no sub-network of this "
                          f"{layout.num_layers}x{layout.hidden_size} SuperLM: {reasons[0]}; set autodistil.layers / "
                          "hidden / heads / ffn_ratio (or heads=derived), or objectives.relation-mse.relation_heads")
    return found


def sandwich_ends(candidates: list[Subnet], layout: Layout) -> tuple[Subnet, Subnet]:
    """(largest, smallest): the sub-network that is largest (smallest) in every dimension when the space has it,
    else the one with the most (fewest) block weights."""
    top = max(candidates, key=lambda s: (s.layers, s.hidden, s.heads, s.ffn))
    bottom = min(candidates, key=lambda s: (s.layers, s.hidden, s.heads, s.ffn))
    if not all(getattr(top, k) >= getattr(s, k) for s in candidates for k in ("layers", "hidden", "heads", "ffn")):
        top = candidates[-1]  # sorted by size
    if not all(getattr(bottom, k) <= getattr(s, k) for s in candidates for k in ("layers", "hidden", "heads", "ffn")):
        bottom = candidates[0]
    return top, bottom


class SandwichRule(MethodHooks):
    """The largest, the smallest and M seeded random sub-networks of the SuperLM, one pass each (module docstring)."""

    name = "autodistil"

    def __init__(self, config: DistillConfig, parts, term):
        cfg = config.autodistil
        self.seed, self.count = config.train.seed, cfg.random_subnets
        self.student, self.term = parts.student, term
        self.layout = resolve_layout(parts.student)
        self.candidates = space_subnets(cfg, self.layout, term.relation_heads)
        self.largest, self.smallest = sandwich_ends(self.candidates, self.layout)
        self.full = self.largest.size(self.layout)
        self.active: Subnet | None = None  # the sub-network of the pass running now
        self.drawn: list[Subnet] = []  # the random sub-networks of the latest micro-batch
        self.draws = 0  # random sub-networks trained so far (state: resumes with the run)

    def passes(self, step: int, number: int) -> list[Callable[[], AbstractContextManager]]:
        generator = torch.Generator().manual_seed(seed_for(self.seed, "autodistil", number))
        self.drawn = draw(self.candidates, self.count, generator)
        self.draws += len(self.drawn)
        return [self.under(s) for s in (self.largest, self.smallest, *self.drawn)]

    def under(self, subnet: Subnet) -> Callable[[], AbstractContextManager]:
        """A context factory: inside, the student computes ``subnet`` and the term compares its kept heads."""

        @contextmanager
        def run():
            with apply_masks(self.student, self.layout, subnet_masks(subnet, self.layout)):
                self.active, self.term.widths = subnet, subnet.widths(self.layout)
                try:
                    yield subnet
                finally:
                    self.active, self.term.widths = None, None

        return run

    def log_values(self) -> dict[str, float]:
        sizes = [s.size(self.layout) / self.full for s in self.drawn]
        return {"autodistil/draws": self.draws,
                "autodistil/random_size": sum(sizes) / len(sizes) if sizes else 0.0,
                "autodistil/subnets": len(self.candidates)}

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws, "drawn": [s.name for s in self.drawn]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])
        names = {s.name: s for s in self.candidates}
        self.drawn = [names[n] for n in state["drawn"] if n in names]


def build(config: DistillConfig, parts) -> SandwichRule | None:
    if config.autodistil is None:
        return None
    others = [o.kind for o in config.objectives if o.weight > 0 and o.kind != OBJECTIVE]
    term = next((t for t in parts.terms if t.kind == OBJECTIVE), None)
    if term is None or others:
        raise ConfigError(f"autodistil trains its sub-networks on the {OBJECTIVE} objective only (Xu et al. 2022)"
                          + (f": drop {', '.join(others)}" if others else f": add objectives {OBJECTIVE} (recipe "
                             "autodistil)"))
    s, t = parts.student_arch, term.teacher_arch
    if (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads) != (t.num_layers, t.hidden_size, t.num_heads,
                                                                     t.num_kv_heads):
        raise ConfigError(f"autodistil trains a SuperLM of the teacher's shape ({t.num_layers}x{t.hidden_size}, "
                          f"{t.num_heads} heads) and the student is {s.num_layers}x{s.hidden_size} ({s.num_heads} "
                          f"heads): set student.num_layers={t.num_layers} and leave student.hidden_size / num_heads / "
                          "intermediate_size unset")
    return SandwichRule(config, parts, term)
