"""A lane: one student being distilled, with everything that is its own.

The loop (``training/loop.py``) drives one or many lanes over the same batches and one teacher
forward per batch: a single ``tadistill distill`` is one lane, a comparative study is many. Each lane
owns its student and projections, optimizer, schedule, run directory and **its own random stream**
(dropout), swapped in around its forward/backward, so a lane trained beside others computes exactly
what it would compute alone with the same seed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import Tensor, nn
from transformers import get_scheduler

from tadistill.capture.architectures import Architecture, resolve_architecture
from tadistill.capture.heads import causal_lm_parts
from tadistill.capture.hooks import Captured, CaptureRequest
from tadistill.config import DistillConfig
from tadistill.errors import ConfigError
from tadistill.registry import METHODS, OBJECTIVES, traits
from tadistill.students.spec import build_student_from_spec
from tadistill.training.hooks import MethodHooks, overrides
from tadistill.training.rundir import RunDir
from tadistill.training.terms import NORMALIZERS, ModelOutputs, Term, merge_requests
from tadistill.training.trackers import check_trackers

# Settings every lane of one pass must share: they define the batches and the step count.
SHARED_TRAIN_FIELDS = ("steps", "batch_size", "grad_accum", "seed", "eval_every", "eval_batches", "save_every",
                       "log_every", "stop_at", "precision", "keep_checkpoints", "compile")


class Distiller(nn.Module):
    """Student + loss terms + the methods' learned modules in one module, so that one DDP / FSDP wrapper and
    one optimizer cover every trained weight."""

    def __init__(self, student: nn.Module, terms: list[Term], *, causal: bool = False,
                 modules: dict[str, nn.Module] | None = None):
        super().__init__()
        self.student = student
        self.terms = nn.ModuleList(terms)
        if modules:
            self.methods = nn.ModuleDict(modules)
        self.causal = causal
        heads = {traits(t.kind).head for t in terms if t.kind in OBJECTIVES}
        self.needs_logits = "mlm" in heads  # the masked-LM logits (B, T, V)
        self.needs_causal_head = "lm" in heads  # a causal LM's last hidden states and output layer

    def forward(self, inputs: dict[str, Tensor], batch: dict[str, Tensor], teacher: ModelOutputs, captured: Captured):
        if self.causal:
            # Causal LMs: the base model's last hidden states only. The chunked losses apply the output layer
            # a few rows at a time, so the (B, T, V) logits are never built, and hidden-state / relation
            # objectives never pay for them.
            parts = causal_lm_parts(self.student)
            hidden = parts.base(**inputs).last_hidden_state  # (B, T, d)
            student = ModelOutputs(captured, None, hidden, parts.output_layer if self.needs_causal_head else None)
        else:
            out = forward_module(self.student, logits=self.needs_logits)(**inputs)
            student = ModelOutputs(captured, out.logits if self.needs_logits else None)
        return torch.stack([term(student, teacher, batch).float() for term in self.terms])  # (n_terms,) sums


def forward_module(model: nn.Module, *, logits: bool) -> nn.Module:
    """The module a forward needs: the whole model when its logits are read, else its base model.

    A teacher loaded with its masked-LM head for a study's OD lane, or a student that keeps one, runs it only
    for the forwards whose logits are read: the head's transform and vocabulary projection (2 d V FLOPs per
    token, about a 6x384 body's cost at V = 30k) are skipped elsewhere. Exact: the base model's outputs and the
    captured internals are the same (tests/test_forward_module.py).
    """
    base = getattr(model, "base_model", model)
    return model if logits or base is None else base


def compile_forward(model: nn.Module, *, logits: bool = True) -> None:
    """torch.compile, in place, the module whose forward the loop calls (``forward_module``; causal LMs: the
    base model).

    ``nn.Module.compile`` keeps parameter names, so checkpoints and ``save_pretrained`` are unchanged. The
    capture hooks live on submodules and are traced into the graph; a different capture request (for
    example in evaluation) recompiles.
    """
    causal = resolve_architecture(model).causal
    target = causal_lm_parts(model).base if causal else forward_module(model, logits=logits)
    # Models of one architecture share one forward function, compiled once per variant: grad mode
    # (training, no_grad evaluation, the teacher's inference_mode) x shapes x models. A study of several
    # students exceeds dynamo's default of 8 and would fall back to eager silently.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    target.compile()


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class LaneParts:
    """What a method's ``build`` sees: the lane's student and its objectives' terms."""

    student: nn.Module
    student_arch: Architecture
    terms: list[Term]


