"""Minitron's importance from activations (Muralidharan et al. 2024, sec. 2.2; Sreenivas et al. 2024, sec. 2).

The teacher runs over a small calibration set; each unit is scored by the activations it produces
(docs/methods.md, Minitron):

- attention head i of a block: the L2 norm of its attention output, ||Attn(X W_Q^i, X W_K^i, X W_V^i)||_2,
  read per token at the input of the attention output projection (B, T, H, head_dim);
- FFN unit i: the magnitude of its activation, read where it enters the down map (B, T, F): the paper writes
  X (W_1^i)^T; for a gated MLP (Llama) the activation is act(X W_gate^i) * X W_up^i, the value the unit
  contributes (and the one a mask multiplies);
- hidden (embedding) channel i: the magnitude of LN(X)_i summed over every norm over the residual stream
  (the paper's LayerNorm activations; RMSNorm for Llama-style models);
- block l: block importance, BI_l = 1 - E_tokens[cos(X_l, X_{l+1})] between the block's input and output
  (Men et al. 2024, ShortGPT, eq. 2; Minitron's depth criterion besides perplexity).

Aggregation over the calibration set (Sreenivas et al. 2024, sec. 2.1: "l2-norm and mean as the aggregation
functions across the batch and sequence dimensions"): a unit's magnitude is averaged over each sequence's
valid tokens, and the per-sequence means are combined by their L2 norm over sequences. Only running sums
(one number per unit) are kept between batches, so the calibration set streams: nothing holds all
activations, and splitting it into batches changes nothing (tests/test_minitron.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from tadistill.structure import Layout, Scores, unit_sites


def _sequence_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean over each sequence's valid tokens: values (B, T, U), valid (B, T) -> (B, U), in float32."""
    weights = valid.to(device=values.device, dtype=torch.float32)
    return (values.float() * weights[..., None]).sum(1) / weights.sum(1).clamp_min(1.0)[:, None]


class _Accumulator:
    """Running sums of squared per-sequence means (L2 over sequences), and of BI over tokens."""

    def __init__(self, layout: Layout):
        L = layout.num_layers
        self.layout = layout
        self.heads = torch.zeros(L, layout.num_heads, dtype=torch.float64)
        self.ffn = torch.zeros(L, layout.ffn_size, dtype=torch.float64)
        self.hidden = torch.zeros(layout.hidden_size, dtype=torch.float64)
        self.block_distance = torch.zeros(L, dtype=torch.float64)
        self.tokens = 0.0
        self.valid: Tensor | None = None  # (B, T) of the batch being run

    def squared_means(self, values: Tensor) -> Tensor:
        return _sequence_mean(values, self.valid).pow(2).sum(0).double().cpu()  # (U,)

    def scores(self) -> Scores:
        return Scores(heads=self.heads.sqrt().float(), ffn=self.ffn.sqrt().float(), hidden=self.hidden.sqrt().float(),
                      blocks=(self.block_distance / max(self.tokens, 1.0)).float())


def activation_scores(model: nn.Module, layout: Layout, batches: Iterable[dict[str, Tensor]]) -> Scores:
    """Minitron's importance of every unit of ``model`` over ``batches`` (module docstring).

    ``batches`` yields dicts with ``input_ids`` and ``attention_mask`` (B, T); it is consumed once, lazily.
    The base model runs (no output layer: its logits are not needed) under no_grad in eval mode; the
    model's mode is restored afterwards.
    """
    sites = unit_sites(model, layout)
    acc = _Accumulator(layout)
    H, dh = layout.num_heads, layout.head_dim

    def heads_hook(i: int):
        def hook(module, args):
            x = args[0]  # (B, T, H * head_dim): the heads' outputs, concatenated
            acc.heads[i] += acc.squared_means(x.unflatten(-1, (H, dh)).float().norm(dim=-1))  # (B, T, H)
        return hook

    def ffn_hook(i: int):
        def hook(module, args):
            acc.ffn[i] += acc.squared_means(args[0].abs())  # (B, T, F)
        return hook

    def norm_hook(module, args, output):
        acc.hidden += acc.squared_means(output.abs())  # (B, T, d)

    def block_hook(i: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
            out = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(x.float(), out.float(), dim=-1)  # (B, T)
            valid = acc.valid.to(device=cosine.device, dtype=torch.float32)
            acc.block_distance[i] += float(((1.0 - cosine) * valid).sum())
        return hook

    handles = []
    for i, (block, attention_output, ffn_out) in enumerate(zip(sites.blocks, sites.attention_output, sites.ffn_out)):
        handles.append(attention_output.register_forward_pre_hook(heads_hook(i)))
        handles.append(ffn_out.register_forward_pre_hook(ffn_hook(i)))
        handles.append(block.register_forward_hook(block_hook(i), with_kwargs=True))
    handles += [norm.register_forward_hook(norm_hook) for norm in sites.norms]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                input_ids = batch["input_ids"].to(device)
                attention_mask = batch["attention_mask"].to(device)
                acc.valid = attention_mask.bool()
                acc.tokens += float(attention_mask.sum())
                model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        acc.valid = None
    return acc.scores()
