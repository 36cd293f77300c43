"""Where a Transformer keeps its blocks, Q/K/V projections and final norm.

Distillation objectives need a few tensors from inside a model (hidden states, the Q/K/V projection
outputs of one block). ``resolve_architecture`` finds the modules that produce them once, at setup, by
looking names up in the explicit tables below; a model whose internals cannot be found fails here with
an ``ArchitectureError`` that names the missing piece, instead of failing at step 1000.

Paths are dotted attribute paths, as in ``model.get_submodule``:

* ``Architecture.layers`` and ``Architecture.final_norm`` start at the model that was given (so a head
  model such as ``BertForMaskedLM`` gets ``"bert.encoder.layer"``);
* ``query``, ``key``, ``value``, ``fused_qkv`` and ``attention_output`` start at ONE block, and are the
  same for every block.

Models the tables do not cover can still be used: build an ``Architecture`` by hand and pass it to
``tadistill.capture.capture``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tadistill.errors import ArchitectureError

# ----------------------------------------------------------------------------------------------------
# Candidate names per role, searched in order. Keep the family that needs each name next to it.
# ----------------------------------------------------------------------------------------------------

# The nn.ModuleList of blocks, relative to the base model (the root, or ``root.<base_model_prefix>``).
LAYERS_CANDIDATES: tuple[str, ...] = (
    "encoder.layer",  # bert, roberta, xlm-roberta, electra; vit with transformers 4.x
    "encoder.layers",  # hubert, wav2vec2
    "transformer.layer",  # distilbert
    "h",  # gpt2
    "layers",  # llama, qwen2, mistral; vit with transformers 5.x
)

# Projections inside one block. Separate Q, K and V are tried first, then a fused QKV module.
QUERY_CANDIDATES: tuple[str, ...] = (
    "attention.self.query",  # bert family
    "attention.attention.query",  # vit with transformers 4.x
    "attention.q_lin",  # distilbert
    "self_attn.q_proj",  # llama, qwen2, mistral
    "attention.q_proj",  # hubert, wav2vec2; vit with transformers 5.x
)
KEY_CANDIDATES: tuple[str, ...] = (
    "attention.self.key",
    "attention.attention.key",
    "attention.k_lin",
    "self_attn.k_proj",
    "attention.k_proj",
)
VALUE_CANDIDATES: tuple[str, ...] = (
    "attention.self.value",
    "attention.attention.value",
    "attention.v_lin",
    "self_attn.v_proj",
    "attention.v_proj",
)
# Only modules whose output is laid out as [q | k | v] along the last dim belong here (GPT-NeoX and
# Bloom interleave the three per head, so their "query_key_value" must NOT be added as is).
FUSED_QKV_CANDIDATES: tuple[str, ...] = (
    "attn.c_attn",  # gpt2 (a Conv1D, i.e. a transposed Linear)
)
ATTENTION_OUTPUT_CANDIDATES: tuple[str, ...] = (
    "attention.output.dense",  # bert family; vit with transformers 4.x
    "attention.out_lin",  # distilbert
    "attn.c_proj",  # gpt2
    "self_attn.o_proj",  # llama, qwen2, mistral
    "attention.o_proj",  # vit with transformers 5.x
    "attention.out_proj",  # hubert, wav2vec2
)
# A norm applied to the last block's output before the model returns it, relative to the base model.
# Only searched for families not listed in POST_LN_FAMILIES / STABLE_LAYER_NORM_FAMILIES.
FINAL_NORM_CANDIDATES: tuple[str, ...] = (
    "ln_f",  # gpt2
    "norm",  # llama, qwen2, mistral
    "layernorm",  # vit
)

# Post-LN encoders: each block ends with its own LayerNorm and the last block's output is returned as
# is (Devlin et al. 2019; Sanh et al. 2019), so there is no final norm.
POST_LN_FAMILIES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "distilbert"})
# Speech encoders with two layouts: with do_stable_layer_norm (pre-LN, "large" checkpoints) the encoder
# applies encoder.layer_norm AFTER the last block; without it the same module normalizes the block-0
# input (after the positional convolution) and the last block's output is returned as is.
STABLE_LAYER_NORM_FAMILIES = frozenset({"hubert", "wav2vec2"})
STABLE_FINAL_NORM = "encoder.layer_norm"
# Decoder-only families with causal self-attention; used when the attention module does not say.
CAUSAL_FAMILIES = frozenset({"gpt2", "llama", "qwen2", "mistral"})


@dataclass(frozen=True)
class Architecture:
    """The resolved internals of one model; see the module docstring for what each path is relative to.

    ``query`` / ``key`` / ``value`` are all set, or all ``None`` with ``fused_qkv`` set. Q has
    ``num_heads * head_dim`` features, K and V ``num_kv_heads * head_dim`` each.
    """

    family: str
    layers: str
    query: str | None
    key: str | None
    value: str | None
    fused_qkv: str | None
    attention_output: str | None
    final_norm: str | None
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    vocab_size: int | None = None  # rows of the token embedding table (None: no text input, e.g. ViT)

    def __post_init__(self) -> None:
        separate = (self.query, self.key, self.value)
        if self.fused_qkv is None and None in separate:
            raise ArchitectureError(
                f"Architecture of {self.family!r} needs query, key and value paths, or fused_qkv: set them"
            )
        if self.fused_qkv is not None and any(p is not None for p in separate):
            raise ArchitectureError(
                f"Architecture of {self.family!r} sets both fused_qkv and query/key/value: keep only one"
            )
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ArchitectureError(f"Architecture.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ArchitectureError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}): "
                "fix num_key_value_heads in the model config"
            )


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    """Return the submodule at ``dotted`` ("" is the model itself); ArchitectureError when absent."""
    module = _find(model, dotted)
    if module is None:
        raise ArchitectureError(
            f"{type(model).__name__} has no submodule {dotted!r}: check the path against "
            "print(model) (paths are dotted attribute names, list indices included)"
        )
    return module


def resolve_architecture(model: nn.Module) -> Architecture:
    """Find the blocks, projections, final norm and head counts of ``model`` (a base or head model).

    Raises ArchitectureError naming the first piece that cannot be found and the names tried.
    """
    cls = type(model).__name__
    base_prefix, layers_rel = _resolve_layers(model)
    layers_path = _join(base_prefix, layers_rel)
    blocks = get_module(model, layers_path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ArchitectureError(f"{cls}.{layers_path} is not a non-empty nn.ModuleList of blocks: not supported")

    query = _first_in_block(blocks[0], QUERY_CANDIDATES)
    key = _first_in_block(blocks[0], KEY_CANDIDATES)
    value = _first_in_block(blocks[0], VALUE_CANDIDATES)
    fused = None
    if None in (query, key, value):
        fused = _first_in_block(blocks[0], FUSED_QKV_CANDIDATES)
        if fused is None:
            role, tried = _missing_projection(query, key)
            raise ArchitectureError(
                f"cannot find the {role} projection of {cls} block 0 (tried: {', '.join(tried)}; fused: "
                f"{', '.join(FUSED_QKV_CANDIDATES)}): this architecture is not supported yet"
            )
        query = key = value = None
    attention_output = _first_in_block(blocks[0], ATTENTION_OUTPUT_CANDIDATES)
    if attention_output is None:
        raise ArchitectureError(
            f"cannot find the attention output projection of {cls} block 0 (tried: "
            f"{', '.join(ATTENTION_OUTPUT_CANDIDATES)}): this architecture is not supported yet"
        )
    # Every block must have the same layout; a heterogeneous stack would break hooks silently.
    for i, block in enumerate(blocks):
        for path in (query, key, value, fused, attention_output):
            if path is not None and _find(block, path) is None:
                raise ArchitectureError(f"{cls} block {i} has no {path!r} although block 0 has: not supported")

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        raise ArchitectureError(
            f"{cls} has no Hugging Face config with num_attention_heads (model.config): build an "
            "Architecture by hand for this model"
        )
    family = str(getattr(config, "model_type", "") or cls)
    num_heads = int(config.num_attention_heads)  # attribute_map: gpt2 n_head, distilbert n_heads
    hidden_size = int(config.hidden_size)  # attribute_map: gpt2 n_embd, distilbert dim
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)  # GQA (Ainslie et al. 2023)
    head_dim = int(getattr(config, "head_dim", None) or hidden_size // num_heads)

    final_norm = _resolve_final_norm(model, base_prefix, family, config)
    attention_module = _find(blocks[0], (fused or query).rpartition(".")[0])
    causal = _resolve_causal(attention_module, family, config)

    arch = Architecture(
        family=family,
        layers=layers_path,
        query=query,
        key=key,
        value=value,
        fused_qkv=fused,
        attention_output=attention_output,
        final_norm=final_norm,
        num_layers=len(blocks),
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        causal=causal,
        vocab_size=getattr(config, "vocab_size", None),
    )
    _check_widths(cls, blocks[0], arch)
    return arch


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _find(root: nn.Module, dotted: str) -> nn.Module | None:
    """The submodule at ``dotted`` or None; ModuleList indices are attribute names ("0", "1", ...)."""
    module = root
    for part in dotted.split(".") if dotted else ():
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _base_prefixes(model: nn.Module) -> list[str]:
    """"" first, then the base model's attribute name of a head model (``base_model_prefix``)."""
    prefixes = [""]
    name = getattr(model, "base_model_prefix", "")
    if isinstance(name, str) and name and isinstance(_find(model, name), nn.Module):
        prefixes.append(name)
    return prefixes


