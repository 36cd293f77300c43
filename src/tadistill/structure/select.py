"""From importance scores to the units kept under a target shape.

Every structured method ranks units by a score of its own (Minitron: activations; DPHuBERT: learned gate
probabilities; WID: compactor norms); the kept set is chosen here, one way for all:

- blocks: the ``num_layers`` highest-scoring blocks, in their original order;
- heads, per kept block: the ``num_kv_heads`` key/value groups with the largest summed score of their query
  heads, then in each the ``num_heads / num_kv_heads`` highest-scoring query heads (grouped-query attention
  needs the same number of query heads per key/value head; without GQA a group is one head);
- FFN units, per kept block: the ``intermediate_size`` highest-scoring channels;
- hidden channels: the ``hidden_size`` highest-scoring channels, the same in every block.

Every block keeps the same counts because a Hugging Face config has one head count and one FFN width. Ties
go to the lower index (stable sort), so equal scores keep the leading units, as width slicing does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tadistill.errors import ConfigError
from tadistill.structure.masks import Masks
from tadistill.structure.units import Layout


@dataclass
class Scores:
    """Importance per unit, higher = more important. heads (L, H), ffn (L, F), hidden (d,), blocks (L,)."""

    heads: Tensor
    ffn: Tensor
    hidden: Tensor
    blocks: Tensor


@dataclass(frozen=True)
class TargetShape:
    """The shape to prune to: the sizes of the student's config."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


def check_target(layout: Layout, target: TargetShape) -> None:
    """One-line ConfigErrors for a target the teacher cannot be pruned to."""
    sizes = {"num_layers": layout.num_layers, "hidden_size": layout.hidden_size, "num_heads": layout.num_heads,
             "num_kv_heads": layout.num_kv_heads, "intermediate_size": layout.ffn_size}
    for name, teacher in sizes.items():
        value = getattr(target, name)
        if value < 1:
            raise ConfigError(f"pruning target {name}={value} must be at least 1")
        if value > teacher:
            raise ConfigError(f"pruning target {name}={value} is larger than the teacher's {teacher}: pruning only "
                              "removes units; choose at most the teacher's size")
    if target.num_heads % target.num_kv_heads:
        raise ConfigError(f"{target.num_heads} query heads do not divide into {target.num_kv_heads} key/value heads: "
                          "choose a head count that is a multiple of the key/value heads")
    per_group = target.num_heads // target.num_kv_heads
    if per_group > layout.group_size:
        raise ConfigError(f"{per_group} query heads per key/value head is more than the teacher's "
                          f"{layout.group_size}: keep more key/value heads (prune.num_kv_heads) or fewer query heads")
    if not layout.explicit_head_dim and target.hidden_size != target.num_heads * layout.head_dim:
        raise ConfigError(
            f"{layout.arch.family} has head_dim = hidden_size / num_heads and pruning keeps whole heads of width "
            f"{layout.head_dim}: hidden size {target.hidden_size} needs {target.hidden_size / layout.head_dim:g} "
            f"heads; set student.num_heads={max(1, target.hidden_size // layout.head_dim)} and student.hidden_size="
            f"{max(1, target.hidden_size // layout.head_dim) * layout.head_dim}")


def top(scores: Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, ascending; ties to the lower index."""
    order = torch.argsort(scores.float().cpu(), descending=True, stable=True)
    return sorted(order[:k].tolist())


def _heads(scores: Tensor, layout: Layout, target: TargetShape) -> list[int]:
    """Kept query heads of one block (scores (H,)), grouped by their key/value head."""
    groups = scores.float().cpu().reshape(layout.num_kv_heads, layout.group_size)  # (H_kv, H / H_kv)
    per_group = target.num_heads // target.num_kv_heads
    kept = []
    for g in top(groups.sum(1), target.num_kv_heads):
        kept += [g * layout.group_size + j for j in top(groups[g], per_group)]
    return kept


def select_units(scores: Scores, layout: Layout, target: TargetShape) -> Masks:
    """Binary masks keeping the most important units that fit ``target`` (module docstring)."""
    check_target(layout, target)
    blocks = top(scores.blocks, target.num_layers)
    L = layout.num_layers
    return Masks.keep(
        layout,
        blocks=blocks,
        heads=[_heads(scores.heads[i], layout, target) for i in range(L)],
        ffn=[top(scores.ffn[i], target.intermediate_size) for i in range(L)],
        hidden=top(scores.hidden, target.hidden_size),
    )
