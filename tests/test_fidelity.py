"""Teacher-student fidelity on held-out text (evaluation/fidelity.py)."""

from __future__ import annotations

import copy
import itertools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.nn import functional as F
from transformers import BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel

from tadistill.capture import CaptureRequest, capture, resolve_architecture
from tadistill.errors import ConfigError
from tadistill.evaluation import fidelity as fidelity_module
from tadistill.evaluation.fidelity import (
    TeacherEmbeddings,
    default_relation_heads,
    embedding_cosine,
    fidelity,
    sentence_embeddings,
)
from tadistill.evaluation.metrics import linear_cka
from tadistill.objectives.attention import relation_kl

from conftest import TEXTS

UNIQUE = list(dict.fromkeys(TEXTS))
# 24 distinct texts of different lengths (sentence pairs), so no two sentence embeddings coincide.
HELDOUT = [f"{a} {b}" for a, b in itertools.permutations(UNIQUE, 2)][:24]

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    assert tiny_tokenizer.unk_token_id not in tiny_tokenizer(HELDOUT[0])["input_ids"]  # real words, not [UNK]
    return tiny_tokenizer


def bert(tokenizer, *, layers=4, hidden=32, heads=4, seed=0, head=True):
    torch.manual_seed(seed)
    # initializer_range 0.2 (not 0.02) gives peaked attention and distinct layers, so that two random
    # models differ clearly; dropout stays on in the config to check that fidelity runs in eval mode.
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=64,
                        pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    return (BertForMaskedLM if head else BertModel)(config)


def gpt2(tokenizer, *, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        initializer_range=0.2, bos_token_id=tokenizer.cls_token_id,
                        eos_token_id=tokenizer.sep_token_id)
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return bert(tokenizer).train()  # training mode on purpose: fidelity must switch dropout off


def keys_for(pairs, *, cosine=True, output=True, k=10):
    keys = {"final_cka", "layer_cka_mean", "relation_kl", "relation_kl/qq", "relation_kl/kk", "relation_kl/vv",
            "embedding_cka", f"nn_overlap@{k}"} | {f"layer_cka/{p}" for p in pairs}
    if cosine:
        keys |= {"final_cosine", "embedding_cosine"} | {f"layer_cosine/{p}" for p in pairs}
    if output:
        keys.add("output_kl")
    return keys


