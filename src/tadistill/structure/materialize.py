"""Materialisation: the dense, smaller Hugging Face model that a set of kept units describes.

``materialize(model, layout, masks)`` builds a model of the same class from a smaller config (fewer blocks,
heads, key/value heads, FFN channels, hidden channels) and copies into it the kept rows and columns of every
tensor. ``save_pretrained`` of the result is a plain checkpoint that ``AutoModel`` (and the
``*ForCausalLM`` / ``*ForMaskedLM`` class of a model with a head) loads; with binary masks it computes what
``apply_masks`` computes on the kept units (tests/test_structure.py, per family).

Every tensor's dimensions get a role: a block's Q / K / V and FFN maps by their resolved paths, norms by
type, the rest outside the blocks by type and size (embedding tables: columns are hidden channels; dense
layers of the heads: hidden in and out; the output layer: hidden in, vocabulary out). A block tensor
without a role is refused (``ModelError``), never copied by guess. The head width is kept, so the attention
scaling 1/sqrt(head_dim) and rotary frequencies do not change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tadistill.errors import ConfigError, ModelError
from tadistill.structure.masks import Masks
from tadistill.structure.units import Layout, is_conv1d, norm_kind, out_features

Axes = tuple[str | None, ...]  # per dimension of a tensor: "hidden", "q", "kv", "qkv", "ffn" or None (kept whole)


@dataclass(frozen=True)
class Kept:
    """The kept units, checked materialisable; per-block lists are indexed by position in ``blocks``."""

    blocks: list[int]
    heads: list[list[int]]  # kept query heads of each kept block, ascending (grouped by key/value head)
    kv_heads: list[list[int]]  # kept key/value heads of each kept block, ascending
    ffn: list[list[int]]
    hidden: list[int]
    # Per kept block: the kept attention features h * head_dim + j when heads keep only some of their dimensions
    # (WID's per-dimension attention pruning: the same count in every head, shared by Q, K and V; no grouped-query
    # attention). None keeps whole heads. Fewer dimensions change the attention scale 1 / sqrt(head_dim): the caller
    # rescales the queries (methods/wid.py).
    features: list[list[int]] | None = None

    @classmethod
    def of(cls, masks: Masks, layout: Layout) -> Kept:
        """The kept units of binary ``masks``; ConfigError when no Hugging Face config can describe them."""
        for name in ("heads", "ffn", "hidden", "blocks"):
            m = getattr(masks, name)
            if m is not None and not bool(((m == 0) | (m == 1)).all()):
                raise ConfigError(f"{name} masks must be 0 or 1 to materialise a model: threshold learned gates first")
        L, H, r = layout.num_layers, layout.num_heads, layout.group_size

        def kept(mask: Tensor | None, size: int) -> list[int]:
            return list(range(size)) if mask is None else torch.nonzero(mask.cpu()).flatten().tolist()

        blocks = kept(masks.blocks, L)
        if not blocks:
            raise ConfigError("every block is masked: a model keeps at least one")
        heads = [kept(None if masks.heads is None else masks.heads[b], H) for b in blocks]
        ffn = [kept(None if masks.ffn is None else masks.ffn[b], layout.ffn_size) for b in blocks]
        hidden = kept(masks.hidden, layout.hidden_size)
        for what, lists in (("attention heads", heads), ("FFN units", ffn)):
            counts = {len(x) for x in lists}
            if len(counts) > 1 or 0 in counts:
                raise ConfigError(f"kept blocks keep {sorted(counts)} {what}: a Hugging Face config needs the same "
                                  "number (at least 1) in every block")
        kv_heads = []
        for b, block_heads in zip(blocks, heads):
            groups = sorted({h // r for h in block_heads})
            sizes = {sum(1 for h in block_heads if h // r == g) for g in groups}
            if len(sizes) > 1:
                raise ConfigError(f"block {b} keeps {sorted(sizes)} query heads per key/value head: grouped-query "
                                  "attention needs the same number in every group")
            kv_heads.append(groups)
        if len({len(g) for g in kv_heads}) > 1:
            raise ConfigError("kept blocks keep different numbers of key/value heads: a config has one")
        if not hidden:
            raise ConfigError("every hidden channel is masked: a model keeps at least one")
        if not layout.explicit_head_dim and len(hidden) != len(heads[0]) * layout.head_dim:
            raise ConfigError(f"{layout.arch.family} needs hidden_size = num_heads x head_dim: {len(hidden)} hidden "
                              f"channels with {len(heads[0])} heads of width {layout.head_dim} cannot be built")
        return cls(blocks, heads, kv_heads, ffn, hidden)


def pruned_config(config, layout: Layout, kept: Kept):
    """A deep copy of ``config`` with the kept sizes (head_dim unchanged; a layer_types list follows the blocks)."""
    out = copy.deepcopy(config)
    out.num_hidden_layers = len(kept.blocks)  # attribute_map: gpt2 n_layer, distilbert n_layers
    out.hidden_size = len(kept.hidden)
    out.num_attention_heads = len(kept.heads[0])
    if getattr(out, "num_key_value_heads", None) is not None:
        out.num_key_value_heads = len(kept.kv_heads[0])
    if layout.explicit_head_dim:  # else the modeling code would derive hidden_size / heads
        out.head_dim = layout.head_dim if kept.features is None else len(kept.features[0]) // len(kept.heads[0])
    setattr(out, layout.ffn_attribute, len(kept.ffn[0]))
    layer_types = getattr(out, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == layout.num_layers:
        out.layer_types = [layer_types[b] for b in kept.blocks]
    out.name_or_path = ""  # a new model: it must not claim the teacher's hub name
    return out


def tensor_axes(model: nn.Module, layout: Layout) -> dict[str, Axes]:
    """The role of each dimension of every parameter of ``model`` (module docstring)."""
    arch, d = layout.arch, layout.hidden_size
    roles: dict[str, tuple[str, str]] = {p: ("ffn", "hidden") for p in layout.ffn_in}  # (out, in)
    roles[layout.ffn_out] = ("hidden", "ffn")
    roles.update({p: r for p, r in ((arch.query, ("q", "hidden")), (arch.key, ("kv", "hidden")),
                                    (arch.value, ("kv", "hidden")), (arch.fused_qkv, ("qkv", "hidden")),
                                    (arch.attention_output, ("hidden", "q"))) if p is not None})
    get_output = getattr(model, "get_output_embeddings", None)
    output_layer = get_output() if callable(get_output) else None
    inside = arch.layers + "."
    axes: dict[str, Axes] = {}
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        rel = name[len(inside):].partition(".")[2] if name.startswith(inside) else None
        for pname, tensor in params.items():
            full = f"{name}.{pname}" if name else pname
            if norm_kind(module) is not None and tensor.numel() == d:
                axes[full] = ("hidden",)
            elif rel is not None:
                if rel not in roles:
                    raise ModelError(f"{arch.family} block tensor {rel}.{pname} has no known role: structured "
                                     "pruning does not support this layout")
                out_ax, in_ax = roles[rel]
                if tensor.dim() == 1:
                    axes[full] = (out_ax,)
                else:
                    axes[full] = (in_ax, out_ax) if is_conv1d(module) else (out_ax, in_ax)
            elif isinstance(module, nn.Embedding):
                axes[full] = (None, "hidden" if module.embedding_dim == d else None)
            elif isinstance(module, nn.Linear) or is_conv1d(module):
                out_ax = "hidden" if out_features(module) == d and module is not output_layer else None
                in_ax = "hidden" if (module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]) == d \
                    else None
                if tensor.dim() == 1:
                    axes[full] = (out_ax,)
                else:
                    axes[full] = (in_ax, out_ax) if is_conv1d(module) else (out_ax, in_ax)
            else:
                axes[full] = (None,) * tensor.dim()  # e.g. BERT's MLM output bias (V,)
    return axes


def _indices(axis: str, kept: Kept, position: int | None, layout: Layout) -> Tensor:
    if axis == "hidden":
        return torch.as_tensor(kept.hidden, dtype=torch.long)
    if position is None:
        raise ModelError(f"a tensor outside the blocks has a per-block axis {axis!r}: not supported")
    if kept.features is not None:  # some dimensions of each head (Kept.features)
        q = kv = torch.as_tensor(kept.features[position], dtype=torch.long)
    else:
        q = layout.head_features(kept.heads[position])
        kv = layout.head_features(kept.kv_heads[position])
    if axis == "q":
        return q
    if axis == "kv":
        return kv
    if axis == "qkv":  # GPT-2's fused [q | k | v] along the output features
        q_width, kv_width = layout.num_heads * layout.head_dim, layout.num_kv_heads * layout.head_dim
        return torch.cat([q, kv + q_width, kv + q_width + kv_width])
    return torch.as_tensor(kept.ffn[position], dtype=torch.long)  # "ffn"


def materialize(model: nn.Module, layout: Layout, masks: Masks | None, *, kept: Kept | None = None) -> nn.Module:
    """A new model of ``type(model)`` holding only the units ``masks`` keeps (binary masks).

    The new model is built from ``pruned_config`` (on the source's device and dtype, in the source's train /
    eval mode), then every tensor is filled from the source: block b of the new model is kept block
    ``kept.blocks[b]``, and each dimension is indexed by its role. ``kept`` replaces ``masks`` where masks
    cannot say what is kept (per-dimension attention features, ``Kept.features``). Raises ConfigError for masks
    no config can describe, ModelError for a tensor whose role is unknown.
    """
    kept = kept if kept is not None else Kept.of(masks, layout)  # ``kept`` given: already checked by the caller
    config = pruned_config(model.config, layout, kept)
    axes = tensor_axes(model, layout)
    source = model.state_dict()
    reference = next(model.parameters())
    new = type(model)(config).to(device=reference.device, dtype=reference.dtype)
    new.train(model.training)
    inside = layout.arch.layers + "."
    # Tied tensors (GPT-2's lm_head = wte) appear under several names: fill each object once.
    aliases: dict[int, tuple[Tensor, list[str]]] = {}
    for name, tensor in new.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), (tensor, []))[1].append(name)
    with torch.no_grad():
        for tensor, names in aliases.values():
            for name in names:
                position = None
                source_name = name
                if name.startswith(inside):
                    index, _, rest = name[len(inside):].partition(".")
                    position = int(index)
                    source_name = f"{inside}{kept.blocks[position]}.{rest}"
                if source_name in source:
                    break
            else:
                raise ModelError(f"pruned tensor {names[0]} has no counterpart in the source model")
            piece = source[source_name]
            for dim, axis in enumerate(axes.get(source_name, ())):
                if axis is not None:
                    piece = piece.index_select(dim, _indices(axis, kept, position, layout).to(piece.device))
            if piece.shape != tensor.shape:
                raise ModelError(f"pruned tensor {name} should have shape {tuple(tensor.shape)} but the kept units "
                                 f"give {tuple(piece.shape)}: the family's layout is not what tadistill expects")
            tensor.copy_(piece)
    return new
