"""Causal-LM distillation end to end: targets, sampling, the chunked terms in the loop, the regimes via the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tadistill import config as C
from tadistill.capture.architectures import resolve_architecture
from tadistill.capture.heads import causal_lm_parts
from tadistill.capture.hooks import Captured
from tadistill.cli.main import main
from tadistill.errors import ConfigError
from tadistill.objectives.logits import logit_divergence
from tadistill.training.loop import next_token_labels
from tadistill.training.sampling import draw_source, sample_continuations, top_p_filter
from tadistill.training.terms import CausalLMTerm, LogitDivergenceTerm, ModelOutputs, MomentMatchingTerm

pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def causal_args(tiny_corpus, tmp_path):
    def build(teacher: Path, *extra: str) -> list[str]:
        sets = [
            f"teacher={teacher}", f"data.source={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=24", "data.heldout_fraction=0.2", "train.steps=3", "train.batch_size=4",
            "train.eval_batches=1", "train.log_every=1", "student.num_layers=2", *extra,
        ]
        return [a for s in sets for a in ("--set", s)]

    return build


# ------------------------------------------------------------------------------------------- targets


def test_next_token_labels_mask_prompt_padding_and_last_token():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = next_token_labels(ids, attention, [2, 0])
    # Row 0: prompt = first 2 tokens; position 1 predicts token 2 (first completion token).
    assert labels[0].tolist() == [-100, 7, 8, 9, -100]
    # Row 1: no prompt, 3 real tokens: positions 0 and 1 predict tokens 1 and 2.
    assert labels[1].tolist() == [6, 7, -100, -100, -100]
    assert next_token_labels(ids, attention, None)[0].tolist() == [6, 7, 8, 9, -100]


# ------------------------------------------------------------------------------------------ sampling


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1e-6)).sum() == 1  # the top token always stays
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_draw_source_follows_the_fractions():
    cfg = C.OnPolicyConfig(fraction=0.3, teacher_fraction=0.2)
    draws = [draw_source(cfg, torch.Generator().manual_seed(i)) for i in range(2000)]
    assert abs(draws.count("student") / 2000 - 0.3) < 0.04
    assert abs(draws.count("teacher") / 2000 - 0.2) < 0.04
    assert draw_source(C.OnPolicyConfig(fraction=1.0), torch.Generator().manual_seed(0)) == "student"


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
def test_batched_sampling_with_left_padding_equals_one_prompt_at_a_time(family, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(family))
    prompts = [torch.tensor([3, 4, 5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11, 12])]
    kwargs = dict(max_length=12, max_new_tokens=4, temperature=1.0, top_p=1e-6, eos_id=None, pad_id=0)
    together = sample_continuations(model, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    for prompt, seq in zip(prompts, together):
        alone = sample_continuations(model, [prompt], generator=torch.Generator().manual_seed(0), **kwargs)[0]
        assert torch.equal(seq, alone)
        assert torch.equal(seq[: prompt.numel()], prompt) and seq.numel() == prompt.numel() + 4
        # Greedy (top_p -> 0) must equal transformers' own greedy decoding.
        ref = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], max_new_tokens=4,
                             do_sample=False, pad_token_id=0)[0]
        assert torch.equal(seq, ref)


def test_sampling_is_seeded_and_stops_after_eos(tiny_gpt2):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    prompts = [torch.tensor([3, 4, 5]), torch.tensor([6, 7])]
    kwargs = dict(max_length=20, max_new_tokens=None, temperature=1.0, top_p=1.0, pad_id=0)
    a = sample_continuations(model, prompts, eos_id=None, generator=torch.Generator().manual_seed(1), **kwargs)
    b = sample_continuations(model, prompts, eos_id=None, generator=torch.Generator().manual_seed(1), **kwargs)
    c = sample_continuations(model, prompts, eos_id=None, generator=torch.Generator().manual_seed(2), **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert [s.numel() for s in a] == [20, 20]  # no eos: filled up to max_length
    # Make token 9 the end-of-text token: every sequence stops right after its first 9.
    eos = int(a[0][3])
    cut = sample_continuations(model, prompts, eos_id=eos, generator=torch.Generator().manual_seed(1), **kwargs)
    assert cut[0].numel() == 4 and int(cut[0][-1]) == eos
    for seq, prompt in zip(cut, prompts):
        assert (seq[prompt.numel():] == eos).sum() <= 1


# ------------------------------------------------------------------------------------- terms vs plain


def test_logit_term_equals_the_plain_divergence_on_full_logits(tiny_gpt2):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    torch.manual_seed(1)
    student = AutoModelForCausalLM.from_config(teacher.config).eval()
    arch = resolve_architecture(teacher)
    cfg = C.LogitDivergence(divergence="jsd", beta=0.3, temperature=1.5, chunk_size=5)
    term = LogitDivergenceTerm(cfg, arch, arch)
    ids = torch.randint(2, 40, (3, 9))
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0
    labels = next_token_labels(ids, attention, [0, 2, 4])
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    s, t = causal_lm_parts(student), causal_lm_parts(teacher)
    with torch.no_grad():
        t_hidden = t.base(input_ids=ids, attention_mask=attention).last_hidden_state
    s_hidden = s.base(input_ids=ids, attention_mask=attention).last_hidden_state
    value = term(ModelOutputs(Captured(), None, s_hidden, s.output_layer),
                 ModelOutputs(Captured(), None, t_hidden, t.output_layer), batch)
    reference = logit_divergence(student(input_ids=ids, attention_mask=attention).logits,
                                 teacher(input_ids=ids, attention_mask=attention).logits, labels != -100,
                                 kind="jsd", beta=0.3, temperature=1.5)
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
    lm = CausalLMTerm(C.CausalLM(chunk_size=4), arch, arch)
    ce = lm(ModelOutputs(Captured(), None, s_hidden, s.output_layer), ModelOutputs(Captured()), batch)
    logits = student(input_ids=ids, attention_mask=attention).logits
    expected = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100], reduction="sum")
    torch.testing.assert_close(ce, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- regimes, CLI


def _check_student(out: Path, teacher: Path) -> None:
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    tok = AutoTokenizer.from_pretrained(out / "student")
    ids = tok("The quick brown fox", return_tensors="pt")
    generated = student.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5
    assert student.config.model_type == AutoModelForCausalLM.from_pretrained(teacher).config.model_type
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_perplexity"] > 1


REGIMES = {
    "kd": [],
    "kd-rkl-topk": ["objectives.logits.divergence=reverse-kl", "objectives.logits.teacher_topk=5"],
    "gkd": ["data.prompt_tokens=6"],
    "gkd-seqkd": ["data.prompt_tokens=6", "on_policy.fraction=0.5", "on_policy.teacher_fraction=0.5"],
    "teacher-free": [],
    "gkd-adaptive": ["data.prompt_tokens=6", "on_policy.fraction=0", "on_policy.adaptive=true",
                     "on_policy.adaptive_initial=1.0", "on_policy.replay_capacity=4"],
}


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_regimes_run_through_the_cli(regime, family, request, causal_args, tmp_path):
    teacher = request.getfixturevalue(family)
    recipe = regime.split("-")[0] if regime != "teacher-free" else regime
    out = tmp_path / "run"
    assert main(["distill", recipe, *causal_args(teacher, *REGIMES[regime]), "--out", str(out), "--no-progress"]) == 0
    rows = [r for r in _metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] and r["loss"] >= 0 for r in rows)
    if recipe == "gkd":
        fractions = rows[-1]
        assert sum(fractions[f"policy/{k}"] for k in ("student", "teacher", "dataset", "replay")) == 1
        if regime == "gkd":
            assert fractions["policy/student"] == 1.0
        if regime == "gkd-adaptive":  # phi = 1: the first batch fills the buffer, later ones generate or replay
            assert fractions["policy/phi"] == 1.0 and fractions["policy/dataset"] == 0
            assert rows[0]["policy/student"] == 1.0
    _check_student(out, teacher)


def test_ammd_alternates_players_and_uses_both_moments(tiny_gpt2, causal_args, tmp_path):
    out = tmp_path / "ammd"
    args = causal_args(tiny_gpt2, "data.prompt_tokens=6", "train.steps=4", "train.max_grad_norm=null")
    assert main(["distill", "ammd", *args, "--out", str(out), "--no-progress"]) == 0
    rows = [r for r in _metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(abs(r["loss"]) <= 2.0 + 1e-6 for r in rows)  # per token, |f| <= 1 bounds a moment gap by 2
    assert 0 < rows[-1]["policy/student"] < 1  # both on- and off-policy batches were drawn
    _check_student(out, tiny_gpt2)


def test_ammd_held_parameters_alternate(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    from tadistill.methods import ammd
    from tadistill.training.lane import LaneParts

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    arch = resolve_architecture(model)
    term = MomentMatchingTerm(C.MomentMatching(), arch, arch)
    parts = LaneParts(model, arch, [term])

    def config(alternate: bool):
        return C.DistillConfig(objectives=[C.MomentMatching(alternate=alternate)])

    method = ammd.build(config(True), parts)
    q_ids = {id(p) for p in term.q_head.parameters()}
    odd = {id(p) for p in method.held_parameters(1)}
    even = {id(p) for p in method.held_parameters(2)}
    assert even == q_ids and odd.isdisjoint(q_ids) and len(odd) == len(list(model.parameters()))
    assert term.q_head.proj.out_features == model.config.vocab_size
    assert ammd.build(config(False), parts) is None  # simultaneous updates: nothing is held


def test_teacher_free_never_runs_the_teacher(tiny_gpt2, causal_args, tmp_path, monkeypatch):
    import tadistill.training.setup as api

    calls = []
    original = api.load_teacher

    def spy(configs):
        tokenizer, teacher, arch = original(configs)
        teacher.register_forward_hook(lambda *a: calls.append(1))
        teacher.base_model.register_forward_hook(lambda *a: calls.append(1))
        return tokenizer, teacher, arch

    monkeypatch.setattr(api, "load_teacher", spy)
    out = tmp_path / "tf"
    assert main(["distill", "teacher-free", *causal_args(tiny_gpt2), "--out", str(out), "--no-progress"]) == 0
    assert calls == []
    assert {k for r in _metrics(out) for k in r if k.startswith("loss/")} == {"loss/lm"}


def test_hidden_and_minilmv2_transfer_to_decoders(tiny_llama, causal_args, tmp_path):
    out = tmp_path / "hs"
    sets = ["objectives.minilmv2.relation_heads=4"]
    assert main(["distill", "minilmv2", *causal_args(tiny_llama, *sets), "--out", str(out), "--no-progress"]) == 0
    _check_student(out, tiny_llama)
    out = tmp_path / "hidden"
    assert main(["distill", "hs", *causal_args(tiny_llama), "--out", str(out), "--no-progress"]) == 0
    assert all(r["loss"] >= 0 for r in _metrics(out) if "loss" in r)


ADAPTIVE = ["on_policy.fraction=0", "on_policy.adaptive=true", "on_policy.adaptive_initial=0.6",
            "on_policy.replay_capacity=4"]


@pytest.mark.parametrize("policy", [["on_policy.fraction=0.5"], ADAPTIVE], ids=["gkd", "distillm"])
def test_on_policy_resume_is_exact(policy, tiny_gpt2, causal_args, tmp_path):
    args = causal_args(tiny_gpt2, "data.prompt_tokens=6", *policy, "train.steps=6", "train.save_every=3",
                       "train.eval_every=2")
    straight = tmp_path / "straight"
    assert main(["distill", "gkd", *args, "--out", str(straight), "--no-progress"]) == 0
    split = tmp_path / "split"
    assert main(["distill", "gkd", *args, "--set", "train.stop_at=3", "--out", str(split), "--no-progress"]) == 0
    assert main(["distill", "gkd", *args, "--out", str(split), "--resume", "--no-progress"]) == 0
    a = [r for r in _metrics(straight) if "loss" in r]
    b = [r for r in _metrics(split) if "loss" in r]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["policy/student"] for r in a] == [r["policy/student"] for r in b]
    if policy is ADAPTIVE:
        assert [r.get("policy/replay") for r in a] == [r.get("policy/replay") for r in b]
        assert any(r["policy/replay"] > 0 for r in a)  # the buffer was reused


def test_mismatched_objectives_are_refused(tiny_gpt2, tiny_teacher, causal_args, tiny_args, tmp_path, capsys):
    assert main(["distill", "od", *causal_args(tiny_gpt2), "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "causal LM" in capsys.readouterr().err
    assert main(["distill", "kd", *tiny_args(), "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "causal-LM teacher" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="prompts"):
        from tadistill.resolve import resolve_config

        resolve_config("gkd", overrides=["data.prompt_tokens=null"])


def test_a_bf16_teacher_gives_a_float32_student(tiny_llama, causal_args, tmp_path):
    teacher = tmp_path / "bf16-teacher"
    shutil.copytree(tiny_llama, teacher)
    AutoModelForCausalLM.from_pretrained(tiny_llama).to(torch.bfloat16).save_pretrained(teacher)
    assert next(iter(load_file(str(teacher / "model.safetensors")).values())).dtype == torch.bfloat16
    out = tmp_path / "kd"
    assert main(["distill", "kd", *causal_args(teacher, "train.steps=1"), "--out", str(out), "--no-progress"]) == 0
    # Master weights (and AdamW's states) in float32, as with any student; precision=bf16 autocasts the forward.
    assert {v.dtype for v in load_file(str(out / "student" / "model.safetensors")).values()} == {torch.float32}
