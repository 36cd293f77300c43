"""Masks over units, applied to a model by forward hooks: the weights are never changed.

A mask holds one value per unit: 1 keeps it, 0 removes it; a value in between scales it (a learned gate,
e.g. DPHuBERT's hard-concrete masks, reads the same hooks). The hooks read the ``Masks`` object at every
forward, so a method may replace its tensors between steps. With binary masks the masked model computes
what ``materialize`` builds, on the kept units (tests/test_structure.py):

- heads (L, H): the attention output projection's input is multiplied per head, before the projection
  (a removed query head contributes nothing; a key/value head all of whose query heads are removed is
  read by nobody);
- ffn (L, F): the down map's input is multiplied per channel;
- hidden (d,): every module that writes the residual stream has its output multiplied (embedding tables,
  attention output and down maps, dense layers of the heads), and every norm computes its statistics over
  the kept channels only (a LayerNorm's mean and variance, an RMSNorm's mean square): exactly what a norm
  of the narrower model computes, so the masked channels are zero everywhere and the kept ones equal the
  pruned model's;
- blocks (L,): a block's output is replaced by its input, out = x + m (block(x) - x).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tadistill.capture.architectures import get_module
from tadistill.structure.units import Layout, is_conv1d, norm_kind, out_features


@dataclass
class Masks:
    """Per-unit multipliers; None keeps every unit of that kind. heads (L, H), ffn (L, F), hidden (d,), blocks (L,)."""

    heads: Tensor | None = None
    ffn: Tensor | None = None
    hidden: Tensor | None = None
    blocks: Tensor | None = None

    @classmethod
    def keep(cls, layout: Layout, *, blocks: list[int] | None = None, heads: list[list[int]] | None = None,
             ffn: list[list[int]] | None = None, hidden: list[int] | None = None) -> Masks:
        """Binary masks that keep the listed units (per block for heads and ffn); None keeps all of a kind."""

        def ones_at(size: int, index: list[int]) -> Tensor:
            mask = torch.zeros(size)
            mask[torch.as_tensor(index, dtype=torch.long)] = 1.0
            return mask

        L = layout.num_layers
        return cls(
            heads=None if heads is None else torch.stack([ones_at(layout.num_heads, heads[i]) for i in range(L)]),
            ffn=None if ffn is None else torch.stack([ones_at(layout.ffn_size, ffn[i]) for i in range(L)]),
            hidden=None if hidden is None else ones_at(layout.hidden_size, hidden),
            blocks=None if blocks is None else ones_at(L, blocks),
        )


@dataclass
class Sites:
    """The modules where units are read or scaled, found once per model."""

    blocks: list[nn.Module]
    attention_output: list[nn.Module]  # per block: its input holds the heads, (B, T, H * head_dim)
    ffn_out: list[nn.Module]  # per block: its input holds the FFN units, (B, T, F)
    norms: list[nn.Module] = field(default_factory=list)  # every norm over the hidden channels
    writers: list[nn.Module] = field(default_factory=list)  # modules whose output is on the hidden channels


def unit_sites(model: nn.Module, layout: Layout) -> Sites:
    """Where ``model``'s units live: per-block maps, the norms and the modules writing the residual stream."""
    blocks = list(layout.blocks(model))
    sites = Sites(blocks, [get_module(b, layout.arch.attention_output) for b in blocks],
                  [get_module(b, layout.ffn_out) for b in blocks])
    d = layout.hidden_size
    inside = layout.arch.layers + "."
    get_output = getattr(model, "get_output_embeddings", None)
    output_layer = get_output() if callable(get_output) else None
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if norm_kind(module) is not None and isinstance(weight, Tensor) and weight.numel() == d:
            sites.norms.append(module)
        elif name.startswith(inside) or module is output_layer:
            continue
        elif isinstance(module, nn.Embedding) and module.embedding_dim == d:
            sites.writers.append(module)
        elif (isinstance(module, nn.Linear) or is_conv1d(module)) and out_features(module) == d:
            sites.writers.append(module)  # a head's dense layer (BERT's pooler and MLM transform)
    sites.writers += sites.attention_output + sites.ffn_out
    return sites


def masked_norm(module: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
    """``module`` (a LayerNorm or RMSNorm over d channels) computed over the kept channels only; zero elsewhere.

    x (..., d), keep (d,). Equals the norm of a model that has only the kept channels, with the kept entries
    of its weight and bias (statistics in float32, as Llama's RMSNorm computes them).
    """
    kind = norm_kind(module)
    m = keep.to(device=x.device, dtype=torch.float32)
    count = m.sum()
    xf = x.float()
    if kind == "layer":
        mean = (xf * m).sum(-1, keepdim=True) / count
        centered = (xf - mean) * m
        y = centered * torch.rsqrt((centered * centered).sum(-1, keepdim=True) / count + module.eps)
        y = y.to(x.dtype)
        if module.weight is not None:
            y = y * module.weight
        if module.bias is not None:
            y = y + module.bias
    else:
        y = xf * torch.rsqrt((xf * xf * m).sum(-1, keepdim=True) / count + module.variance_epsilon)
        y = module.weight * y.to(x.dtype)
    return y * m.to(y.dtype)


def _scale(values: Tensor, mask: Tensor, repeat: int = 1) -> Tensor:
    """values (..., U * repeat) times mask (U,) repeated per unit."""
    mask = mask.to(device=values.device, dtype=values.dtype)
    return values * (mask.repeat_interleave(repeat) if repeat > 1 else mask)


@contextmanager
def apply_masks(model: nn.Module, layout: Layout, masks: Masks) -> Iterator[Masks]:
    """Apply ``masks`` to every forward of ``model`` inside the block; the hooks are removed at its end."""
    sites = unit_sites(model, layout)
    handles = []

    def heads_hook(i: int):
        def hook(module, args):
            return None if masks.heads is None else (_scale(args[0], masks.heads[i], layout.head_dim), *args[1:])
        return hook

    def ffn_hook(i: int):
        def hook(module, args):
            return None if masks.ffn is None else (_scale(args[0], masks.ffn[i]), *args[1:])
        return hook

    def writer_hook(module, args, output):
        return None if masks.hidden is None else _scale(output, masks.hidden)

    def norm_hook(module, args, output):
        return None if masks.hidden is None else masked_norm(module, args[0], masks.hidden)

    def block_hook(i: int):
        def hook(module, args, kwargs, output):
            if masks.blocks is None:
                return None
            gate = masks.blocks[i]
            x = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            if gate.requires_grad:
                new = x + gate.to(x.dtype) * (out - x)
            elif float(gate) == 1.0:
                return None  # exactly the block's output
            else:
                new = x if float(gate) == 0.0 else x + float(gate) * (out - x)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    try:
        for i, (block, attention_output, ffn_out) in enumerate(zip(sites.blocks, sites.attention_output,
                                                                  sites.ffn_out)):
            handles.append(attention_output.register_forward_pre_hook(heads_hook(i)))
            handles.append(ffn_out.register_forward_pre_hook(ffn_hook(i)))
            handles.append(block.register_forward_hook(block_hook(i), with_kwargs=True))
        handles += [m.register_forward_hook(writer_hook) for m in sites.writers]
        handles += [m.register_forward_hook(norm_hook) for m in sites.norms]
        yield masks
    finally:
        for handle in handles:
            handle.remove()
