"""Compactors: identity-initialised, bias-free square maps around a model's linear maps, folded away at the end.

A compactor is a learned d x d matrix C applied to the input side (x -> C x) or the output side (y -> C y) of a
linear map W (Ding et al. 2021, ResRep; Wu et al. 2023, WID, sec. 3.1). Trained with the model, it mixes the
units of one side, and its rows / columns of small norm mark units that can go; at the end it is folded into
the weight, W' = C_out W C_in and b' = C_out b (an embedding table E: E' = E C_out^T), so the folded model
computes what the model with compactors computed and carries no extra matrices.

Where they sit (``compactor_sites``), by what their units are (``Site.axis``):

- per block: Q, K, V (input: hidden channels; output: attention features h * head_dim + j), the attention
  output projection (input: attention features; output: hidden), each FFN map (input: hidden; output: FFN
  units) and the down map (input: FFN units; output: hidden);
- outside the blocks: the output side of every embedding table on the hidden channels, both sides of the
  heads' dense layers (BERT's MLM transform), the input side of an untied output layer. A table tied to the
  output layer (BERT's decoder reads the word embeddings) gets none: one tensor cannot hold two folded maps.

Hidden channels are one set for the whole residual stream: a compactor on the output of a map writing the
stream mixes that map's output (an internal axis, folded away), and whether a channel exists is decided by
the stream's mask (``masks.py``: writers' outputs multiplied, norms over the kept channels). Compactor hooks
are installed before ``apply_masks``, so a writer's output is mixed first and masked second, the order the
folded and pruned model computes in.

Per-unit multipliers for attention features and FFN units (``Compactors.unit_scale``: (L, features) and
(L, F), None for 1) scale the units where the compactors act: the output of Q, K, V and the FFN maps, the
input of the attention output projection and the down map. Folding includes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from tadistill.capture.architectures import get_module
from tadistill.structure.units import Layout, in_features, is_conv1d, out_features

Axis = Literal["hidden", "attention", "ffn"]


@dataclass(frozen=True)
class Site:
    """One compactor: module ``path`` (from the model's root), the side it acts on, what its units are."""

    path: str
    side: Literal["in", "out"]
    axis: Axis
    block: int | None  # the block of a per-block axis (attention, ffn)
    size: int

    @property
    def key(self) -> str:
        """The parameter name (ParameterDict keys may not contain dots)."""
        return f"{self.path.replace('.', '__')}__{self.side}"


def compactor_sites(model: nn.Module, layout: Layout) -> list[Site]:
    """Every compactor of ``model`` (module docstring), in a fixed order: blocks first, then the rest."""
    arch, d = layout.arch, layout.hidden_size
    if arch.fused_qkv is not None:
        raise ValueError("compactors need separate Q, K and V maps")  # callers check the family first
    sites: list[Site] = []
    for i in range(layout.num_layers):
        base = f"{arch.layers}.{i}."
        attention = layout.num_heads * layout.head_dim
        for path in (arch.query, arch.key, arch.value):
            sites += [Site(base + path, "in", "hidden", i, d), Site(base + path, "out", "attention", i, attention)]
        sites += [Site(base + arch.attention_output, "in", "attention", i, attention),
                  Site(base + arch.attention_output, "out", "hidden", i, d)]
        for path in layout.ffn_in:
            sites += [Site(base + path, "in", "hidden", i, d), Site(base + path, "out", "ffn", i, layout.ffn_size)]
        sites += [Site(base + layout.ffn_out, "in", "ffn", i, layout.ffn_size),
                  Site(base + layout.ffn_out, "out", "hidden", i, d)]
    get_output = getattr(model, "get_output_embeddings", None)
    output_layer = get_output() if callable(get_output) else None
    tied = output_layer.weight if output_layer is not None else None
    inside = arch.layers + "."
    for name, module in model.named_modules():
        if name.startswith(inside):
            continue
        if isinstance(module, nn.Embedding) and module.embedding_dim == d and module.weight is not tied:
            sites.append(Site(name, "out", "hidden", None, d))
        elif module is output_layer:
            if module.weight is not getattr(getattr(model, "get_input_embeddings", lambda: None)(), "weight", None):
                sites.append(Site(name, "in", "hidden", None, d))
        elif (isinstance(module, nn.Linear) or is_conv1d(module)) and in_features(module) == d \
                and out_features(module) == d:
            sites += [Site(name, "in", "hidden", None, d), Site(name, "out", "hidden", None, d)]
    return sites


class Compactors(nn.Module):
    """The compactors of one model: identity matrices to start, one parameter per ``Site``.

    ``unit_scale`` holds the multipliers of attention features and FFN units (None: 1); a method may replace
    them between steps (masks that grow, fade-outs).
    """

    def __init__(self, sites: list[Site]):
        super().__init__()
        self.sites = sites
        self.weights = nn.ParameterDict({s.key: nn.Parameter(torch.eye(s.size)) for s in sites})
        self.unit_scale: dict[str, Tensor | None] = {"attention": None, "ffn": None}

    def matrix(self, site: Site) -> Tensor:
        return self.weights[site.key]

    def scale(self, site: Site, like: Tensor) -> Tensor | None:
        """The multipliers of ``site``'s units, (size,) on ``like``'s device and dtype; None: all 1."""
        if site.axis == "hidden" or self.unit_scale[site.axis] is None:
            return None
        return self.unit_scale[site.axis][site.block].to(device=like.device, dtype=like.dtype)

    @contextmanager
    def installed(self, model: nn.Module) -> Iterator[Compactors]:
        """Apply the compactors to every forward of ``model`` inside the block (hooks removed at its end)."""
        handles = []

        def before(site: Site):
            def hook(module, args):
                x = args[0]  # (..., in)
                scale = self.scale(site, x)
                if scale is not None:
                    x = x * scale
                return (x @ self.matrix(site).to(x.dtype).T, *args[1:])  # C x per position
            return hook

        def after(site: Site):
            def hook(module, args, output):
                y = output @ self.matrix(site).to(output.dtype).T  # (..., out): C y per position
                scale = self.scale(site, y)
                return y if scale is None else y * scale
            return hook

        try:
            for site in self.sites:
                module = get_module(model, site.path)
                if site.side == "in":
                    handles.append(module.register_forward_pre_hook(before(site)))
                else:
                    handles.append(module.register_forward_hook(after(site)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def folded(self, model: nn.Module) -> dict[str, Tensor]:
        """The weights (and biases) of every module with compactors, the compactors and multipliers folded in:
        W' = diag(s_out) C_out W C_in diag(s_in), b' = diag(s_out) C_out b, E' = E C_out^T diag(s_out).

        Keys are parameter names of ``model``; a model carrying these tensors and no hooks computes what
        ``model`` computes with the compactors installed (tests/test_wid.py).
        """
        by_path: dict[str, dict[str, Site]] = {}
        for site in self.sites:
            by_path.setdefault(site.path, {})[site.side] = site
        out: dict[str, Tensor] = {}
        for path, sides in by_path.items():
            module = get_module(model, path)
            weight = module.weight.detach().float()
            if is_conv1d(module):
                weight = weight.T  # Conv1D stores (in, out)
            if isinstance(module, nn.Embedding):
                site = sides["out"]
                folded = self._with_scale(weight @ self.matrix(site).float().T, site, dim=1)
                out[f"{path}.weight"] = folded.to(module.weight.dtype)
                continue
            if "in" in sides:
                site = sides["in"]
                weight = self._with_scale(weight @ self.matrix(site).float(), site, dim=1)  # W C_in diag(s_in)
            bias = getattr(module, "bias", None)
            bias = None if bias is None else bias.detach().float()
            if "out" in sides:
                site = sides["out"]
                c = self.matrix(site).float()
                weight = self._with_scale(c @ weight, site, dim=0)  # diag(s_out) C_out W
                if bias is not None:
                    bias = self._with_scale(c @ bias, site, dim=0)
            out[f"{path}.weight"] = (weight.T if is_conv1d(module) else weight).to(module.weight.dtype)
            if bias is not None:
                out[f"{path}.bias"] = bias.to(module.bias.dtype)
        return out

    def _with_scale(self, tensor: Tensor, site: Site, *, dim: int) -> Tensor:
        scale = self.scale(site, tensor)
        if scale is None:
            return tensor
        return tensor * (scale[:, None] if dim == 0 and tensor.dim() == 2 else scale)


def fold_into_copy(model: nn.Module, compactors: Compactors) -> nn.Module:
    """A new model of ``type(model)`` and config, with ``model``'s weights and the compactors folded in; no hooks."""
    reference = next(model.parameters())
    new = type(model)(model.config).to(device=reference.device, dtype=reference.dtype)
    new.load_state_dict(model.state_dict())
    new.train(model.training)
    folded = compactors.folded(model)
    with torch.no_grad():
        for name, tensor in new.named_parameters():
            if name in folded:
                tensor.copy_(folded[name])
    return new
