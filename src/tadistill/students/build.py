"""Student configs and randomly initialised students derived from a teacher's config.

A student is the teacher's architecture with fewer layers, a narrower hidden size, fewer heads or a
smaller FFN (DistilBERT, Sanh et al. 2019; MiniLM, Wang et al. 2020). ``student_config`` copies the
teacher's config and overrides only those four numbers, under each family's attribute names, so the
vocabulary, the tokenizer ids, the maximum positions and the dropout rates stay the teacher's.
``build_student`` turns a config into a randomly initialised Hugging Face model;
``tadistill.students.init.init_from_teacher`` then optionally copies the teacher's weights into it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PretrainedConfig,
    PreTrainedModel,
)

from tadistill.errors import ConfigError, did_you_mean

# head name -> Auto class; the one table that build_student and evaluation.cost share.
STUDENT_HEADS = {
    "base": AutoModel,
    "mlm": AutoModelForMaskedLM,
    "causal-lm": AutoModelForCausalLM,
}

# Families whose FFN width is not called ``intermediate_size``; every other family uses the standard
# name (BERT, RoBERTa, XLM-R, ELECTRA, Llama, Qwen2, Mistral, ViT, HuBERT, wav2vec2 ...). The standard
# names hidden_size / num_hidden_layers / num_attention_heads reach DistilBERT's dim / n_layers /
# n_heads and GPT-2's n_embd / n_layer / n_head through each config's ``attribute_map``.
_FFN_ATTRIBUTE = {"distilbert": "hidden_dim", "gpt2": "n_inner"}

# Families with a gated MLP (SwiGLU / GeGLU): three d x d_ff matrices instead of two.
GATED_MLP_FAMILIES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2"}
)


@dataclass(frozen=True)
class ConfigShape:
    """The sizes of a Transformer read from its config, under one set of names for every family.

    ``kv_heads`` equals ``heads`` without grouped-query attention; ``head_dim`` is the per-head width
    of Q/K/V (``hidden_size / heads`` unless the config sets it, as Llama-style configs may);
    ``embedding_size`` is ELECTRA's factorised embedding width (``hidden_size`` elsewhere);
    ``vocab_size`` is None for families without a vocabulary (ViT).
    """

    family: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    gated_mlp: bool
    vocab_size: int | None
    embedding_size: int


def config_shape(config: PretrainedConfig) -> ConfigShape:
    """Read the layer count and widths of ``config`` whatever its family calls them."""
    family = str(getattr(config, "model_type", "") or "unknown")
    try:
        layers = int(config.num_hidden_layers)
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
    except (AttributeError, TypeError) as exc:
        raise ConfigError(
            f"model type {family!r} has no standard layer / hidden / head sizes in its config: "
            "use a BERT-, GPT-2-, Llama- or ViT-style teacher"
        ) from exc
    kv = getattr(config, "num_key_value_heads", None)
    head_dim = getattr(config, "head_dim", None)
    ffn = getattr(config, _FFN_ATTRIBUTE.get(family, "intermediate_size"), None)
    vocab = getattr(config, "vocab_size", None)
    # GPT-2 (n_inner=None) and GPT-Neo style configs leave the FFN width unset to mean 4 d.
    ffn = 4 * hidden if ffn is None else int(ffn)
    return ConfigShape(
        family=family,
        layers=layers,
        hidden_size=hidden,
        heads=heads,
        kv_heads=heads if kv is None else int(kv),
        head_dim=hidden // heads if head_dim is None else int(head_dim),
        intermediate_size=ffn,
        gated_mlp=family in GATED_MLP_FAMILIES,
        vocab_size=None if vocab is None else int(vocab),
        embedding_size=int(getattr(config, "embedding_size", None) or hidden),
    )


# Far beyond any published Transformer (126 blocks, width 16384, FFN 53248): a larger value is a typo, and
# building it, even on the meta device, would run for hours (``inspect builtin@99999999999x8``).
MAX_STUDENT_SIZE = {"num_layers": 1024, "hidden_size": 131072, "num_heads": 1024, "intermediate_size": 524288}


def _check_positive(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"student {name} must be a positive integer, got {value!r}")
    if value > MAX_STUDENT_SIZE[name]:
        raise ConfigError(f"student {name}={value} is larger than any Transformer: use at most "
                          f"{MAX_STUDENT_SIZE[name]}")


def _divisors_hint(n: int, shown: int = 9) -> str:
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    text = ", ".join(str(k) for k in divisors[:shown])
    return text + (", ..." if len(divisors) > shown else "")


def student_config(
    teacher_config: PretrainedConfig,
    *,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
) -> PretrainedConfig:
    """Return a deep copy of ``teacher_config`` with the student's sizes; None keeps the teacher's.

    Family rules: the FFN width lands on ``intermediate_size`` (``hidden_dim`` for DistilBERT,
    ``n_inner`` for GPT-2; a GPT-2 teacher's implicit ``n_inner = 4 d_T`` is written out when only
    the hidden size changes, so "None keeps the teacher's value" holds there too). When the hidden
    size or the head count changes: Llama-style ``head_dim`` becomes ``hidden / heads``; ELECTRA's
    ``embedding_size`` becomes the new hidden size; ViT's ``pooler_output_size`` and wav2vec2's
    ``output_hidden_size`` follow the hidden size when they equalled the teacher's. A new head count
    keeps the teacher's query-per-KV-head ratio in ``num_key_value_heads`` when it divides the new
    count, else uses one KV head per query head (plain multi-head attention). A ``layer_types`` list
    (Qwen2, Mistral-style sliding windows) is cycled to the new depth, so a pattern keeps its phase.

    Raises:
        ConfigError: a non-positive size, a hidden size the head count does not divide, or a
            wav2vec2/HuBERT hidden size its positional-conv groups do not divide.
    """
    for name, value in (
        ("num_layers", num_layers),
        ("hidden_size", hidden_size),
        ("num_heads", num_heads),
        ("intermediate_size", intermediate_size),
    ):
        _check_positive(name, value)
    teacher = config_shape(teacher_config)
    layers = teacher.layers if num_layers is None else num_layers
    hidden = teacher.hidden_size if hidden_size is None else hidden_size
    heads = teacher.heads if num_heads is None else num_heads
    width_changed = hidden_size is not None or num_heads is not None
    # Only an override can make the split impossible; a teacher with an explicit head_dim that does
    # not divide its own hidden size is left alone.
    if width_changed and hidden % heads:
        raise ConfigError(
            f"student hidden size {hidden} is not divisible by {heads} heads: "
            f"choose heads that divide it ({_divisors_hint(hidden)})"
        )

    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = layers
    config.hidden_size = hidden
    config.num_attention_heads = heads
    ffn_attribute = _FFN_ATTRIBUTE.get(teacher.family, "intermediate_size")
    if intermediate_size is not None:
        setattr(config, ffn_attribute, intermediate_size)
    elif getattr(config, ffn_attribute, None) is None and hidden_size is not None:
        setattr(config, ffn_attribute, teacher.intermediate_size)

    if width_changed and getattr(config, "head_dim", None) is not None:
        config.head_dim = hidden // heads
    if num_heads is not None and getattr(teacher_config, "num_key_value_heads", None) is not None:
        ratio = teacher.heads // teacher.kv_heads if teacher.heads % teacher.kv_heads == 0 else 1
        config.num_key_value_heads = heads // ratio if heads % ratio == 0 else heads
    if hidden_size is not None:
        if teacher.family == "electra":
            config.embedding_size = hidden
        for attribute in ("pooler_output_size", "output_hidden_size"):
            if getattr(config, attribute, None) == teacher.hidden_size:
                setattr(config, attribute, hidden)
        groups = getattr(config, "num_conv_pos_embedding_groups", None)
        if groups and hidden % groups:
            raise ConfigError(
                f"student hidden size {hidden} is not divisible by the {groups} positional-conv groups "
                f"of {teacher.family}: choose a multiple of {groups}"
            )
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and layer_types:
        config.layer_types = [layer_types[i % len(layer_types)] for i in range(layers)]
    # The student is a new model: it must not claim the teacher's hub name, nor its 8-/4-bit loading (a student
    # trains and is saved in full precision; a copied quantization_config would make loading it ask for bitsandbytes).
    config.name_or_path = ""
    config.__dict__.pop("quantization_config", None)
    return config


def build_student(config: PretrainedConfig, *, head: str = "base") -> PreTrainedModel:
    """Instantiate a randomly initialised model from ``config``.

    ``head``: "base" (AutoModel, hidden states only), "mlm" (AutoModelForMaskedLM) or "causal-lm"
    (AutoModelForCausalLM). Initialisation draws from torch's global generator, so seed it
    (``torch.manual_seed``) before the call for a reproducible student. Parameters are in torch's
    default dtype on the current default device (``with torch.device("meta"):`` builds a shell).

    Raises:
        ConfigError: an unknown head, or one the family does not have (e.g. "mlm" for GPT-2).
    """
    if head not in STUDENT_HEADS:
        raise ConfigError(
            f"unknown student head {head!r}{did_you_mean(head, STUDENT_HEADS)}: "
            f"use one of {', '.join(STUDENT_HEADS)}"
        )
    try:
        return STUDENT_HEADS[head].from_config(config)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        family = getattr(config, "model_type", "unknown")
        usable = [name for name, auto in STUDENT_HEADS.items() if _has_head(auto, config)]
        raise ConfigError(
            f"model type {family!r} has no {head!r} head: use one of {', '.join(usable) or 'none'}"
        ) from None


def _has_head(auto: type, config: PretrainedConfig) -> bool:
    """Whether an Auto class maps ``config``'s class (only used to word the error message)."""
    try:
        return type(config) in auto._model_mapping  # private, hence the guard
    except Exception:  # noqa: BLE001 - a wording aid must never mask the real error
        return False
