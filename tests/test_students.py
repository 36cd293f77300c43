"""Student configs, construction, layer selection and initialisation from the teacher (tiny random models)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers as tf

from tadistill.capture.architectures import get_module, resolve_architecture
from tadistill.errors import ConfigError
from tadistill.students import (
    build_student,
    init_from_teacher,
    select_layers,
    student_config,
)

VOCAB = 60


def bert_config(**kw) -> tf.BertConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, pad_token_id=3)
    return tf.BertConfig(**{**base, **kw})


def distilbert_config() -> tf.DistilBertConfig:
    return tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, hidden_dim=64,
                               max_position_embeddings=64)


def gpt2_config() -> tf.GPT2Config:
    return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                         bos_token_id=1, eos_token_id=2)


def llama_config(**kw) -> tf.LlamaConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2)
    return tf.LlamaConfig(**{**base, **kw})


def built(config, head: str = "base", seed: int = 0):
    torch.manual_seed(seed)
    return build_student(config, head=head).eval()


# ---------------------------------------------------------------------------------------------------
# student_config / build_student
# ---------------------------------------------------------------------------------------------------


def test_student_config_bert_overrides_and_keeps_the_rest() -> None:
    teacher = bert_config(hidden_dropout_prob=0.3)
    cfg = student_config(teacher, num_layers=2, hidden_size=16, num_heads=2, intermediate_size=24)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (2, 16, 2, 24)
    assert (cfg.vocab_size, cfg.pad_token_id, cfg.max_position_embeddings) == (VOCAB, 3, 64)
    assert cfg.hidden_dropout_prob == 0.3
    assert teacher.hidden_size == 32 and teacher.num_hidden_layers == 4  # a copy, not the teacher's object
    model = build_student(cfg, head="mlm")
    assert isinstance(model, tf.BertForMaskedLM)
    assert len(model.bert.encoder.layer) == 2
    assert tuple(model.bert.encoder.layer[0].intermediate.dense.weight.shape) == (24, 16)
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads == 2


def test_student_config_none_keeps_teacher_values() -> None:
    cfg = student_config(bert_config(), num_layers=3)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (32, 4, 64)


def test_student_config_distilbert_names() -> None:
    cfg = student_config(distilbert_config(), num_layers=2, hidden_size=16, num_heads=2, intermediate_size=40)
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.hidden_dim) == (2, 16, 2, 40)
    model = build_student(cfg, head="mlm")
    assert len(model.distilbert.transformer.layer) == 2
    assert tuple(model.distilbert.transformer.layer[0].ffn.lin1.weight.shape) == (40, 16)


def test_student_config_gpt2_names() -> None:
    cfg = student_config(gpt2_config(), num_layers=2, hidden_size=16, num_heads=2, intermediate_size=40)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner) == (2, 16, 2, 40)
    model = build_student(cfg, head="causal-lm")
    assert isinstance(model, tf.GPT2LMHeadModel)
    assert tuple(model.transformer.h[0].attn.c_attn.weight.shape) == (16, 48)
    assert tuple(model.transformer.h[0].mlp.c_fc.weight.shape) == (16, 40)
    # n_inner=None means 4 d_T for the teacher; a narrower student keeps the teacher's FFN width.
    assert student_config(gpt2_config(), hidden_size=16).n_inner == 128


def test_student_config_llama_gqa_keeps_ratio() -> None:
    teacher = llama_config()  # 8 query heads, 2 KV heads: ratio 4
    cfg = student_config(teacher, num_layers=2, hidden_size=16, num_heads=4, intermediate_size=20)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 4)
    model = build_student(cfg, head="causal-lm")
    attn = model.model.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (16, 16) and tuple(attn.k_proj.weight.shape) == (4, 16)
    assert tuple(model.model.layers[0].mlp.gate_proj.weight.shape) == (20, 16)
    # The ratio does not divide 6 heads: plain multi-head attention.
    assert student_config(teacher, hidden_size=24, num_heads=6).num_key_value_heads == 6


def test_student_config_resizes_layer_types() -> None:
    teacher = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=48)
    teacher.layer_types = ["sliding_attention", "full_attention"] * 2
    cfg = student_config(teacher, num_layers=3)
    assert cfg.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert len(build_student(cfg).layers) == 3


def test_student_config_electra_embedding_follows_hidden() -> None:
    teacher = tf.ElectraConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64)
    assert student_config(teacher, num_layers=1).embedding_size == 16
    cfg = student_config(teacher, hidden_size=24, num_heads=4)
    assert (cfg.hidden_size, cfg.embedding_size) == (24, 24)
    model = build_student(cfg)
    assert tuple(model.embeddings.word_embeddings.weight.shape) == (VOCAB, 24)


def test_student_config_vit() -> None:
    teacher = tf.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                           image_size=32, patch_size=8)
    cfg = student_config(teacher, num_layers=2, hidden_size=16, num_heads=2, intermediate_size=24)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.pooler_output_size, cfg.image_size) == (2, 16, 16, 32)
    model = build_student(cfg)
    out = model(pixel_values=torch.randn(1, 3, 32, 32))
    assert tuple(out.last_hidden_state.shape) == (1, 17, 16)


def test_student_config_divisibility_error_lists_divisors() -> None:
    with pytest.raises(ConfigError, match=r"300 is not divisible by 8 heads.*\(1, 2, 3, 4, 5, 6, 10, 12, 15, \.\.\.\)"):
        student_config(bert_config(num_attention_heads=8), hidden_size=300)
    with pytest.raises(ConfigError, match="not divisible by 5 heads"):
        student_config(bert_config(), num_heads=5)
    hubert = tf.HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             num_conv_pos_embedding_groups=16)
    with pytest.raises(ConfigError, match="positional-conv groups"):
        student_config(hubert, hidden_size=24, num_heads=4)


@pytest.mark.parametrize("kw", [{"num_layers": 0}, {"hidden_size": -16}, {"num_heads": True}, {"intermediate_size": 2.5}])
def test_student_config_rejects_non_positive(kw) -> None:
    with pytest.raises(ConfigError, match="must be a positive integer"):
        student_config(bert_config(), **kw)


def test_build_student_head_errors() -> None:
    with pytest.raises(ConfigError, match="has no 'mlm' head"):
        build_student(gpt2_config(), head="mlm")
    with pytest.raises(ConfigError, match="did you mean 'mlm'"):
        build_student(bert_config(), head="mlx")


# ---------------------------------------------------------------------------------------------------
# select_layers
# ---------------------------------------------------------------------------------------------------


def test_select_layers_values() -> None:
    assert select_layers("uniform", 6, 12) == [0, 2, 4, 7, 9, 11]  # DistilBERT (Sanh et al. 2019)
    assert select_layers("uniform", 3, 6) == [0, 3, 5]  # 2.5 rounds up
    assert select_layers("uniform", 6, 24) == [0, 5, 9, 14, 18, 23]
    assert select_layers("uniform", 1, 12) == [0]
    assert select_layers("uniform", 12, 12) == list(range(12))
    assert select_layers("first", 3, 12) == [0, 1, 2]
    assert select_layers("every-other", 6, 12) == [0, 2, 4, 6, 8, 10]
    assert select_layers("every-other", 3, 5) == [0, 2, 4]
    assert select_layers("explicit", 3, 12, [11, 0, 5]) == [11, 0, 5]


def test_select_layers_errors() -> None:
    with pytest.raises(ConfigError, match="at least 7 layers"):
        select_layers("every-other", 4, 6)
    with pytest.raises(ConfigError, match="2 entries but the student has 3"):
        select_layers("explicit", 3, 12, [0, 1])
    with pytest.raises(ConfigError, match="out of range"):
        select_layers("explicit", 2, 12, [0, 12])
    with pytest.raises(ConfigError, match="out of range"):
        select_layers("explicit", 2, 12, [-1, 3])
    with pytest.raises(ConfigError, match="needs a list"):
        select_layers("explicit", 2, 12)
    with pytest.raises(ConfigError, match="use strategy 'explicit'"):
        select_layers("uniform", 2, 12, [0, 1])
    with pytest.raises(ConfigError, match="did you mean 'uniform'"):
        select_layers("uniforn", 2, 12)
    with pytest.raises(ConfigError, match="cannot take distinct blocks"):
        select_layers("first", 13, 12)
    with pytest.raises(ConfigError, match="positive integer"):
        select_layers("first", 0, 12)


# ---------------------------------------------------------------------------------------------------
# init_from_teacher: depth
# ---------------------------------------------------------------------------------------------------


def _inputs(config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding exercises the mask path too
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    ("config_fn", "student_head"),
    [(bert_config, "mlm"), (distilbert_config, "base"), (gpt2_config, "causal-lm"), (llama_config, "causal-lm")],
)
def test_truncated_student_reproduces_teacher_hidden_state(config_fn, student_head) -> None:
    k = 2
    teacher_config = config_fn()
    teacher = built(teacher_config, seed=0)
    student = built(student_config(teacher_config, num_layers=k), head=student_head, seed=1)
    report = init_from_teacher(student, teacher, select_layers("first", k, 4))
    assert report.sliced == 0 and report.copied > 0
    inputs = _inputs(teacher_config)
    with torch.no_grad():
        t_states = teacher(**inputs, output_hidden_states=True).hidden_states
        s_states = student(**inputs, output_hidden_states=True).hidden_states
    arch = resolve_architecture(teacher)
    expected = t_states[k]
    if arch.final_norm is not None:
        # Pre-LN models return the last hidden state after the final norm (GPT-2 ln_f, Llama norm).
        with torch.no_grad():
            expected = get_module(teacher, arch.final_norm)(expected)
    assert len(s_states) == k + 1
    torch.testing.assert_close(s_states[k], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(s_states[1], t_states[1], rtol=0, atol=1e-6)


def test_block_renumbering_takes_the_selected_teacher_blocks() -> None:
    teacher = built(bert_config())
    student = built(student_config(bert_config(), num_layers=2), seed=1)
    init_from_teacher(student, teacher, [3, 1])
    for j, i in enumerate([3, 1]):
        s_block, t_block = student.encoder.layer[j], teacher.encoder.layer[i]
        assert torch.equal(s_block.attention.self.query.weight, t_block.attention.self.query.weight)
        assert torch.equal(s_block.output.dense.bias, t_block.output.dense.bias)


def test_mlm_student_from_base_teacher_reports_head_as_random() -> None:
    teacher = built(bert_config())
    student = built(student_config(bert_config(), num_layers=2), head="mlm", seed=1)
    report = init_from_teacher(student, teacher, [0, 2])
    assert "cls.predictions.transform.dense.weight" in report.left_random
    assert "cls.predictions.bias" in report.left_random
    assert not any(name.startswith("bert.") for name in report.left_random)
    # The decoder stays tied to the (copied) word embeddings.
    assert student.cls.predictions.decoder.weight is student.bert.embeddings.word_embeddings.weight
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)


def test_base_student_from_mlm_teacher() -> None:
    teacher = built(bert_config(), head="mlm")
    student = built(student_config(bert_config(), num_layers=2), seed=1)
    report = init_from_teacher(student, teacher, [0, 1])
    assert report.left_random == ["pooler.dense.weight", "pooler.dense.bias"]  # BertForMaskedLM has no pooler
    assert torch.equal(student.encoder.layer[1].output.dense.weight, teacher.bert.encoder.layer[1].output.dense.weight)


def test_init_errors() -> None:
    teacher = built(bert_config())
    with pytest.raises(ConfigError, match="2 entries but the student has 3"):
        init_from_teacher(built(student_config(bert_config(), num_layers=3)), teacher, [0, 1])
    with pytest.raises(ConfigError, match="out of range"):
        init_from_teacher(built(student_config(bert_config(), num_layers=2)), teacher, [0, 4])
    with pytest.raises(ConfigError, match="wider than the teacher"):
        init_from_teacher(built(bert_config(hidden_size=48, num_hidden_layers=2)), teacher, [0, 1])
    with pytest.raises(ConfigError, match="family 'gpt2' differs"):
        init_from_teacher(built(gpt2_config()), teacher, [0, 1, 2, 3])


# ---------------------------------------------------------------------------------------------------
# init_from_teacher: width (leading rows / columns, leftmost heads; AutoDistil)
# ---------------------------------------------------------------------------------------------------


def test_bert_width_slice_fewer_heads_keeps_head_dim() -> None:
    teacher = built(bert_config())  # 4 heads x 8
    student = built(student_config(bert_config(), num_layers=2, hidden_size=16, num_heads=2, intermediate_size=40), seed=1)
    report = init_from_teacher(student, teacher, [1, 3])
    assert report.copied == 0 and report.sliced > 0 and report.left_random == []
    s, t = student.encoder.layer[0], teacher.encoder.layer[1]
    # Same head_dim: the leftmost 2 heads are exactly the leading 16 rows.
    assert torch.equal(s.attention.self.query.weight, t.attention.self.query.weight[:16, :16])
    assert torch.equal(s.attention.self.value.bias, t.attention.self.value.bias[:16])
    assert torch.equal(s.attention.output.dense.weight, t.attention.output.dense.weight[:16, :16])
    assert torch.equal(s.intermediate.dense.weight, t.intermediate.dense.weight[:40, :16])
    assert torch.equal(s.output.dense.weight, t.output.dense.weight[:16, :40])
    assert torch.equal(s.output.LayerNorm.weight, t.output.LayerNorm.weight[:16])
    emb_s, emb_t = student.embeddings, teacher.embeddings
    assert torch.equal(emb_s.word_embeddings.weight, emb_t.word_embeddings.weight[:, :16])
    assert torch.equal(emb_s.position_embeddings.weight, emb_t.position_embeddings.weight[:, :16])


def test_bert_width_slice_same_heads_takes_leading_dims_of_each_head() -> None:
    teacher = built(bert_config())  # 4 heads x 8
    student = built(student_config(bert_config(), num_layers=1, hidden_size=16, num_heads=4), seed=1)  # 4 x 4
    init_from_teacher(student, teacher, [2])
    s, t = student.encoder.layer[0].attention, teacher.encoder.layer[2].attention
    for h, j, c in [(0, 0, 0), (1, 0, 3), (2, 3, 15), (3, 1, 7)]:
        assert s.self.key.weight[h * 4 + j, c] == t.self.key.weight[h * 8 + j, c]
        assert s.self.query.bias[h * 4 + j] == t.self.query.bias[h * 8 + j]
        assert s.output.dense.weight[c, h * 4 + j] == t.output.dense.weight[c, h * 8 + j]
    # Row 4 of the student is head 1, dim 0: teacher row 8, not the naive leading row 4.
    assert torch.equal(s.self.query.weight[4], t.self.query.weight[8, :16])
    assert not torch.equal(s.self.query.weight[4], t.self.query.weight[4, :16])
    assert torch.equal(s.output.dense.bias, t.output.dense.bias[:16])


def test_gpt2_fused_qkv_slice() -> None:
    teacher = built(gpt2_config())  # 4 heads x 8, c_attn (32, 96)
    student = built(student_config(gpt2_config(), num_layers=1, hidden_size=16, num_heads=4), head="causal-lm", seed=1)
    init_from_teacher(student, teacher, [3])
    s, t = student.transformer.h[0], teacher.h[3]
    assert tuple(s.attn.c_attn.weight.shape) == (16, 48)
    for block in range(3):  # q, k, v
        for h, j in [(0, 0), (1, 2), (3, 3)]:
            s_col, t_col = block * 16 + h * 4 + j, block * 32 + h * 8 + j
            assert torch.equal(s.attn.c_attn.weight[:, s_col], t.attn.c_attn.weight[:16, t_col])
            assert s.attn.c_attn.bias[s_col] == t.attn.c_attn.bias[t_col]
    # c_proj is a Conv1D (in, out): the head side is dim 0.
    assert s.attn.c_proj.weight[1 * 4 + 2, 5] == t.attn.c_proj.weight[1 * 8 + 2, 5]
    assert torch.equal(s.mlp.c_fc.weight, t.mlp.c_fc.weight[:16, :128])
    assert torch.equal(student.lm_head.weight, teacher.wte.weight[:, :16])


def test_llama_gqa_slice() -> None:
    teacher = built(llama_config())  # 8 q heads, 2 kv heads, head_dim 4
    # Fewer heads, same head_dim: 4 q heads, 1 kv head.
    student = built(student_config(llama_config(), num_layers=1, hidden_size=16, num_heads=4), seed=1)
    init_from_teacher(student, teacher, [1])
    s, t = student.layers[0].self_attn, teacher.layers[1].self_attn
    assert torch.equal(s.q_proj.weight, t.q_proj.weight[:16, :16])
    assert torch.equal(s.k_proj.weight, t.k_proj.weight[:4, :16])
    assert torch.equal(s.v_proj.weight, t.v_proj.weight[:4, :16])
    assert torch.equal(s.o_proj.weight, t.o_proj.weight[:16, :16])
    # Same head count, half head_dim: 8 q heads and 2 kv heads of width 2.
    student = built(student_config(llama_config(), num_layers=1, hidden_size=16), seed=1)
    assert student.config.head_dim == 2 and student.config.num_key_value_heads == 2
    init_from_teacher(student, teacher, [0])
    s, t = student.layers[0].self_attn, teacher.layers[0].self_attn
    for h, j in [(0, 1), (1, 0), (1, 1)]:
        assert torch.equal(s.k_proj.weight[h * 2 + j], t.k_proj.weight[h * 4 + j, :16])
    for h, j in [(5, 0), (7, 1)]:
        assert torch.equal(s.q_proj.weight[h * 2 + j], t.q_proj.weight[h * 4 + j, :16])
        assert torch.equal(s.o_proj.weight[:, h * 2 + j], t.o_proj.weight[:16, h * 4 + j])


def test_more_heads_than_teacher_is_rejected() -> None:
    teacher = built(bert_config())  # 4 heads x 8
    student = built(student_config(bert_config(), num_layers=1, num_heads=8), seed=1)  # 8 heads x 4
    with pytest.raises(ConfigError, match="8 attention heads of width 4 but the teacher 4 of width 8"):
        init_from_teacher(student, teacher, [0])


def test_a_student_does_not_inherit_the_teachers_quantization():
    from transformers import BertConfig

    from tadistill.students.build import student_config

    teacher = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    teacher.quantization_config = {"load_in_8bit": True, "quant_method": "bitsandbytes"}
    config = student_config(teacher, num_layers=2)
    assert "quantization_config" not in config.to_dict()
    assert teacher.quantization_config["load_in_8bit"]  # the teacher's own config is untouched