def assert_identical(result):
    assert result["output_kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["relation_kl"] == pytest.approx(0.0, abs=1e-6)
    for key, value in result.items():
        assert isinstance(value, float), key
        if "cosine" in key or "cka" in key or "overlap" in key:
            assert value == pytest.approx(1.0, abs=1e-5), key


def test_identical_student_agrees_perfectly(teacher, tokenizer) -> None:
    result = fidelity(teacher, copy.deepcopy(teacher), tokenizer, HELDOUT, batch_size=8)
    assert set(result) == keys_for(["0-0", "1-1", "2-2", "3-3", "4-4"])
    assert_identical(result)
    assert teacher.training  # mode restored
    # The teacher compared with itself (one module, two sets of hooks) is the same case.
    assert_identical(fidelity(teacher, teacher, tokenizer, HELDOUT, batch_size=8))


def test_random_student_scores_clearly_lower(teacher, tokenizer) -> None:
    result = fidelity(teacher, bert(tokenizer, layers=2, seed=1), tokenizer, HELDOUT, batch_size=8)
    assert set(result) == keys_for(["0-0", "1-2", "2-4"])
    assert result["output_kl"] > 0.1
    assert result["relation_kl"] > 0.1
    assert min(result[f"relation_kl/{r}"] for r in ("qq", "kk", "vv")) > 0.01
    assert result["relation_kl"] == pytest.approx(sum(result[f"relation_kl/{r}"] for r in ("qq", "kk", "vv")))
    assert result["final_cosine"] < 0.5 and result["embedding_cosine"] < 0.5
    assert result["final_cka"] < 0.5 and result["layer_cka_mean"] < 0.6 and result["embedding_cka"] < 0.7
    assert result["nn_overlap@10"] < 0.8
    assert result["final_cka"] == result["layer_cka/2-4"]
    assert result["final_cosine"] == result["layer_cosine/2-4"]


def test_values_equal_direct_per_text_computations(teacher, tokenizer) -> None:
    student = bert(tokenizer, layers=2, seed=2).eval()
    result = fidelity(teacher, student, tokenizer, HELDOUT, batch_size=5)  # padded batches, uneven last
    teacher.eval()
    kl, cos, count, final_t, final_s = 0.0, 0.0, 0, [], []
    with torch.no_grad():
        for text in HELDOUT:  # one unpadded text at a time: nothing to mask
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            out_t = teacher(input_ids=ids, output_hidden_states=True)
            out_s = student(input_ids=ids, output_hidden_states=True)
            log_t, log_s = out_t.logits[0].log_softmax(-1), out_s.logits[0].log_softmax(-1)  # (T, V)
            kl += float((log_t.exp() * (log_t - log_s)).sum())
            h_t, h_s = out_t.hidden_states[4][0], out_s.hidden_states[2][0]  # (T, d)
            cos += float(F.cosine_similarity(h_t, h_s, dim=-1).sum())
            final_t.append(h_t)
            final_s.append(h_s)
            count += ids.shape[1]
    teacher.train()
    assert result["output_kl"] == pytest.approx(kl / count, rel=1e-4)
    assert result["final_cosine"] == pytest.approx(cos / count, rel=1e-4)
    # Fewer than MAX_CKA_TOKENS tokens: every token is used (CKA ignores the order of the rows).
    assert result["final_cka"] == pytest.approx(linear_cka(torch.cat(final_s), torch.cat(final_t)), rel=1e-4)
    # Same sentence embeddings as the quick summary check.
    assert result["embedding_cosine"] == pytest.approx(
        embedding_cosine(teacher, student, tokenizer, HELDOUT, batch_size=5), rel=1e-5
    )


def test_narrower_student_without_head(teacher, tokenizer) -> None:
    student = bert(tokenizer, layers=2, hidden=16, heads=2, seed=3, head=False)
    result = fidelity(teacher, student, tokenizer, HELDOUT, batch_size=8)
    # No common width: no cosine keys; no LM head on the student: no output_kl.
    assert set(result) == keys_for(["0-0", "1-2", "2-4"], cosine=False, output=False)
    # Default relation heads: largest common divisor of 32 and 16 that is <= 48, i.e. 16.
    assert fidelity(teacher, student, tokenizer, HELDOUT, batch_size=8, relation_heads=16) == result
    other = fidelity(teacher, student, tokenizer, HELDOUT, batch_size=8, relation_heads=4)
    assert other["relation_kl"] != pytest.approx(result["relation_kl"])
    # The set-up's check and message (terms.require_relation_heads), with fidelity's argument to change.
    with pytest.raises(ConfigError) as info:
        fidelity(teacher, student, tokenizer, HELDOUT, relation_heads=3)
    assert str(info.value) == ("relation_heads=3 must divide the student width 16: choose a common divisor of both "
                               "models' widths [16, 32], such as 2 or 1: relation_heads=2")
    with pytest.raises(ConfigError, match="relation_heads=0 must be a positive integer"):
        fidelity(teacher, student, tokenizer, HELDOUT, relation_heads=0)


def count_forwards(model) -> list[int]:
    """A one-element list that counts ``model``'s forward calls (the hook stays: tests use fresh models)."""
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_sentence_embeddings_are_in_text_order_and_equal_unpadded_ones(tokenizer) -> None:
    model = bert(tokenizer, head=False).train()
    texts = [HELDOUT[0], UNIQUE[0], HELDOUT[5] + " " + HELDOUT[6], UNIQUE[3], HELDOUT[2]] * 3  # lengths vary
    got = sentence_embeddings(model, tokenizer, texts, max_length=40, batch_size=4)
    assert got.shape == (len(texts), 32) and not got.requires_grad and model.training  # mode restored
    model.eval()
    with torch.no_grad():  # one text at a time: no padding, the reference
        for text, row in zip(texts, got):
            ids = torch.tensor([tokenizer(text, truncation=True, max_length=40)["input_ids"]])
            torch.testing.assert_close(row, model(input_ids=ids).last_hidden_state[0].mean(0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)


def test_reused_teacher_embeddings_give_exactly_the_same_cosine(tokenizer) -> None:
    teacher = bert(tokenizer, seed=0, head=False)
    students = [bert(tokenizer, layers=2, seed=s, head=False) for s in (1, 2)]
    options = {"max_length": 24, "batch_size": 5}  # several batches, truncation

    def old_path(student):  # embedding_cosine as it was: both sides computed, then compared
        a = sentence_embeddings(teacher, tokenizer, HELDOUT, **options)
        b = sentence_embeddings(student, tokenizer, HELDOUT, **options)
        return float(F.cosine_similarity(a, b, dim=-1).mean())

    want = [old_path(student) for student in students]
    assert 0.0 < abs(want[0] - want[1])  # two different students, two different values
    calls = count_forwards(teacher)
    cache = TeacherEmbeddings(tokenizer, HELDOUT)
    got = [cache.cosine(teacher, student, **options) for student in students + students]
    assert got == want + want  # bit-identical, not approximately equal
    assert calls[0] == 5  # ceil(24 / 5) teacher batches, once for four cosines
    given = sentence_embeddings(teacher, tokenizer, HELDOUT, **options)
    calls[0] = 0
    assert embedding_cosine(teacher, students[0], tokenizer, HELDOUT, teacher_embeddings=given, **options) == want[0]
    assert calls[0] == 0
    # Other options, or a teacher moved to another dtype (the trainer's bf16 teacher), are computed afresh.
    assert cache.cosine(teacher, students[0], max_length=16, batch_size=5) != want[0]
    assert calls[0] == 5
    teacher.to(torch.float64)
    assert cache.cosine(teacher, students[0], **options) == pytest.approx(want[0], abs=1e-5)
    assert calls[0] == 10


def test_width_mismatch_returns_none_without_running_either_model(tokenizer) -> None:
    teacher, student = bert(tokenizer, head=False), bert(tokenizer, layers=2, hidden=16, heads=2, seed=3, head=False)
    calls_t, calls_s = count_forwards(teacher), count_forwards(student)
    assert embedding_cosine(teacher, student, tokenizer, HELDOUT) is None
    assert TeacherEmbeddings(tokenizer, HELDOUT).cosine(teacher, student) is None
    given = torch.zeros(len(HELDOUT), 32)  # the teacher's width, precomputed
    assert embedding_cosine(teacher, student, tokenizer, HELDOUT, teacher_embeddings=given) is None
    assert calls_t == [0] and calls_s == [0]
    # Equal widths do run both (the hooks count).
    assert embedding_cosine(teacher, bert(tokenizer, layers=2, seed=3, head=False), tokenizer, HELDOUT) is not None
    assert calls_t == [1] and calls_s == [0]


def test_overlap_needs_more_texts_than_k_and_deeper_student_fails(teacher, tokenizer) -> None:
    student = bert(tokenizer, layers=2, seed=4)
    assert not any(k.startswith("nn_overlap") for k in fidelity(teacher, student, tokenizer, HELDOUT[:10]))
    assert "nn_overlap@5" in fidelity(teacher, student, tokenizer, HELDOUT[:10], k=5)
    with pytest.raises(ConfigError, match="k must be"):
        fidelity(teacher, student, tokenizer, HELDOUT[:4], k=0)
    with pytest.raises(ConfigError, match="^fidelity: the student has 4 layers but the teacher only 2: .* no deeper"):
        fidelity(student, teacher, tokenizer, HELDOUT[:4])


def test_cka_token_subsample_is_seeded(teacher, tokenizer, monkeypatch) -> None:
    student = bert(tokenizer, layers=2, seed=5)
    full = fidelity(teacher, student, tokenizer, HELDOUT, batch_size=8)
    monkeypatch.setattr(fidelity_module, "MAX_CKA_TOKENS", 64)
    first = fidelity(teacher, student, tokenizer, HELDOUT, batch_size=8)
    assert first == fidelity(teacher, student, tokenizer, HELDOUT, batch_size=8)
    assert first["final_cka"] != pytest.approx(full["final_cka"], abs=1e-4)  # fewer tokens, other value
    assert first["final_cosine"] == pytest.approx(full["final_cosine"])  # cosines always use every token
    assert fidelity(teacher, teacher, tokenizer, HELDOUT, batch_size=8)["final_cka"] == pytest.approx(1.0)


def test_causal_lm_identical_and_random(tokenizer) -> None:
    model = gpt2(tokenizer)
    same = fidelity(model, copy.deepcopy(model), tokenizer, HELDOUT[:12], batch_size=5)
    assert set(same) == keys_for(["0-0", "1-1", "2-2"])
    assert_identical(same)
    student = gpt2(tokenizer, seed=1).eval()
    other = fidelity(model, student, tokenizer, HELDOUT[:12], batch_size=5)
    assert other["output_kl"] > 0.1 and other["relation_kl"] > 0.1 and other["final_cka"] < 0.9
    # Relations of decoders hide future keys: recompute V-V per unpadded text with causal=True.
    model.eval()
    total, count = 0.0, 0
    request = CaptureRequest(qkv=(2,))
    with (torch.no_grad(), capture(model, resolve_architecture(model), request) as cap_t,
          capture(student, resolve_architecture(student), request) as cap_s):
        for text in HELDOUT[:12]:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            model(input_ids=ids)
            student(input_ids=ids)
            mask = torch.ones_like(ids, dtype=torch.bool)
            total += float(relation_kl(cap_s.value[2], cap_t.value[2], mask, relation_heads=32, causal=True))
            count += ids.shape[1]
    assert other["relation_kl/vv"] == pytest.approx(total / count, rel=1e-4)


def test_default_relation_heads() -> None:
    assert default_relation_heads(768, 384) == 48  # MiniLMv2's 48 for base teachers
    assert default_relation_heads(1024, 384) == 32
    assert default_relation_heads(32, 16) == 16
    assert default_relation_heads(100, 75) == 25
    assert default_relation_heads(7, 5) == 1
