"""The prunable units of a Transformer and the modules that carry them.

A unit is what structured pruning keeps or removes whole (Muralidharan et al. 2024, Minitron, sec. 2;
Peng et al. 2023, DPHuBERT; Wu et al. 2023, WID; Xu et al. 2022, AutoDistil):

- an attention head: query head h of block l; its features are h * head_dim .. (h + 1) * head_dim - 1 of Q
  and of the attention output projection's input. With grouped-query attention (Ainslie et al. 2023) query
  head h reads key/value head h // (H / H_kv); a key/value head goes when all its query heads go, and a
  pruned model keeps the same number of query heads per key/value head (Hugging Face's layout);
- an FFN unit: intermediate channel j of block l (a row of the up / gate maps, a column of the down map);
- a hidden channel: channel i of the residual stream, the same in every block (a column of every embedding
  table, an entry of every norm, a row or column of every map that writes or reads the stream);
- a block.

``Layout`` resolves, once, where each kind lives in one model (``resolve_architecture`` plus the FFN maps of
the families below) and fails at set-up with a one-line error for a family it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tadistill.capture.architectures import Architecture, get_module, resolve_architecture
from tadistill.errors import ModelError


@dataclass(frozen=True)
class _Family:
    ffn_in: tuple[str, ...]  # inside one block: the maps whose outputs are the FFN units
    ffn_out: str  # inside one block: the map that reads them
    ffn_attribute: str  # the config attribute that holds the FFN width
    explicit_head_dim: bool  # the config stores head_dim; else head_dim = hidden_size / num_attention_heads


_BERT = _Family(("intermediate.dense",), "output.dense", "intermediate_size", False)
_LLAMA = _Family(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size", True)

# The families whose every tensor has a known role (tests/test_structure.py: BERT, GPT-2, Llama with GQA).
PRUNABLE_FAMILIES: dict[str, _Family] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "distilbert": _Family(("ffn.lin1",), "ffn.lin2", "hidden_dim", False),
    "gpt2": _Family(("mlp.c_fc",), "mlp.c_proj", "n_inner", False),
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
}


@dataclass(frozen=True)
class Layout:
    """Where one model keeps its units, and how many of each it has.

    ``arch`` gives the blocks, Q / K / V (or GPT-2's fused c_attn) and the attention output projection;
    ``ffn_in`` / ``ffn_out`` are paths inside one block. ``ffn_size`` is the FFN width F.
    """

    arch: Architecture
    ffn_in: tuple[str, ...]
    ffn_out: str
    ffn_attribute: str
    explicit_head_dim: bool
    ffn_size: int

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers

    @property
    def hidden_size(self) -> int:
        return self.arch.hidden_size

    @property
    def num_heads(self) -> int:
        return self.arch.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.arch.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.arch.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.arch.num_heads // self.arch.num_kv_heads

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model, self.arch.layers)

    def head_features(self, heads: list[int] | Tensor) -> Tensor:
        """Feature indices h * head_dim + j of ``heads`` (ascending order kept), shape (len(heads) * head_dim,)."""
        heads = torch.as_tensor(heads, dtype=torch.long)
        return (heads[:, None] * self.head_dim + torch.arange(self.head_dim)[None, :]).reshape(-1)


def resolve_layout(model: nn.Module) -> Layout:
    """The units of ``model`` (a base or head model of a family in ``PRUNABLE_FAMILIES``).

    Raises:
        ModelError: a family without support, or a block without the family's FFN maps.
        ArchitectureError: what ``resolve_architecture`` cannot find.
    """
    arch = resolve_architecture(model)
    family = PRUNABLE_FAMILIES.get(arch.family)
    if family is None:
        raise ModelError(f"structured pruning does not support model family {arch.family!r} yet: use one of "
                         f"{', '.join(sorted(PRUNABLE_FAMILIES))}")
    block = get_module(model, arch.layers)[0]
    for path in (*family.ffn_in, family.ffn_out):
        if not isinstance(getattr(get_module(block, path), "weight", None), Tensor):
            raise ModelError(f"{arch.family} block 0 has no FFN map {path!r} with a weight: not supported")
    return Layout(arch, family.ffn_in, family.ffn_out, family.ffn_attribute, family.explicit_head_dim,
                  ffn_size=in_features(get_module(block, family.ffn_out)))


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a Linear that stores its weight transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def in_features(module: nn.Module) -> int:
    return int(module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1])


def out_features(module: nn.Module) -> int:
    return int(module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0])


def norm_kind(module: nn.Module) -> str | None:
    """'layer' (LayerNorm), 'rms' (Llama-style RMSNorm: ``variance_epsilon``) or None."""
    if isinstance(module, nn.LayerNorm):
        return "layer"
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 1 and hasattr(module, "variance_epsilon"):
        return "rms"
    return None
