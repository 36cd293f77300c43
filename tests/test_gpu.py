"""The accelerator paths: bf16 / fp16 autocast per recipe family, the half-precision teacher, the chunked logit
losses in bf16, on-policy sampling, train.compile and exact resume, all on CUDA.

Every test is marked ``gpu`` and skipped on a machine without CUDA, so the CPU suite passes. The device checks of
issue 16 run them: ``bash benchmarks/gpu.sh`` (benchmarks/gpu_checks.py). ``TADISTILL_GPU_TESTS_ON_CPU=1`` runs
them on the CPU instead (fp16 cases skipped: its autocast and grad scaler exist on CUDA only), a dry run of this
file that ``gpu.sh --cpu-smoke`` does so that a typo here cannot waste a GPU run.

Tolerances, per dtype (style.md item 9); each is stated where it is used:
- held-out loss before any update (step 0), half precision against float32: bf16 5e-2, fp16 1e-2 relative
  (8 and 11 significant bits; the step-0 loss sees the same weights and batches, so precision is the only change);
- chunked logit losses in bf16 against float32: loss 5e-3 relative, gradients 3e-2 relative in norm (1e-1 for
  TVD, whose gradient is sign(p - q) and flips wherever p ~ q);
- train.compile against eager: float32 1e-4 relative on the losses and 1e-5 absolute on the weights (the CPU
  test's); bf16 2e-2 relative on the losses (fused kernels round bf16 differently), weights not bounded one by one;
- resume: exact, with PyTorch's deterministic kernels (cuBLAS workspace fixed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tadistill.cli.main import main

ON_CPU = os.environ.get("TADISTILL_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE != "cuda" and not ON_CPU,
                       reason="needs a CUDA device (TADISTILL_GPU_TESTS_ON_CPU=1 runs a CPU dry run)"),
    pytest.mark.usefixtures("one_thread"),
]
CUDA_ONLY = pytest.mark.skipif(DEVICE != "cuda", reason="fp16 autocast and its grad scaler exist on CUDA only")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
STEP0_TOLERANCE = {"bf16": 5e-2, "fp16": 1e-2}  # relative, held-out loss before any update


# ------------------------------------------------------------------------------------------------- helpers


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(out) if "loss" in r}


def _eval_at(out: Path, step: int) -> float:
    return next(r["eval/loss"] for r in _metrics(out) if r.get("step") == step and "eval/loss" in r)


def _sets(teacher: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    """--set overrides that make any recipe run in a second or two on a tiny model."""
    sets = [f"teacher={teacher}", f"data.source={corpus}", f"data.cache_dir={cache}", "data.max_length=24",
            "data.heldout_fraction=0.2", "train.steps=3", "train.batch_size=4", "train.eval_batches=1",
            "train.log_every=1", "train.eval_every=0", *extra]
    return [a for s in sets for a in ("--set", s)]


def _distill(recipe: str, args: list[str], out: Path, *more: str) -> None:
    assert main(["distill", recipe, *args, *more, "--out", str(out), "--no-progress"]) == 0


def _checkpoint(out: Path) -> Path:
    return max((out / "checkpoints").glob("step-*"))


# Each recipe family on the fixture it needs: encoder relations / hidden states, masked-LM output distributions
# (an MLM head), causal next-token KD (Llama: grouped-query attention, untied head) and on-policy GKD (GPT-2).
FAMILIES = {
    "hs": ("tiny_teacher_no_dropout", ["objectives.hidden.mapping=uniform"]),
    "minilmv2": ("tiny_teacher_no_dropout", ["objectives.minilmv2.relation_heads=4"]),
    "od": ("tiny_teacher_no_dropout", []),
    "kd": ("tiny_llama", ["student.num_layers=2"]),
    "gkd": ("tiny_gpt2", ["student.num_layers=2", "data.prompt_tokens=6"]),
}


@pytest.fixture(scope="module")
def float32_runs(request, tiny_corpus, tmp_path_factory):
    """recipe -> its float32 run folder, trained once per module (the reference of every half-precision run)."""
    done: dict[str, Path] = {}

    def run(recipe: str) -> Path:
        if recipe not in done:
            fixture, extra = FAMILIES[recipe]
            base = tmp_path_factory.mktemp(f"fp32-{recipe}")
            args = _sets(request.getfixturevalue(fixture), tiny_corpus, base / "cache", *extra)
            _distill(recipe, args, base / "run", "--set", "train.precision=no")
            done[recipe] = base / "run"
        return done[recipe]

    return run


@pytest.fixture
def spy_teacher(monkeypatch):
    """The teacher object a run trains with (load_teacher wrapped), to read its device and dtype afterwards."""
    from tadistill.training import setup

    seen: list[nn.Module] = []
    original = setup.load_teacher

    def spy(configs):
        tokenizer, teacher, arch = original(configs)
        seen.append(teacher)
        return tokenizer, teacher, arch

    monkeypatch.setattr(setup, "load_teacher", spy)
    return seen


@pytest.fixture
def deterministic(monkeypatch):
    """PyTorch's deterministic kernels, so that two identical CUDA runs are bitwise equal.

    Atomic-add kernels (index_add, scatter_add in embedding and gather backward) sum in arrival order and cuBLAS
    may split reductions by workspace; ``use_deterministic_algorithms`` picks ordered kernels and needs a fixed
    cuBLAS workspace. warn_only: an op without a deterministic kernel warns instead of failing the run, and the
    equality asserted by the test then says whether it mattered.
    """
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


# ------------------------------------------------------------------------------ autocast per recipe family


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=CUDA_ONLY)])
@pytest.mark.parametrize("recipe", list(FAMILIES))
def test_half_precision_autocast_per_recipe_family(recipe, precision, request, tiny_corpus, tmp_path, float32_runs,
                                                   spy_teacher):
    fixture, extra = FAMILIES[recipe]
    out = tmp_path / "run"
    _distill(recipe, _sets(request.getfixturevalue(fixture), tiny_corpus, tmp_path / "cache", *extra), out,
             "--set", f"train.precision={precision}")
    # The teacher is stored in half precision on the device (never trained: half the memory, no casts);
    # the student's master weights stay float32, and so does the saved student.
    parameter = next(spy_teacher[0].parameters())  # [0]: this run's (the float32 reference below loads another)
    assert parameter.device.type == DEVICE and parameter.dtype == HALF[precision]
    rows = [r for r in _metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r.get("grad_norm", 0.0)) for r in rows)

    # Step 0 sees the float32 run's weights and batches (held-out text, also for GKD): precision is the only change.
    half, full = _eval_at(out, 0), _eval_at(float32_runs(recipe), 0)
    assert abs(half - full) <= STEP0_TOLERANCE[precision] * abs(full), (half, full)
    saved = load_file(str(out / "student" / "model.safetensors"))
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in saved.values())

    # fp16 needs loss scaling (bf16 has float32's exponent range, so it needs none): Accelerate's GradScaler
    # runs and its state travels in the checkpoint, so that a resumed run scales exactly as before.
    scaler_file = _checkpoint(out) / "scaler.safetensors"
    assert scaler_file.is_file() == (precision == "fp16")
    if precision == "fp16":
        from tadistill.training.statefile import load_tree

        scale = load_tree(scaler_file)["scale"]
        assert math.isfinite(scale) and 0 < scale <= 2.0**16  # 2^16 at the start, halved on every overflow


# ------------------------------------------------------------------------- chunked logit losses in bf16


def _logit_setup(seed: int = 0):
    """(B, T, d) hidden states, a Linear(d, V) head, (B, T, V) teacher logits and a (B, T) mask with padding on both
    sides; V = 50,257 (GPT-2's: odd, so chunks and tiles never divide it)."""
    b, t, d, v = 3, 45, 64, 50257
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g)
    teacher = torch.randn(b, t, v, generator=g) * 2
    torch.manual_seed(seed)
    head = nn.Linear(d, v)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 30:] = False
    mask[2, :7] = False
    return hidden.to(DEVICE), head.to(DEVICE), teacher.to(DEVICE), mask.to(DEVICE)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error in norm: one number per tensor, robust to the few entries near 0 that trip elementwise bounds."""
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def _kinds():
    from tadistill.objectives.logits import KINDS

    return KINDS


@pytest.mark.parametrize("mode", ["bf16-tensors", "autocast"])
@pytest.mark.parametrize("kind", _kinds())
def test_chunked_logit_divergence_in_bf16_against_float32(kind, mode):
    from tadistill.objectives.chunked import chunked_logit_divergence
    from tadistill.objectives.logits import logit_divergence

    hidden, head, teacher, mask = _logit_setup()
    h = hidden.clone().requires_grad_(True)
    reference = logit_divergence(head(h), teacher, mask, kind=kind)  # float32, the full (N, V) logits
    want = torch.autograd.grad(reference, [h, head.weight])

    if mode == "bf16-tensors":  # a model kept in bf16 (the teacher, or a student trained in pure bf16)
        h16 = hidden.bfloat16().requires_grad_(True)
        head16 = nn.Linear(head.in_features, head.out_features).to(DEVICE, torch.bfloat16)
        head16.load_state_dict({k: v.bfloat16() for k, v in head.state_dict().items()})
        value = chunked_logit_divergence(h16, head16, teacher.bfloat16(), mask, chunk_size=37, kind=kind)
        got = torch.autograd.grad(value, [h16, head16.weight])
    else:  # the training loop's case: float32 weights under bf16 autocast, a bf16 teacher's logits
        h32 = hidden.clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            value = chunked_logit_divergence(h32, head, teacher.bfloat16(), mask, chunk_size=37, kind=kind)
        got = torch.autograd.grad(value, [h32, head.weight])

    assert value.dtype == torch.float32  # the softmax and the sum run in float32 whatever the inputs
    assert abs(value.item() - reference.item()) <= 5e-3 * abs(reference.item()), (value.item(), reference.item())
    bound = 1e-1 if kind == "tvd" else 3e-2
    for name, g, w in zip(("hidden", "head.weight"), got, want):
        assert g.dtype == (torch.bfloat16 if mode == "bf16-tensors" else torch.float32)
        assert _relative(g, w) <= bound, (name, _relative(g, w))
        assert bool(torch.isfinite(g).all())


def test_chunked_cross_entropy_in_bf16_against_float32():
    from tadistill.objectives.chunked import chunked_cross_entropy

    hidden, head, _, mask = _logit_setup(1)
    targets = torch.randint(0, head.out_features, mask.shape, generator=torch.Generator().manual_seed(1))
    targets = targets.to(DEVICE).masked_fill(~mask, -100)
    h = hidden.clone().requires_grad_(True)
    logits = head(h)[mask]
    reference = nn.functional.cross_entropy(logits, targets[mask], reduction="sum")
    want = torch.autograd.grad(reference, [h, head.weight])
    h32 = hidden.clone().requires_grad_(True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        value = chunked_cross_entropy(h32, head, targets, chunk_size=37)
    got = torch.autograd.grad(value, [h32, head.weight])
    assert value.dtype == torch.float32
    assert abs(value.item() - reference.item()) <= 5e-3 * abs(reference.item())
    for g, w in zip(got, want):
        assert _relative(g, w) <= 3e-2


# ------------------------------------------------------------------------------------ on-policy sampling


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
def test_batched_sampling_on_the_device_equals_one_prompt_at_a_time_and_generate(family, request):
    from transformers import AutoModelForCausalLM

    from tadistill.training.sampling import sample_continuations

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(family)).to(DEVICE)
    prompts = [torch.tensor([3, 4, 5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11, 12])]
    greedy = {"max_length": 14, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1e-6, "eos_id": None, "pad_id": 0}
    together = sample_continuations(model, prompts, generator=torch.Generator(DEVICE).manual_seed(0), **greedy)
    for prompt, seq in zip(prompts, together):
        assert seq.device.type == "cpu" and seq.numel() == prompt.numel() + 6
        alone = sample_continuations(model, [prompt], generator=torch.Generator(DEVICE).manual_seed(0), **greedy)[0]
        assert torch.equal(seq, alone)  # left padding and explicit positions change nothing
        ids = prompt[None].to(DEVICE)
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)[0]
        assert torch.equal(seq, reference.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_on_the_device_is_seeded(dtype, tiny_gpt2):
    """A device generator is the only source of randomness: same seed, same samples; another seed, others. bf16:
    a teacher stored in bf16 samples the sequence-level KD continuations."""
    from transformers import AutoModelForCausalLM

    from tadistill.training.sampling import sample_continuations

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).to(DEVICE, dtype)
    prompts = [torch.tensor([3, 4, 5]), torch.tensor([6, 7])]
    kwargs = {"max_length": 20, "max_new_tokens": None, "temperature": 1.0, "top_p": 0.9, "eos_id": None, "pad_id": 0}

    def draw(seed: int) -> list[torch.Tensor]:
        return sample_continuations(model, prompts, generator=torch.Generator(DEVICE).manual_seed(seed), **kwargs)

    a, b, c = draw(1), draw(1), draw(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    vocab = model.config.vocab_size
    assert all(s.numel() == 20 and int(s.min()) >= 0 and int(s.max()) < vocab for s in a)


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=CUDA_ONLY)])
def test_on_policy_run_on_the_device_resumes_exactly(precision, tiny_gpt2, tiny_corpus, tmp_path, deterministic):
    """GKD with lambda = 1 under autocast: every batch is the student's own samples, drawn from device generators
    seeded by the batch number, so a run stopped at step 3 and resumed samples and trains exactly what one run does."""
    args = _sets(tiny_gpt2, tiny_corpus, tmp_path / "cache", "student.num_layers=2", "data.prompt_tokens=6",
                 "train.steps=6", "train.save_every=3", "train.eval_every=2", f"train.precision={precision}")
    straight, split = tmp_path / "straight", tmp_path / "split"
    _distill("gkd", args, straight)
    _distill("gkd", args, split, "--set", "train.stop_at=3")
    _distill("gkd", args, split, "--resume")
    a = [r for r in _metrics(straight) if "loss" in r]
    b = [r for r in _metrics(split) if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert all(r["policy/student"] == 1.0 for r in a)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa = load_file(str(straight / "student" / "model.safetensors"))
    wb = load_file(str(split / "student" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------------- compile and resume


# bf16: no bound on single weights. AdamW moves every weight by about lr (6e-4) a step whatever its gradient's size,
# so a gradient near 0 whose sign a fused kernel's rounding flips moves a weight by 2 lr; a bound above that would
# hold for any two runs. The held-out loss after training, which every weight enters, is compared instead.
@pytest.mark.parametrize("precision,loss_tol,weight_tol", [("no", 1e-4, 1e-5), ("bf16", 2e-2, None)])
def test_compile_gives_the_eager_run_on_the_device(precision, loss_tol, weight_tol, tiny_teacher_no_dropout,
                                                   tiny_corpus, tmp_path):
    args = _sets(tiny_teacher_no_dropout, tiny_corpus, tmp_path / "cache", "objectives.minilmv2.relation_heads=4",
                 "train.steps=2", f"train.precision={precision}")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    _distill("minilmv2", args, eager)
    _distill("minilmv2", args, compiled, "--set", "train.compile=true")
    la, lb = _losses(eager), _losses(compiled)
    assert sorted(la) == sorted(lb) == [1, 2]
    for step in la:
        assert abs(la[step] - lb[step]) <= loss_tol * max(1.0, abs(la[step])), (step, la[step], lb[step])
    ea, eb = _eval_at(eager, 2), _eval_at(compiled, 2)
    assert abs(ea - eb) <= loss_tol * max(1.0, abs(ea)), (ea, eb)
    wa = load_file(str(eager / "student" / "model.safetensors"))
    wb = load_file(str(compiled / "student" / "model.safetensors"))
    assert wa.keys() == wb.keys()  # nn.Module.compile keeps the parameter names
    if weight_tol is not None:
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=weight_tol)


@pytest.mark.parametrize("precision", ["no", "bf16", pytest.param("fp16", marks=CUDA_ONLY)])
def test_resume_on_the_device_continues_exactly(precision, tiny_teacher, tiny_corpus, tmp_path, deterministic):
    """Dropout is on (the tiny teacher's 0.1): the device's RNG state must travel in the checkpoint, and under
    fp16 the grad scaler's state too."""
    args = _sets(tiny_teacher, tiny_corpus, tmp_path / "cache", "train.steps=6", "train.save_every=3",
                 "train.eval_every=3", f"train.precision={precision}")
    straight, split = tmp_path / "straight", tmp_path / "split"
    _distill("hs", args, straight)
    _distill("hs", args, split, "--set", "train.stop_at=3")
    assert not (split / "student").exists()
    _distill("hs", args, split, "--resume")
    a, b = _losses(straight), _losses(split)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a == b
    evals = [[r for r in _metrics(run) if "eval/loss" in r] for run in (straight, split)]
    assert evals[0] == evals[1]
    wa = load_file(str(straight / "student" / "model.safetensors"))
    wb = load_file(str(split / "student" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
