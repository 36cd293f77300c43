"""Forward FLOPs per token of a model config: what a run summary and the cost reports both state.

AutoDistil (Xu et al. 2022) searches under a FLOPs budget; Kaplan et al. 2020, section 2.1, give the
per-token forward count used here.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from tadistill.errors import ConfigError, did_you_mean
from tadistill.students.build import STUDENT_HEADS, config_shape


def flops_per_token(config: PretrainedConfig, *, seq_len: int = 128, head: str = "base") -> int:
    """Forward FLOPs per token, 2 per multiply-accumulate (Kaplan et al. 2020, section 2.1).

    With L layers, hidden d, H query heads and KV key/value heads of width d_h (d_attn = H d_h,
    d_kv = KV d_h), FFN width d_ff, sequence length n and vocabulary V:

        per block = 2 d d_attn                 (Q)
                  + 2 * 2 d d_kv               (K, V; smaller under grouped-query attention)
                  + 2 d_attn d                 (attention output)
                  + m * 2 d d_ff               (MLP, m = 2, or 3 for gated MLPs such as Llama's)
                  + 2 * 2 n d_attn             (scores Q K^T and the weighted sum of V)
        total     = L * per block [+ 2 d_E V when head != "base"]

    d_E is the width the LM head reads (ELECTRA's embedding_size, else d); ELECTRA's factorised
    embedding adds its projection, 2 d_E d. Embedding lookups, norms, biases, activations and
    softmax are ignored, as is the MLM head's small transform (d x d). Every token attends to all n
    positions, so for causal models this is the unmasked cost (Kaplan's n_ctx term). For speech
    models only the Transformer is counted, not the convolutional feature encoder.

    Raises:
        ConfigError: a non-positive ``seq_len``, an unknown head, or an LM head for a model without
            a vocabulary.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    if head not in STUDENT_HEADS:
        raise ConfigError(
            f"unknown head {head!r}{did_you_mean(head, STUDENT_HEADS)}: use one of {', '.join(STUDENT_HEADS)}"
        )
    shape = config_shape(config)
    d, d_attn = shape.hidden_size, shape.heads * shape.head_dim
    d_kv = shape.kv_heads * shape.head_dim
    mlp_matrices = 3 if shape.gated_mlp else 2
    per_block = (
        2 * d * d_attn
        + 2 * 2 * d * d_kv
        + 2 * d_attn * d
        + mlp_matrices * 2 * d * shape.intermediate_size
        + 2 * 2 * seq_len * d_attn
    )
    total = shape.layers * per_block
    if shape.embedding_size != d:
        total += 2 * shape.embedding_size * d
    if head != "base":
        if shape.vocab_size is None:
            raise ConfigError(f"model type {shape.family!r} has no vocabulary: use head 'base'")
        total += 2 * shape.embedding_size * shape.vocab_size
    return total


def known_flops_per_token(config: PretrainedConfig | None, *, seq_len: int) -> int | None:
    """``flops_per_token`` of a run summary: None for a family whose shape is not known (a summary leaves the
    figure out rather than failing a finished run)."""
    if config is None:
        return None
    try:
        return flops_per_token(config, seq_len=seq_len)
    except (ConfigError, ValueError, AttributeError):
        return None