@dataclass
class Lane:
    """One student and everything that is its own, complete once ``build_lane`` returns.

    ``model`` is the distiller until the trainer wraps it (``accelerator.prepare``: DDP, FSDP ...).
    """

    name: str
    config: DistillConfig
    run: RunDir
    student: nn.Module
    student_arch: Architecture
    terms: list[Term]
    distiller: Distiller
    methods: list[MethodHooks]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    rng: dict[str, Any]
    model: nn.Module
    failed: str | None = None

    @property
    def needs_teacher(self) -> bool:
        return (any(traits(t.kind).needs_teacher for t in self.terms if t.kind in OBJECTIVES)
                or any(m.uses_teacher for m in self.methods))

    @property
    def request(self) -> CaptureRequest:
        return merge_requests([t.student_request for t in self.terms])

    @property
    def teacher_request(self) -> CaptureRequest:
        return merge_requests([t.teacher_request for t in self.terms])

    @property
    def masked_inputs(self) -> bool:
        """Relation / hidden-state terms see clean text; masked-LM terms see BERT-masked text (a trait)."""
        return any(traits(t.kind).masked_inputs(t.cfg) for t in self.terms if t.kind in OBJECTIVES)

    @property
    def weights(self) -> Tensor:
        return torch.tensor([t.weight for t in self.terms], dtype=torch.float64)

    @property
    def normalizers(self) -> list[int]:
        """Per term: the index in the loop's counts (terms.NORMALIZERS) its sum is divided by."""
        return [NORMALIZERS.index(t.normalizer) for t in self.terms]

    @contextmanager
    def own_random_stream(self):
        """Run a block with this lane's RNG state, and keep where it left off."""
        outer = _rng_state()
        _set_rng_state(self.rng)
        try:
            yield
        finally:
            self.rng = _rng_state()
            _set_rng_state(outer)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the lane beyond its weights and optimizer: plain values and tensors."""
        return {"rng": self.rng, "failed": self.failed, "scheduler": self.scheduler.state_dict(),
                "methods": {m.name: m.state_dict() for m in self.methods}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng, self.failed = state["rng"], state["failed"]
        # The schedule continues where it stopped, with the current config's peak learning rates and schedule
        # (train.lr / schedule / warmup may change on --resume, e.g. after a NaN stop): the step count comes from
        # the checkpoint, the rates from the freshly built scheduler.
        fresh = list(self.scheduler.base_lrs)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = fresh
        rates = [base * fn(self.scheduler.last_epoch) for base, fn in zip(fresh, self.scheduler.lr_lambdas)]
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        self.scheduler._last_lr = rates
        for method in self.methods:
            method.load_state_dict(state["methods"][method.name])

    def log_values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for method in self.methods:
            out.update(method.log_values())
        return out


def _optimizer_and_schedule(config: DistillConfig, distiller: Distiller, methods: list[MethodHooks]):
    """AdamW (decoupled decay on matrices only) and the warmup + decay schedule; methods may group their own."""
    tc = config.train
    params = [p for p in distiller.parameters() if p.requires_grad]
    groups, own = [], set()
    for method in methods:
        mine = [p for m in method.modules().values() for p in m.parameters() if p.requires_grad]
        custom = method.param_groups(mine) if mine else None
        if custom:
            groups += custom
            own |= {id(p) for p in mine}
    rest = [p for p in params if id(p) not in own]
    groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},  # biases, norms
        *groups,
    ]
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tc.adam_betas, eps=tc.adam_eps)
    warmup = max(tc.warmup_steps, int(tc.warmup_ratio * tc.steps))
    names = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
    if tc.schedule == "cosine" and tc.min_lr_ratio > 0:
        # The cosine ends at lr * min_lr_ratio, not 0 (nanoGPT; Hoffmann et al. 2022 decay to 10%). With a ratio of
        # 0 the plain "cosine" schedule below is the same function; it is kept so that nothing else changes.
        scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup, num_training_steps=tc.steps,
                                  scheduler_specific_kwargs={"min_lr_rate": tc.min_lr_ratio})
        return optimizer, scheduler
    scheduler = get_scheduler(names[tc.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=tc.steps)
    return optimizer, scheduler


def enable_checkpointing(student: nn.Module) -> None:
    """Activation checkpointing of every block (Chen et al. 2016): a block keeps only its input in the forward
    and runs again in backward. Non-reentrant (``use_reentrant=False``): gradients are exact even for blocks whose
    inputs need none. The capture hooks stay correct: transformers checkpoints a block's ``forward``, so hooks on
    blocks run once; hooks inside them (Q/K/V projections) run again in the recomputation, after the loss has read
    the forward's tensors, and what they store then lives until the next forward clears it (tested equal)."""
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(student).__name__} does not support activation checkpointing in transformers: set "
                          "student.gradient_checkpointing=false")
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_objectives(config: DistillConfig, teacher_arch: Architecture, tokenizer) -> None:
    """The user errors of a config against its teacher, from the objectives' traits (one line each)."""
    active = [o for o in config.objectives if o.weight > 0]
    if not active:
        raise ConfigError("every objective has weight 0: give at least one a positive weight")
    kinds = {o.kind: traits(o.kind) for o in active}
    encoder_only = [k for k, t in kinds.items() if t.teacher == "encoder"]
    causal_only = [k for k, t in kinds.items() if t.teacher == "causal"]
    if teacher_arch.causal and encoder_only:
        raise ConfigError(f"{', '.join(encoder_only)} are masked-LM objectives and teacher {config.teacher!r} is a "
                          "causal LM: use the logits / lm objectives (recipes kd, gkd, teacher-free)")
    if not teacher_arch.causal and causal_only:
        raise ConfigError(f"{', '.join(causal_only)} need a causal-LM teacher (GPT-2, Llama ...) and "
                          f"{config.teacher!r} is an encoder: use output-kl / mlm (recipes od, distilbert)")
    masked_lm = [k for k, t in kinds.items() if t.head == "mlm"]
    if masked_lm and tokenizer.mask_token_id is None:
        raise ConfigError(f"teacher {config.teacher!r} has no [MASK] token: masked-LM objectives need one")
    if config.teacher_signals:
        online = [k for k, t in kinds.items() if not t.offline]
        if online:
            raise ConfigError(f"teacher_signals do not support {', '.join(online)}: run with the live teacher")