def _resolve_layers(model: nn.Module) -> tuple[str, str]:
    """(base prefix, layers path relative to the base) of the first candidate that is a ModuleList."""
    prefixes = _base_prefixes(model)
    for prefix in prefixes:
        base = _find(model, prefix)
        for candidate in LAYERS_CANDIDATES:
            if isinstance(_find(base, candidate), nn.ModuleList):
                return prefix, candidate
    where = " and under ".join(repr(p + ".") for p in prefixes if p)
    raise ArchitectureError(
        f"cannot find the list of blocks of {type(model).__name__} (tried: {', '.join(LAYERS_CANDIDATES)}"
        f"{' at the root and under ' + where if where else ''}): this architecture is not supported yet"
    )


def _first_in_block(block: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for candidate in candidates:
        if _find(block, candidate) is not None:
            return candidate
    return None


def _missing_projection(query: str | None, key: str | None) -> tuple[str, tuple[str, ...]]:
    if query is None:
        return "query", QUERY_CANDIDATES
    if key is None:
        return "key", KEY_CANDIDATES
    return "value", VALUE_CANDIDATES


def _resolve_final_norm(model: nn.Module, base_prefix: str, family: str, config: object) -> str | None:
    if family in POST_LN_FAMILIES:
        return None
    if family in STABLE_LAYER_NORM_FAMILIES:
        if not getattr(config, "do_stable_layer_norm", False):
            return None
        path = _join(base_prefix, STABLE_FINAL_NORM)
        if _find(model, path) is None:
            raise ArchitectureError(f"cannot find the final norm {path!r} of {type(model).__name__}: not supported")
        return path
    # Other families: the first candidate that exists; none means the last block's output is returned.
    base = _find(model, base_prefix)
    for candidate in FINAL_NORM_CANDIDATES:
        if _find(base, candidate) is not None:
            return _join(base_prefix, candidate)
    return None


def _resolve_causal(attention: nn.Module | None, family: str, config: object) -> bool:
    # Hugging Face attention modules carry is_causal (e.g. BERT sets it from config.is_decoder).
    flag = getattr(attention, "is_causal", None)
    if isinstance(flag, bool):
        return flag
    return family in CAUSAL_FAMILIES or bool(getattr(config, "is_decoder", False))


def _out_features(module: nn.Module) -> int | None:
    """Output width of a Linear (out_features) or a transformers Conv1D (nf); None when unknown."""
    for attr in ("out_features", "nf"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def _check_widths(cls: str, block: nn.Module, arch: Architecture) -> None:
    """The config's head counts must match the projection widths, or attention maps would be wrong."""
    q_width = arch.num_heads * arch.head_dim
    kv_width = arch.num_kv_heads * arch.head_dim
    if arch.fused_qkv is not None:
        expected = {arch.fused_qkv: q_width + 2 * kv_width}
    else:
        expected = {arch.query: q_width, arch.key: kv_width, arch.value: kv_width}
    for path, width in expected.items():
        actual = _out_features(get_module(block, path))
        if actual is not None and actual != width:
            raise ArchitectureError(
                f"{cls} block 0 {path} has {actual} outputs but the config implies {width} (heads "
                f"{arch.num_heads}, kv heads {arch.num_kv_heads}, head_dim {arch.head_dim}): fix the config"
            )
