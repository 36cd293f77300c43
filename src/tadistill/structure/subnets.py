"""Sub-networks of a weight-shared SuperLM: the sub-space, the masks of one sub-network, its config.

AutoDistil (Xu et al. 2022, sec. 3.1; docs/methods.md, AutoDistil) trains one SuperLM and reads every
student of a sub-space out of it, with no weights of their own. A sub-space gives each of four dimensions
as (min, max, step): blocks, hidden size, attention heads, FFN ratio (FFN units / hidden size); all blocks of
a sub-network share one configuration. A sub-network of the SuperLM (L blocks, hidden d, H heads of width
d_h, F FFN units) keeps

- ``layers`` = k blocks, evenly spaced and ending with the last one: block ``floor((i + 1) L / k) - 1`` for
  i = 0 .. k - 1 (``kept_blocks``; k = L / 2 keeps every other block, 1, 3, 5 of 0..5; k = 4 of 6 keeps
  0, 2, 3, 5), so the last block, whose relations are distilled, is always the SuperLM's last block;
- the leading ``hidden`` channels of the residual stream, the leftmost ``heads`` query heads (with
  grouped-query attention the leading key/value heads that serve them) and the leading ``ffn`` units of
  every kept block (round(ratio x hidden)).

Its ``Masks`` (``subnet_masks``) applied with ``structure.apply_masks`` make the SuperLM compute the
sub-network, its weights shared; ``structure.materialize`` with the same masks extracts it as a plain
smaller model. A kind of unit a sub-network keeps whole gets no mask (None), so the largest sub-network is
the SuperLM itself, computed without any hook doing work.

Not every point of the product is a model: a Hugging Face config describes hidden = heads x d_h for the
families that derive the head width (BERT, GPT-2: ``Layout.explicit_head_dim`` false), grouped-query
attention keeps the same number of query heads per key/value head, and a relation loss splits the Q and
K/V widths into a fixed number of relation heads (``divisor``). ``subnets`` keeps the points that are
models and says why when none is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tadistill.structure.masks import Masks
from tadistill.structure.materialize import Kept, pruned_config
from tadistill.structure.units import Layout

Range = tuple[float, float, float]  # (min, max, step), both ends included


@dataclass(frozen=True)
class SubSpace:
    """(min, max, step) of blocks, hidden size, heads and FFN ratio; heads None: hidden / d_h (derived)."""

    layers: Range
    hidden: Range
    heads: Range | None
    ffn_ratio: Range


# The three sub-spaces of Xu et al. 2022 (sec. 4.1) for a BERT-base-size teacher (12 x 768, 12 heads of 64).
# Their SuperLM's attention width is heads x 64 whatever the hidden size; families whose Hugging Face config
# ties the two (BERT, GPT-2) keep only the points with hidden = heads x d_h (module docstring): "heads: derived"
# (heads = hidden / d_h) gives these spaces a point per hidden size that is a multiple of d_h.
PAPER_SPACES: dict[str, SubSpace] = {
    "paper-tiny": SubSpace(layers=(4, 7, 1), hidden=(128, 224, 32), heads=(7, 10, 1), ffn_ratio=(2.0, 3.5, 0.5)),
    "paper-small": SubSpace(layers=(9, 12, 1), hidden=(256, 352, 32), heads=(7, 10, 1), ffn_ratio=(2.5, 4.0, 0.5)),
    "paper-base": SubSpace(layers=(9, 12, 1), hidden=(544, 640, 32), heads=(9, 12, 1), ffn_ratio=(2.5, 4.0, 0.5)),
}
SPACES = ("auto", *PAPER_SPACES)


def auto_space(layout: Layout) -> SubSpace:
    """The paper's spaces scaled to any SuperLM: from half to all of its blocks, heads and FFN ratio.

    Blocks ceil(L/2) .. L step 1; heads from about H/2 to H in about four steps, in whole key/value groups,
    hidden = heads x d_h (derived); FFN ratio rho/2, 3 rho/4, rho, rho = F / d the SuperLM's own. The built-in
    6 x 384 teacher (12 heads of 32, F = 4 d) gives 4 x 3 x 3 = 36 sub-networks from 3 x 192 (6 heads,
    FFN 384) to the teacher itself; the tests' 4 x 32 BERT (4 heads of 8, F = 2 d) gives 27.
    """
    L, H, r = layout.num_layers, layout.num_heads, layout.group_size
    groups = H // r
    step = max(1, groups // 4)
    low = max(1, math.ceil(groups / 2))
    low = groups - ((groups - low) // step) * step  # so that the range ends exactly at H
    rho = layout.ffn_size / layout.hidden_size
    return SubSpace(layers=(math.ceil(L / 2), L, 1), hidden=(low * r * layout.head_dim, H * layout.head_dim,
                                                            step * r * layout.head_dim),
                    heads=None, ffn_ratio=(rho / 2, rho, rho / 4))


def range_values(span: Range) -> list[float]:
    """min, min + step, ... up to max (included, with a float tolerance)."""
    low, high, step = span
    count = int(math.floor((high - low) / step + 1e-9)) + 1
    return [low + i * step for i in range(max(count, 0))]


@dataclass(frozen=True, order=True)
class Subnet:
    """One sub-network: its block count, hidden size, query heads and FFN units (module docstring)."""

    layers: int
    hidden: int
    heads: int
    ffn: int

    @property
    def name(self) -> str:
        return f"L{self.layers}-H{self.hidden}-A{self.heads}-F{self.ffn}"

    def widths(self, layout: Layout) -> tuple[int, int]:
        """(Q width, K/V width) of its kept heads: the leading columns of the SuperLM's Q and K/V."""
        return self.heads * layout.head_dim, self.heads // layout.group_size * layout.head_dim

    def size(self, layout: Layout) -> int:
        """Weights of its blocks (Q, K, V, attention output, FFN maps): a cost to order sub-networks by."""
        q, kv = self.widths(layout)
        return self.layers * (2 * self.hidden * q + 2 * self.hidden * kv
                              + (len(layout.ffn_in) + 1) * self.hidden * self.ffn)