def student_head(config: DistillConfig, teacher_arch: Architecture) -> str:
    """The head the student is built with: a causal student always keeps its LM head (so that
    AutoModelForCausalLM loads it and it can generate); an encoder gets its MLM head when an objective reads it."""
    if teacher_arch.causal:
        return "causal-lm"
    return "mlm" if any(traits(o.kind).head == "mlm" for o in config.objectives if o.weight > 0) else "base"


def build_lane(name: str, config: DistillConfig, run: RunDir, *, teacher: nn.Module, teacher_arch: Architecture,
               tokenizer) -> Lane:
    """Student, terms, methods, optimizer and random stream of one lane; raises on a config that cannot work.

    The global seed is set here, right before anything random is drawn, so a lane starts from the same
    weights and stream whether it is built alone or among others.
    """
    check_objectives(config, teacher_arch, tokenizer)
    check_trackers(config.train.report_to)  # a missing tracker package: refused before the run directory exists
    set_seed(config.train.seed)
    student = build_student_from_spec(config, teacher, tokenizer, head=student_head(config, teacher_arch))
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in student.parameters()):
        # A teacher saved in bf16 (most LLM checkpoints) gives a bf16 student; its master weights and AdamW
        # states must be float32 (precision=bf16 autocasts the forward).
        student.float()
    if config.student.gradient_checkpointing:
        enable_checkpointing(student)
    student_arch = resolve_architecture(student)
    terms = [OBJECTIVES[o.kind].term(o, student_arch, teacher_arch) for o in config.objectives if o.weight > 0]
    parts = LaneParts(student, student_arch, terms)
    methods = [m for entry in METHODS.values() if (m := entry.build(config, parts)) is not None]
    for hook, what in (("continuation", "where continuations come from"), ("passes", "the passes of a micro-batch")):
        choosing = [m.name for m in methods if overrides(m, hook)]
        if len(choosing) > 1:
            raise ConfigError(f"methods {', '.join(choosing)} both choose {what}: keep one")
    modules: dict[str, nn.Module] = {}
    for method in methods:
        terms += method.terms()
        modules.update({f"{method.name}.{k}".replace(".", "_"): v for k, v in method.modules().items()})
    distiller = Distiller(student, terms, causal=student_arch.causal, modules=modules)
    optimizer, scheduler = _optimizer_and_schedule(config, distiller, methods)
    return Lane(name, config, run, student, student_arch, terms, distiller, methods, optimizer, scheduler,
                rng=_rng_state(), model=distiller)


def check_shared(lanes: list[Lane]) -> None:
    """Lanes trained in one pass must agree on the data and on the step structure."""
    first = lanes[0].config
    for lane in lanes[1:]:
        for key in SHARED_TRAIN_FIELDS:
            a, b = getattr(first.train, key), getattr(lane.config.train, key)
            if a != b:
                raise ConfigError(
                    f"cells trained in one pass must share train.{key} ({lanes[0].name}: {a}, {lane.name}: {b}): "
                    "set it in the study's shared settings"
                )
        if lane.config.data != first.data or lane.config.teacher != first.teacher:
            raise ConfigError(f"cells trained in one pass must share the teacher and data ({lane.name} differs)")
