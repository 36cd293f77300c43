"""A lane: one student being distilled, with everything that is its own.

The loop (``training/loop.py``) drives one or many lanes over the same batches and one teacher
forward per batch: a single ``tadistill distill`` is one lane, a comparative study is many. Each lane
owns its student and projections, optimizer, schedule, run directory and **its own random stream**
(dropout), swapped in around its forward/backward, so a lane trained beside others computes exactly
what it would compute alone with the same seed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
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
from tadistill.registry import OBJECTIVES
from tadistill.students.spec import build_student_from_spec
from tadistill.training.replay import AdaptiveOffPolicy, ReplayBuffer
from tadistill.training.rundir import RunDir
from tadistill.training.terms import ModelOutputs, Term, merge_requests

MASKED_LM_KINDS = ("output-kl", "mlm")
CAUSAL_LM_KINDS = ("logits", "lm", "moment-matching")

# Settings every lane of one pass must share: they define the batches and the step count.
SHARED_TRAIN_FIELDS = ("steps", "batch_size", "grad_accum", "seed", "eval_every", "eval_batches", "save_every",
                       "log_every", "stop_at", "precision", "keep_checkpoints", "compile")


class Distiller(nn.Module):
    """Student + loss terms in one module, so that one DDP / FSDP wrapper covers every trained weight."""

    def __init__(self, student: nn.Module, terms: list[Term], *, causal: bool = False):
        super().__init__()
        self.student = student
        self.terms = nn.ModuleList(terms)
        self.causal = causal
        self.needs_logits = any(t.needs_logits for t in terms)
        self.needs_causal_head = any(t.needs_causal_head for t in terms)

    def forward(self, inputs: dict[str, Tensor], batch: dict[str, Tensor], teacher: ModelOutputs, captured: Captured):
        if self.causal:
            # Causal LMs: the base model's last hidden states only. The chunked losses apply the output layer
            # a few rows at a time, so the (B, T, V) logits are never built, and hidden-state / relation
            # objectives never pay for them.
            parts = causal_lm_parts(self.student)
            hidden = parts.base(**inputs).last_hidden_state  # (B, T, d)
            student = ModelOutputs(captured, None, hidden, parts.output_layer if self.needs_causal_head else None)
        else:
            out = self.student(**inputs)
            student = ModelOutputs(captured, out.logits if self.needs_logits else None)
        return torch.stack([term(student, teacher, batch).float() for term in self.terms])  # (n_terms,) sums


def compile_forward(model: nn.Module) -> None:
    """torch.compile, in place, the module whose forward the loop calls (causal LMs: the base model).

    ``nn.Module.compile`` keeps parameter names, so checkpoints and ``save_pretrained`` are unchanged. The
    capture hooks live on submodules and are traced into the graph; a different capture request (for
    example in evaluation) recompiles.
    """
    target = causal_lm_parts(model).base if resolve_architecture(model).causal else model
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
class Lane:
    name: str
    config: DistillConfig
    run: RunDir
    student: nn.Module
    student_arch: Architecture
    terms: list[Term]
    distiller: Distiller
    rng: dict[str, Any] = field(default_factory=_rng_state)
    model: nn.Module | None = None  # the prepared (possibly wrapped) distiller
    optimizer: Any = None
    scheduler: Any = None
    failed: str | None = None
    captured: Captured | None = None  # set while the loop's capture context is open
    sources: dict[str, int] = field(default_factory=dict)  # micro-batches per continuation source (logged)
    adaptive: AdaptiveOffPolicy | None = None  # DistiLLM's schedule and its replay buffer (on_policy.adaptive)
    replay: ReplayBuffer | None = None

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms) or self.config.on_policy.teacher_fraction > 0

    @property
    def request(self) -> CaptureRequest:
        return merge_requests([t.student_request for t in self.terms])

    @property
    def teacher_request(self) -> CaptureRequest:
        return merge_requests([t.teacher_request for t in self.terms])

    @property
    def masked_inputs(self) -> bool:
        """Relation / hidden-state terms see clean text; masked-LM terms see BERT-masked text."""
        return any(t.kind == "mlm" or (t.kind == "output-kl" and t.cfg.positions == "masked") for t in self.terms)

    @property
    def weights(self) -> Tensor:
        return torch.tensor([t.weight for t in self.terms], dtype=torch.float64)

    @property
    def normalizers(self) -> list[int]:
        """Per term: 0 = divide by valid tokens, 1 = by masked-LM positions."""
        return [0 if t.normalizer == "tokens" else 1 for t in self.terms]

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

    def optimizer_and_schedule(self):
        tc = self.config.train
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # biases, norms
            ],
            lr=tc.lr,
            betas=tc.adam_betas,
            eps=tc.adam_eps,
        )
        warmup = max(tc.warmup_steps, int(tc.warmup_ratio * tc.steps))
        names = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
        scheduler = get_scheduler(names[tc.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=tc.steps)
        return optimizer, scheduler


def build_lane(name: str, config: DistillConfig, run: RunDir, *, teacher: nn.Module, teacher_arch: Architecture,
               tokenizer) -> Lane:
    """Student, terms and random stream of one lane, from its config; raises on a config that cannot work.

    The global seed is set here, right before anything random is drawn, so a lane starts from the same
    weights and stream whether it is built alone or among others.
    """
    set_seed(config.train.seed)
    active = [o for o in config.objectives if o.weight > 0]
    if not active:
        raise ConfigError("every objective has weight 0: give at least one a positive weight")
    masked_lm = [o.kind for o in active if o.kind in MASKED_LM_KINDS]
    causal_lm = [o.kind for o in active if o.kind in CAUSAL_LM_KINDS]
    if teacher_arch.causal and masked_lm:
        raise ConfigError(f"{', '.join(masked_lm)} are masked-LM objectives and teacher {config.teacher!r} is a causal "
                          "LM: use the logits / lm objectives (recipes kd, gkd, teacher-free)")
    if not teacher_arch.causal and causal_lm:
        raise ConfigError(f"{', '.join(causal_lm)} need a causal-LM teacher (GPT-2, Llama ...) and {config.teacher!r} "
                          "is an encoder: use output-kl / mlm (recipes od, distilbert)")
    if config.on_policy.samples and not teacher_arch.causal:
        raise ConfigError("on-policy sampling needs a causal-LM teacher and student: set on_policy.fraction=0")
    if masked_lm and tokenizer.mask_token_id is None:
        raise ConfigError(f"teacher {config.teacher!r} has no [MASK] token: masked-LM objectives need one")
    # A causal student always keeps its LM head, so that AutoModelForCausalLM loads it and it can generate.
    head = "causal-lm" if teacher_arch.causal else "mlm" if masked_lm else "base"
    student = build_student_from_spec(config, teacher, tokenizer, head=head)
    student_arch = resolve_architecture(student)
    terms = [OBJECTIVES[o.kind].term(o, student_arch, teacher_arch) for o in active]
    lane = Lane(name, config, run, student, student_arch, terms,
                Distiller(student, terms, causal=student_arch.causal))
    op = config.on_policy
    if op.adaptive:
        lane.adaptive = AdaptiveOffPolicy(total_steps=config.train.steps, capacity=op.replay_capacity,
                                          initial=op.adaptive_initial, schedule=op.replay_schedule)
        lane.replay = ReplayBuffer(op.replay_capacity)
    return lane


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
