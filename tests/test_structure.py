"""One mechanism for structure (tadistill/structure/): units, masks, selection, materialisation.

The central property, per family (BERT, DistilBERT, GPT-2, Llama and Qwen2 with grouped-query attention):
a model under binary masks computes what its materialised, smaller model computes, and the materialised
model is a plain checkpoint that the Auto classes load. Tolerance: 1e-5 absolute on float32 logits of
magnitude ~1 (the two differ only in the order of float32 sums: the masked norms sum over d channels with
zeros, the pruned ones over the kept channels).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

from tadistill.errors import ConfigError, ModelError
from tadistill.measure.parameters import count_parameters
from tadistill.structure import (
    Kept,
    Masks,
    Scores,
    TargetShape,
    apply_masks,
    materialize,
    resolve_layout,
    select_units,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-5
VOCAB = 97


def _bert():
    return tf.BertForMaskedLM(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=32))


def _distilbert():
    return tf.DistilBertForMaskedLM(tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4,
                                                        hidden_dim=64, max_position_embeddings=32))


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=32,
                                            bos_token_id=0, eos_token_id=0))


def _llama():  # grouped-query attention: 4 query heads over 2 key/value heads; untied output layer
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                              max_position_embeddings=32, tie_word_embeddings=False))


def _qwen2():  # Q/K/V biases, 8 query heads over 2 key/value heads
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                              num_attention_heads=8, num_key_value_heads=2, intermediate_size=48,
                                              max_position_embeddings=32))


# Per family: the model, the kept units (blocks, heads per block, ffn per block, hidden) and the head's Auto class.
# BERT-like and GPT-2 keep hidden = heads x head_dim (8); Llama-style models store head_dim and prune freely.
CASES = {
    "bert": (_bert, [0, 2], [[1, 2, 3], [0, 1, 3], [0, 2, 3]], 40, list(range(0, 32, 4)) + list(range(1, 32, 4))
             + list(range(3, 32, 4)), tf.AutoModelForMaskedLM),
    "distilbert": (_distilbert, [1, 2], [[0, 3]] * 3, 33, list(range(5, 21)), tf.AutoModelForMaskedLM),
    "gpt2": (_gpt2, [0, 1], [[0, 2, 3], [1, 2, 3], [0, 1, 2]], 100, list(range(8, 32)), tf.AutoModelForCausalLM),
    # Block 0 keeps group 1 only (heads 2, 3); block 2 keeps one head of each group: both are valid GQA shapes
    # only in separate models, so each case below keeps one pattern in every block.
    "llama-groups": (_llama, [0, 2], [[2, 3], [0, 1], [0, 1]], 30, list(range(1, 32, 2)) + [0, 4],
                     tf.AutoModelForCausalLM),
    "llama-per-group": (_llama, [1, 2], [[1, 3], [0, 2], [0, 3]], 24, list(range(20)), tf.AutoModelForCausalLM),
    "qwen2": (_qwen2, [0, 1, 2], [[0, 1, 4, 7]] * 3, 40, list(range(4, 32)), tf.AutoModelForCausalLM),
}


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def _case(name):
    build, blocks, heads, ffn, hidden, auto = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    layout = resolve_layout(model)
    g = torch.Generator().manual_seed(1)
    ffn_kept = [sorted(torch.randperm(layout.ffn_size, generator=g)[:ffn].tolist()) for _ in range(3)]
    masks = Masks.keep(layout, blocks=blocks, heads=heads, ffn=ffn_kept, hidden=hidden)
    return model, layout, masks, auto


@pytest.mark.parametrize("name", list(CASES))
def test_materialised_model_equals_the_masked_model(name, tmp_path):
    model, layout, masks, auto = _case(name)
    inputs = _inputs()
    with torch.no_grad():
        full = model(**inputs).logits
        with apply_masks(model, layout, masks):
            masked = model(**inputs, output_hidden_states=True)
        small = materialize(model, layout, masks)
        pruned = small(**inputs, output_hidden_states=True)
    assert not torch.allclose(masked.logits, full, atol=1e-3)  # the masks change the model
    torch.testing.assert_close(pruned.logits, masked.logits, atol=ATOL, rtol=0)
    # The masked model's residual stream is zero at removed channels and equals the pruned model's elsewhere
    # (hidden states of removed blocks are absent from the pruned model: compare the last one).
    keep = torch.as_tensor(CASES[name][4])
    drop = torch.ones(layout.hidden_size, dtype=torch.bool)
    drop[keep] = False
    last = masked.hidden_states[-1]
    assert last[..., drop].abs().max() == 0
    torch.testing.assert_close(pruned.hidden_states[-1], last[..., keep.sort().values], atol=ATOL, rtol=0)
    # The hooks are gone after the block: the model is the teacher again.
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, full)

    # A plain checkpoint: AutoModel and the head's Auto class load it, with the smaller config.
    kept = Kept.of(masks, layout)
    small.save_pretrained(tmp_path, safe_serialization=True)
    loaded = auto.from_pretrained(tmp_path).eval()
    assert tf.AutoModel.from_pretrained(tmp_path).config.num_hidden_layers == len(kept.blocks)
    cfg = loaded.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == \
        (len(kept.blocks), len(kept.hidden), len(kept.heads[0]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, masked.logits, atol=ATOL, rtol=0)
    assert count_parameters(loaded) == count_parameters(small) < count_parameters(model)


def test_llama_parameter_count_matches_the_pruned_shapes():
    model, layout, masks, _ = _case("llama-groups")
    small = materialize(model, layout, masks)
    d, L, q, kv, f = 18, 2, 2 * 8, 1 * 8, 30  # hidden, blocks, query features, kv features, FFN
    per_block = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d  # Q, K, V, O, gate/up/down, two RMSNorms
    assert count_parameters(small) == 2 * VOCAB * d + L * per_block + d  # untied embeddings + lm_head, final norm
    assert small.config.num_key_value_heads == 1 and small.config.head_dim == 8 and small.config.intermediate_size == f


def test_removing_every_query_head_of_a_group_removes_its_key_value_head():
    model, layout, _, _ = _case("llama-groups")
    small = materialize(model, layout, Masks.keep(layout, heads=[[2, 3]] * 3))
    attention = small.model.layers[0].self_attn
    assert small.config.num_key_value_heads == 1 and attention.k_proj.weight.shape == (8, 32)
    # The kept key/value head is the teacher's head 1 (features 8..15).
    assert torch.equal(attention.k_proj.weight, model.model.layers[0].self_attn.k_proj.weight[8:16])


def test_masks_refused_when_no_config_can_describe_them():
    _, layout, _, _ = _case("llama-groups")
    with pytest.raises(ConfigError, match="the same number in every group"):
        Kept.of(Masks.keep(layout, heads=[[0, 1, 2]] * 3), layout)  # 2 heads in group 0, 1 in group 1
    with pytest.raises(ConfigError, match="same number"):
        Kept.of(Masks.keep(layout, ffn=[[0, 1], [0], [0]]), layout)
    with pytest.raises(ConfigError, match="0 or 1"):
        Kept.of(Masks(hidden=torch.full((32,), 0.5)), layout)
    gpt2 = _gpt2()
    g_layout = resolve_layout(gpt2)
    with pytest.raises(ConfigError, match="hidden_size = num_heads x head_dim"):
        Kept.of(Masks.keep(g_layout, hidden=list(range(20))), g_layout)


def test_block_masks_skip_blocks_and_soft_gates_carry_gradients():
    model, layout, _, _ = _case("gpt2")
    inputs = _inputs()
    gates = Masks(heads=torch.full((3, 4), 0.5, requires_grad=True), blocks=torch.tensor([1.0, 0.0, 1.0]))
    with apply_masks(model, layout, gates):
        out = model(**inputs, output_hidden_states=True)
        out.logits.float().pow(2).mean().backward()
    # Block 1 is skipped: its output is its input.
    assert torch.equal(out.hidden_states[2], out.hidden_states[1])
    assert gates.heads.grad is not None and gates.heads.grad[1].abs().sum() == 0  # the skipped block's heads
    assert gates.heads.grad[0].abs().sum() > 0


def test_selection_keeps_the_highest_scores_and_whole_groups():
    _, layout, _, _ = _case("qwen2")  # 8 query heads, 2 key/value heads: groups {0..3}, {4..7}
    heads = torch.tensor([[9, 1, 8, 0, 5, 5, 5, 5.0]] * 3)
    scores = Scores(heads=heads, ffn=torch.arange(48.0).repeat(3, 1), hidden=-torch.arange(32.0),
                    blocks=torch.tensor([0.3, 0.1, 0.2]))
    masks = select_units(scores, layout, TargetShape(2, 16, 2, 1, 10))
    kept = Kept.of(masks, layout)
    assert kept.blocks == [0, 2]
    assert kept.heads[0] == [4, 5]  # group 1 sums to 20 > 18; within it, ties go to the lower index
    assert kept.ffn[0] == list(range(38, 48)) and kept.hidden == list(range(16))
    # Same counts, keeping the key/value heads: the best 1 query head of each group.
    kept = Kept.of(select_units(scores, layout, TargetShape(3, 32, 2, 2, 48)), layout)
    assert kept.heads[0] == [0, 4] and kept.kv_heads[0] == [0, 1]


@pytest.mark.parametrize("target, message", [
    (TargetShape(4, 32, 8, 2, 48), "num_layers=4 is larger than the teacher's 3"),
    (TargetShape(3, 32, 6, 4, 48), "larger than the teacher's 2"),
    (TargetShape(3, 32, 3, 2, 48), "do not divide"),
    (TargetShape(3, 32, 8, 1, 48), "8 query heads per key/value head is more than the teacher's 4"),
])
def test_bad_targets_are_one_line_errors(target, message):
    layout = resolve_layout(_qwen2())
    scores = Scores(torch.ones(3, 8), torch.ones(3, 48), torch.ones(32), torch.ones(3))
    with pytest.raises(ConfigError, match=message) as info:
        select_units(scores, layout, target)
    assert "\n" not in str(info.value)


def test_implied_head_dim_families_say_which_shape_works():
    layout = resolve_layout(_gpt2())
    scores = Scores(torch.ones(3, 4), torch.ones(3, 128), torch.ones(32), torch.ones(3))
    with pytest.raises(ConfigError, match="student.num_heads=3 and student.hidden_size=24"):
        select_units(scores, layout, TargetShape(2, 26, 4, 4, 64))


def test_unsupported_family_is_a_one_line_error():
    electra = tf.ElectraModel(tf.ElectraConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ModelError, match="does not support model family 'electra'") as info:
        resolve_layout(electra)
    assert "\n" not in str(info.value)


def test_a_block_tensor_without_a_role_is_refused():
    model, layout, masks, _ = _case("gpt2")
    model.transformer.h[0].mlp.extra = nn.Linear(4, 4)  # a layout tadistill does not know
    with pytest.raises(ModelError, match="mlp.extra.weight has no known role"):
        materialize(model, layout, masks)
