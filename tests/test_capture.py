"""Tests of tadistill.capture on tiny random models of every supported family (CPU, a few seconds)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers as tf
from torch import nn

from tadistill.capture import (
    Architecture,
    Captured,
    CaptureRequest,
    attention_logits,
    capture,
    get_module,
    resolve_architecture,
    split_heads,
)
from tadistill.errors import ArchitectureError, ConfigError

# hidden 32, 2 layers, 4 heads (head_dim 8), small vocab
TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
DECODER = dict(TEXT, num_key_value_heads=2)  # grouped-query attention: 2 kv heads
SPEECH = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    conv_dim=(8, 8),
    conv_stride=(5, 2),
    conv_kernel=(10, 3),
    num_conv_pos_embeddings=4,
    num_conv_pos_embedding_groups=2,
    mask_time_prob=0.0,
)
VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=8, patch_size=4
)


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    inputs: str  # "text", "image" or "audio"
    layers: str
    query: str | None
    attention_output: str
    final_norm: str | None
    fused_qkv: str | None = None
    causal: bool = False
    num_kv_heads: int = 4


def _bert_like(cls: type, config: Callable[[], tf.PretrainedConfig]) -> Case:
    return Case(
        lambda: cls(config()), "text", "encoder.layer", "attention.self.query", "attention.output.dense", None
    )


def _llama_like(cls: type, config: Callable[[], tf.PretrainedConfig], prefix: str = "") -> Case:
    return Case(
        lambda: cls(config()), "text", f"{prefix}layers", "self_attn.q_proj", "self_attn.o_proj", f"{prefix}norm",
        causal=True, num_kv_heads=2,
    )


def _speech(cls: type, config_cls: type, stable: bool) -> Case:
    norm = "encoder.layer_norm" if stable else None
    return Case(
        lambda: cls(config_cls(**SPEECH, do_stable_layer_norm=stable)), "audio", "encoder.layers",
        "attention.q_proj", "attention.out_proj", norm,
    )


# Configs are built afresh for every model: a test may edit model.config.


def _gpt2() -> tf.GPT2Config:
    return tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)


def _distilbert() -> tf.DistilBertConfig:
    return tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)


CASES: dict[str, Case] = {
    "bert": _bert_like(tf.BertModel, lambda: tf.BertConfig(**TEXT)),
    "roberta": _bert_like(tf.RobertaModel, lambda: tf.RobertaConfig(**TEXT)),
    "xlm-roberta": _bert_like(tf.XLMRobertaModel, lambda: tf.XLMRobertaConfig(**TEXT)),
    "electra": _bert_like(tf.ElectraModel, lambda: tf.ElectraConfig(**TEXT, embedding_size=16)),
    "bert-mlm": Case(
        lambda: tf.BertForMaskedLM(tf.BertConfig(**TEXT)), "text", "bert.encoder.layer", "attention.self.query",
        "attention.output.dense", None,
    ),
    "distilbert": Case(
        lambda: tf.DistilBertModel(_distilbert()), "text", "transformer.layer", "attention.q_lin",
        "attention.out_lin", None,
    ),
    "distilbert-mlm": Case(
        lambda: tf.DistilBertForMaskedLM(_distilbert()), "text", "distilbert.transformer.layer", "attention.q_lin",
        "attention.out_lin", None,
    ),
    "gpt2": Case(lambda: tf.GPT2Model(_gpt2()), "text", "h", None, "attn.c_proj", "ln_f", "attn.c_attn", True),
    "gpt2-lm": Case(
        lambda: tf.GPT2LMHeadModel(_gpt2()), "text", "transformer.h", None, "attn.c_proj", "transformer.ln_f",
        "attn.c_attn", True,
    ),
    "llama": _llama_like(tf.LlamaModel, lambda: tf.LlamaConfig(**DECODER)),
    "llama-lm": _llama_like(tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**DECODER), prefix="model."),
    "qwen2": _llama_like(tf.Qwen2Model, lambda: tf.Qwen2Config(**DECODER)),
    "mistral": _llama_like(tf.MistralModel, lambda: tf.MistralConfig(**DECODER)),
    "vit": Case(
        lambda: tf.ViTModel(tf.ViTConfig(**VISION)), "image", "layers", "attention.q_proj", "attention.o_proj",
        "layernorm",
    ),
    "hubert": _speech(tf.HubertModel, tf.HubertConfig, stable=False),
    "hubert-stable": _speech(tf.HubertModel, tf.HubertConfig, stable=True),
    "wav2vec2": _speech(tf.Wav2Vec2Model, tf.Wav2Vec2Config, stable=False),
    "wav2vec2-stable": _speech(tf.Wav2Vec2Model, tf.Wav2Vec2Config, stable=True),
}


def _make(name: str, eager: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = CASES[name].build()
    if eager:
        model.set_attn_implementation("eager")
    return model.eval()  # no dropout when comparing


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "text":
        ids = torch.randint(3, 100, (2, 7), generator=g)
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0  # right padding in the second sequence
        return {"input_ids": ids, "attention_mask": mask}
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}
    return {"input_values": torch.randn(2, 400, generator=g)}


def _hook_counts(model: nn.Module) -> dict[str, int]:
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in model.named_modules()}


def _hooked_since(model: nn.Module, before: dict[str, int]) -> set[str]:
    return {name for name, n in _hook_counts(model).items() if n != before[name]}


# ---------------------------------------------------------------------------------------------------
# resolve_architecture
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_resolve_architecture_every_family(name: str) -> None:
    case = CASES[name]
    arch = resolve_architecture(_make(name))
    assert arch.layers == case.layers
    assert arch.query == case.query
    assert arch.fused_qkv == case.fused_qkv
    assert arch.attention_output == case.attention_output
    assert arch.final_norm == case.final_norm
    assert arch.causal is case.causal
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.head_dim) == (2, 32, 4, 8)
    assert arch.num_kv_heads == case.num_kv_heads
    if case.fused_qkv is None:
        assert arch.key == case.query.replace("query", "key").replace("q_", "k_")
        assert arch.value == case.query.replace("query", "value").replace("q_", "v_")


def test_vit_head_model_resolves_under_its_prefix() -> None:
    model = tf.ViTForImageClassification(tf.ViTConfig(**VISION, num_labels=3))
    arch = resolve_architecture(model)
    assert (arch.layers, arch.final_norm, arch.family) == ("vit.layers", "vit.layernorm", "vit")


def test_unknown_module_names_what_is_missing() -> None:
    with pytest.raises(ArchitectureError, match=r"list of blocks of Sequential \(tried: encoder.layer"):
        resolve_architecture(nn.Sequential(nn.Linear(4, 4)))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixer = nn.Linear(4, 4)

    class MyModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(ArchitectureError, match=r"query projection of MyModel block 0 \(tried: attention.self.query"):
        resolve_architecture(MyModel())


def test_module_without_config_is_refused() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(4, 4) for _ in range(4))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attn()

    class NoConfig(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block()])

    with pytest.raises(ArchitectureError, match="NoConfig has no Hugging Face config"):
        resolve_architecture(NoConfig())


def test_config_inconsistent_with_projection_widths_is_refused() -> None:
    model = _make("llama")
    model.config.num_key_value_heads = 4  # the k_proj / v_proj modules have 2 kv heads
    with pytest.raises(ArchitectureError, match="self_attn.k_proj has 16 outputs but the config implies 32"):
        resolve_architecture(model)


def test_get_module_and_manual_architecture_errors() -> None:
    model = _make("bert")
    assert get_module(model, "encoder.layer.1.attention.self.query") is model.encoder.layer[1].attention.self.query
    assert get_module(model, "") is model
    with pytest.raises(ArchitectureError, match="BertModel has no submodule 'encoder.layer.5'"):
        get_module(model, "encoder.layer.5")
    fields = dict(resolve_architecture(model).__dict__)
    with pytest.raises(ArchitectureError, match="needs query, key and value"):
        Architecture(**{**fields, "key": None})
    with pytest.raises(ArchitectureError, match="multiple of num_kv_heads"):
        Architecture(**{**fields, "num_kv_heads": 3})


# ---------------------------------------------------------------------------------------------------
# capture: hidden states and Q/K/V
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_hidden_states_match_hugging_face(name: str) -> None:
    model = _make(name)
    arch = resolve_architecture(model)
    everything = CaptureRequest(hidden=tuple(range(arch.num_layers + 1)))
    with torch.no_grad(), capture(model, arch, everything) as captured:
        out = model(**_inputs(CASES[name].inputs), output_hidden_states=True)
    reference = list(out.hidden_states)
    # Index L is after the final norm: HF's last_hidden_state (ViT / stable speech models do not tie
    # hidden_states[L] to it; the others do, and head models are all tied here).
    if getattr(out, "last_hidden_state", None) is not None:
        reference[-1] = out.last_hidden_state
    assert sorted(captured.hidden) == list(range(arch.num_layers + 1))
    for i, expected in enumerate(reference):
        torch.testing.assert_close(captured.hidden[i], expected, msg=f"{name} hidden state {i}")


def test_vit_last_index_is_after_the_final_layernorm() -> None:
    model = _make("vit")
    arch = resolve_architecture(model)
    with torch.no_grad(), capture(model, arch, CaptureRequest(hidden=(2,))) as captured:
        out = model(**_inputs("image"), output_hidden_states=True)
    torch.testing.assert_close(captured.hidden[2], model.layernorm(out.hidden_states[2]))
    assert not torch.allclose(captured.hidden[2], out.hidden_states[2])


@pytest.mark.parametrize("name", list(CASES))
def test_qkv_equal_projections_of_their_input(name: str) -> None:
    model = _make(name)
    arch = resolve_architecture(model)
    block = get_module(model, arch.layers)[1]
    projection = get_module(block, arch.fused_qkv or arch.query)
    seen: list[torch.Tensor] = []
    spy = projection.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad(), capture(model, arch, CaptureRequest(qkv=(2,))) as captured:
            model(**_inputs(CASES[name].inputs))
            x = seen[-1]
            if arch.fused_qkv:
                q, k, v = projection(x).chunk(3, dim=-1)  # GPT-2: no GQA
            else:
                q, k, v = (get_module(block, p)(x) for p in (arch.query, arch.key, arch.value))
    finally:
        spy.remove()
    torch.testing.assert_close(captured.query[2], q)
    torch.testing.assert_close(captured.key[2], k)
    torch.testing.assert_close(captured.value[2], v)
    assert captured.query[2].shape[-1] == arch.num_heads * arch.head_dim
    assert captured.key[2].shape[-1] == captured.value[2].shape[-1] == arch.num_kv_heads * arch.head_dim
    assert not captured.hidden


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_qkv_from_block_input(name: str) -> None:
    """Independent check: Q/K/V recomputed from the captured block input (hidden state i-1)."""
    model = _make(name)
    arch = resolve_architecture(model)
    with torch.no_grad(), capture(model, arch, CaptureRequest(hidden=(1,), qkv=(2,))) as captured:
        model(**_inputs("text"))
        h = captured.hidden[1]  # input of block 2 (1-based) == output of block 1
        if name == "bert":  # post-LN: the projections read the block input directly
            attn = model.encoder.layer[1].attention.self
            q, k, v = attn.query(h), attn.key(h), attn.value(h)
        elif name == "gpt2":  # pre-LN, fused [q | k | v]
            q, k, v = model.h[1].attn.c_attn(model.h[1].ln_1(h)).chunk(3, dim=-1)
        else:  # pre-RMSNorm, GQA
            layer = model.layers[1]
            x = layer.input_layernorm(h)
            q, k, v = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)
    for got, expected in ((captured.query[2], q), (captured.key[2], k), (captured.value[2], v)):
        torch.testing.assert_close(got, expected)


def test_only_requested_hooks_are_registered_and_fire() -> None:
    model = _make("bert")
    arch = resolve_architecture(model)
    before = _hook_counts(model)
    with torch.no_grad(), capture(model, arch, CaptureRequest(hidden=(2,))) as captured:
        assert _hooked_since(model, before) == {"", "encoder.layer.1"}  # root: clear + completeness check
        model(**_inputs("text"))
    assert set(captured.hidden) == {2}
    assert not (captured.query or captured.key or captured.value)
    with torch.no_grad(), capture(model, arch, CaptureRequest(qkv=(1,))) as captured:
        prefix = "encoder.layer.0.attention.self."
        assert _hooked_since(model, before) == {"", prefix + "query", prefix + "key", prefix + "value"}
        model(**_inputs("text"))
    assert (set(captured.query), set(captured.key), set(captured.value), captured.hidden) == ({1}, {1}, {1}, {})
    with capture(model, arch, CaptureRequest()):
        assert _hooked_since(model, before) == set()


def test_hooks_are_removed_on_exit_and_on_exception() -> None:
    model = _make("gpt2")
    arch = resolve_architecture(model)
    before = _hook_counts(model)
    request = CaptureRequest(hidden=(0, 1, 2), qkv=(1, 2))
    with capture(model, arch, request):
        assert _hooked_since(model, before)
    assert _hook_counts(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, arch, request):
            raise RuntimeError("boom")
    assert _hook_counts(model) == before
    with pytest.raises(ConfigError):
        with capture(model, arch, CaptureRequest(hidden=(9,))):
            pass
    assert _hook_counts(model) == before


def test_tensors_are_overwritten_on_each_forward() -> None:
    model = _make("llama")
    arch = resolve_architecture(model)
    with torch.no_grad(), capture(model, arch, CaptureRequest(hidden=(2,), qkv=(1,))) as captured:
        first = model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state
        torch.testing.assert_close(captured.hidden[2], first)
        second = model(input_ids=torch.tensor([[8, 9, 10, 11]])).last_hidden_state
        torch.testing.assert_close(captured.hidden[2], second)
        assert captured.query[1].shape == (1, 4, 32) and captured.key[1].shape == (1, 4, 16)


def test_student_captures_carry_gradients() -> None:
    model = _make("bert").train()
    arch = resolve_architecture(model)
    with capture(model, arch, CaptureRequest(hidden=(2,), qkv=(2,))) as captured:
        model(**_inputs("text"))
        (captured.hidden[2].square().mean() + captured.query[2].mean()).backward()
    assert model.encoder.layer[1].attention.self.query.weight.grad is not None
    assert model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_clone_turns_inference_tensors_into_normal_tensors() -> None:
    model = _make("distilbert")
    arch = resolve_architecture(model)
    with capture(model, arch, CaptureRequest(hidden=(0, 2), qkv=(1,))) as captured:
        with torch.inference_mode():
            model(**_inputs("text"))
        assert captured.hidden[2].is_inference()
        copy = captured.clone()
    assert isinstance(copy, Captured) and copy is not captured
    for store in (copy.hidden, copy.query, copy.key, copy.value):
        assert store and all(not t.is_inference() for t in store.values())
    torch.testing.assert_close(copy.hidden[2], captured.hidden[2])
    (copy.hidden[2] * torch.ones(1, requires_grad=True)).sum().backward()  # usable by autograd
    captured.clear()
    assert not (captured.hidden or captured.query or captured.key or captured.value)
    assert set(copy.hidden) == {0, 2}


def test_layerdrop_skipped_block_is_reported_not_stale() -> None:
    torch.manual_seed(0)
    model = tf.HubertModel(tf.HubertConfig(**SPEECH, layerdrop=1.0)).train()  # every block skipped
    arch = resolve_architecture(model)
    with capture(model, arch, CaptureRequest(hidden=(1,))):
        with pytest.raises(ConfigError, match="hidden state 1 of HubertModel not produced.*layerdrop=0.0"):
            model(**_inputs("audio"))


# ---------------------------------------------------------------------------------------------------
# Request validation
# ---------------------------------------------------------------------------------------------------


def test_out_of_range_requests_raise_config_error() -> None:
    model = _make("bert")
    arch = resolve_architecture(model)
    cases = [
        (
            CaptureRequest(hidden=(3,)),
            r"layer 3 is out of range for BertModel with 2 layers \(hidden-state indices 0..2, blocks 1..2\)",
        ),
        (CaptureRequest(hidden=(-1,)), "layer -1 is out of range"),
        (CaptureRequest(qkv=(0,)), "layer 0 is out of range for the Q/K/V of BertModel"),
        (CaptureRequest(qkv=(3,)), "layer 3 is out of range"),
    ]
    for request, message in cases:
        with pytest.raises(ConfigError, match=message):
            with capture(model, arch, request):
                pass


def test_capture_request_normalizes_and_checks() -> None:
    request = CaptureRequest(hidden=(3, 1, 3), qkv=[2])  # type: ignore[arg-type]
    assert request.hidden == (1, 3) and request.qkv == (2,)
    assert request.union(CaptureRequest(hidden=(0,), qkv=(2, 4))) == CaptureRequest(hidden=(0, 1, 3), qkv=(2, 4))
    with pytest.raises(ConfigError, match="integer layer indices"):
        CaptureRequest(hidden=(1.0,))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# attention.py
# ---------------------------------------------------------------------------------------------------


def _eager_check(name: str, mask: torch.Tensor | None) -> None:
    """softmax(attention_logits + mask) must equal the eager attention probabilities of every layer."""
    model = _make(name, eager=True)
    arch = resolve_architecture(model)
    inputs = _inputs(CASES[name].inputs)
    with torch.no_grad(), capture(model, arch, CaptureRequest(qkv=(1, 2))) as captured:
        out = model(**inputs, output_attentions=True)
    for layer in (1, 2):
        logits = attention_logits(captured.query[layer], captured.key[layer], num_heads=arch.num_heads)
        assert logits.dtype == torch.float32
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None], float("-inf"))  # mask: (B, T, T) -> (B, 1, T, T)
        probs = logits.softmax(-1)
        torch.testing.assert_close(probs, out.attentions[layer - 1], msg=f"{name} layer {layer}")


def test_attention_logits_match_eager_bert_with_padding() -> None:
    keys = _inputs("text")["attention_mask"].bool()  # (B, T)
    _eager_check("bert", keys[:, None, :].expand(-1, 7, -1))


def test_attention_logits_match_eager_gpt2_causal_with_padding() -> None:
    keys = _inputs("text")["attention_mask"].bool()
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    _eager_check("gpt2", keys[:, None, :] & causal)


@pytest.mark.parametrize("name", ["distilbert", "vit", "hubert"])
def test_attention_logits_match_eager_other_absolute_position_models(name: str) -> None:
    mask = _inputs("text")["attention_mask"].bool()[:, None, :].expand(-1, 7, -1) if name == "distilbert" else None
    _eager_check(name, mask)


def test_split_heads_layout() -> None:
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)
    heads = split_heads(x, 4)
    assert heads.shape == (2, 4, 3, 2)
    torch.testing.assert_close(heads[1, 2, 0], x[1, 0, 4:6])
    with pytest.raises(ValueError):
        split_heads(x, 3)


def test_attention_logits_grouped_query_repeats_each_kv_head() -> None:
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 5, 4 * 8, generator=g), torch.randn(2, 5, 2 * 8, generator=g)
    logits = attention_logits(q, k, num_heads=4, num_kv_heads=2)
    assert logits.shape == (2, 4, 5, 5)
    qh, kh = split_heads(q, 4), split_heads(k, 2)
    for h in range(4):  # query heads 0, 1 share kv head 0; heads 2, 3 share kv head 1
        torch.testing.assert_close(logits[:, h], qh[:, h] @ kh[:, h // 2].transpose(-1, -2) / 8**0.5)
    with pytest.raises(ValueError):
        attention_logits(q, k, num_heads=4, num_kv_heads=3)


def test_attention_logits_upcasts_bf16() -> None:
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    low = attention_logits(q.bfloat16(), k.bfloat16(), num_heads=4)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, attention_logits(q, k, num_heads=4), atol=0.05, rtol=0.02)