def kept_blocks(count: int, total: int) -> list[int]:
    """The ``count`` of ``total`` blocks a sub-network keeps: evenly spaced, the last one always kept."""
    if not 1 <= count <= total:
        raise ValueError(f"kept_blocks: count {count} must be in 1..{total}")
    return [(i + 1) * total // count - 1 for i in range(count)]


def problem(subnet: Subnet, layout: Layout, *, divisor: int = 1) -> str | None:
    """Why ``subnet`` is no model of ``layout``'s SuperLM (None: it is one)."""
    sizes = (("blocks", subnet.layers, layout.num_layers), ("hidden size", subnet.hidden, layout.hidden_size),
             ("heads", subnet.heads, layout.num_heads), ("FFN units", subnet.ffn, layout.ffn_size))
    for what, value, most in sizes:
        if not 1 <= value <= most:
            return f"{what} {value} outside 1..{most} (the SuperLM's)"
    if subnet.heads % layout.group_size:
        return f"{subnet.heads} heads are not whole key/value groups of {layout.group_size}"
    if not layout.explicit_head_dim and subnet.hidden != subnet.heads * layout.head_dim:
        return (f"{layout.arch.family} needs hidden = heads x {layout.head_dim}, not {subnet.hidden} with "
                f"{subnet.heads} heads")
    q, kv = subnet.widths(layout)
    if q % divisor or kv % divisor:
        return f"Q/K/V widths {q}, {kv} do not split into {divisor} relation heads"
    return None


def subnets(space: SubSpace, layout: Layout, *, divisor: int = 1) -> tuple[list[Subnet], list[str]]:
    """The sub-networks of ``space`` that are models of the SuperLM, smallest first; and why others are not.

    ``divisor``: the Q and K/V widths must be multiples of it (a relation loss's relation-head count).
    The reasons are distinct messages, for a one-line error when nothing is left.
    """
    found: set[Subnet] = set()
    reasons: dict[str, None] = {}  # distinct, in order of first appearance
    for layers in range_values(space.layers):
        for hidden in range_values(space.hidden):
            head_counts = [hidden / layout.head_dim] if space.heads is None else range_values(space.heads)
            for heads in head_counts:
                if not all(float(v).is_integer() for v in (layers, hidden, heads)):
                    reasons[f"{layers:g} blocks, hidden {hidden:g}, {heads:g} heads: not whole numbers (hidden must "
                            f"be a multiple of the head width {layout.head_dim} when heads are derived)"] = None
                    continue
                for ratio in range_values(space.ffn_ratio):
                    subnet = Subnet(int(layers), int(hidden), int(heads), int(round(ratio * hidden)))
                    why = problem(subnet, layout, divisor=divisor)
                    if why is None:
                        found.add(subnet)
                    else:
                        reasons[why] = None
    return sorted(found, key=lambda s: (s.size(layout), s)), list(reasons)


def subnet_masks(subnet: Subnet, layout: Layout) -> Masks:
    """The masks that make the SuperLM compute ``subnet`` (None for a kind kept whole)."""
    L = layout.num_layers
    whole = (subnet.layers == L, subnet.heads == layout.num_heads, subnet.ffn == layout.ffn_size,
             subnet.hidden == layout.hidden_size)
    return Masks.keep(
        layout,
        blocks=None if whole[0] else kept_blocks(subnet.layers, L),
        heads=None if whole[1] else [list(range(subnet.heads))] * L,
        ffn=None if whole[2] else [list(range(subnet.ffn))] * L,
        hidden=None if whole[3] else list(range(subnet.hidden)),
    )


def subnet_config(model_config, subnet: Subnet, layout: Layout):
    """The Hugging Face config of ``subnet`` extracted from a SuperLM with config ``model_config``."""
    return pruned_config(model_config, layout, Kept.of(subnet_masks(subnet, layout), layout))


def draw(candidates: list[Subnet], count: int, generator: torch.Generator) -> list[Subnet]:
    """``count`` sub-networks drawn uniformly, with replacement, from ``generator`` (a seeded CPU generator)."""
    if count <= 0:
        return []
    picks = torch.randint(len(candidates), (count,), generator=generator)
    return [candidates[i] for i in picks.tolist()]
