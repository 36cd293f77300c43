"""DPHuBERT: joint distillation and structured pruning (Peng et al. 2023; docs/methods.md, DPHuBERT).

The student starts as the teacher. Hard-concrete gates (``structure/hard_concrete.py``; Louizos et al. 2018)
sit on its attention heads (L, H), FFN units (L, F) and, optionally, its blocks (L,), applied by the shared
mask hooks (``structure/masks.py``): a head's output, an FFN unit's activation and a block's update are
multiplied by their gate. A fresh sample of every gate is drawn at each training forward (from the lane's
random stream, so a resumed run draws what an uninterrupted one draws); evaluation and the saved model use
the deterministic gates.

The expected number of block parameters that remain is a sum of the gates' P(z != 0) times the parameters
each unit carries (``BlockCost``: read off the tensors' roles of the family, so BERT, GPT-2 and Llama with
grouped-query attention are each counted exactly; a key/value head stays while any of its query heads does).
With s = 1 - E[kept] / all block parameters, the method adds (Peng et al. 2023, eq. 4; Wang et al. 2020)

    lambda_1 (s - t) + lambda_2 (s - t)^2,

t rising linearly from 0 to ``dphubert.target_sparsity`` over the target warmup (``step_begins``), the
multipliers trained by gradient *ascent* in their own optimizer group (``maximize``), the gates' log_alpha
by descent at ``dphubert.gate_lr``. The distillation loss is the run's objectives (recipe ``dphubert``:
L1 + cosine of linearly projected hidden states, ``objectives.hidden.loss=l1+cosine``).

At the end (``final_student``) the student is pruned by its deterministic gates into a dense Hugging Face
model (``structure.materialize``). The deterministic gates are binary (``deterministic_gates``: in each block
the round(E[L0]) units with the largest log_alpha); blocks whose gate is 0 go, and every kept block keeps the
same number of heads and FFN units, the largest number any kept block keeps (a config has one count; a block
that keeps fewer also keeps its best zero-gated units, with their output columns zeroed). So the saved model
computes exactly what the gated student computes in evaluation (tests/test_dphubert.py). The logs give both:
``prune/kept_sparsity`` counts each block's own units, ``prune/saved_sparsity`` the saved model's (lower when
the blocks keep uneven numbers of units).

What DPHuBERT's speech models also prune (the convolutional front end) is not here; gating whole attention
or FFN sub-layers is what ``blocks`` does for a whole block.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tadistill.capture.architectures import get_module
from tadistill.capture.hooks import CaptureRequest
from tadistill.config import DistillConfig, DPHuBERTConfig
from tadistill.errors import ConfigError, ModelError
from tadistill.loading import load_model_config
from tadistill.structure import Kept, Layout, Masks, Scores, TargetShape, apply_masks, materialize, resolve_layout
from tadistill.structure.hard_concrete import HardConcreteGates
from tadistill.structure.materialize import tensor_axes
from tadistill.structure.select import select_units
from tadistill.structure.units import is_conv1d
from tadistill.students.build import config_shape
from tadistill.training.hooks import MethodHooks


@dataclass(frozen=True)
class BlockCost:
    """The parameters of one block as a linear function of the units it keeps (all blocks of a model are alike)."""

    fixed: int  # carried by no unit: norms, the output projections' biases
    per_head: int  # per query head: its Q rows and attention-output columns (and biases)
    per_kv_head: int  # per key/value head: its K and V rows (equal to the query heads without GQA)
    per_ffn: int  # per FFN unit: its rows of the up (and gate) maps, its column of the down map

    def count(self, heads, kv_heads, ffn):
        """Parameters of a block that keeps these many units (numbers or tensors of counts)."""
        return self.fixed + self.per_head * heads + self.per_kv_head * kv_heads + self.per_ffn * ffn


def block_cost(model: nn.Module, layout: Layout) -> BlockCost:
    """Read a block's ``BlockCost`` off the role of every dimension of block 0's tensors (``tensor_axes``)."""
    axes = tensor_axes(model, layout)
    prefix = f"{layout.arch.layers}.0."
    H, H_kv, F = layout.num_heads, layout.num_kv_heads, layout.ffn_size
    fixed = per_head = per_kv = per_ffn = 0
    for name, tensor in model.named_parameters():
        if not name.startswith(prefix):
            continue
        n = tensor.numel()
        roles = set(axes[name]) - {None, "hidden"}
        if not roles:
            fixed += n
        elif roles == {"q"}:
            per_head += n // H
        elif roles == {"kv"}:
            per_kv += n // H_kv
        elif roles == {"qkv"}:  # GPT-2's fused [q | k | v]: H query heads, then H_kv keys and H_kv values
            per_head += n // (H + 2 * H_kv)
            per_kv += 2 * n // (H + 2 * H_kv)
        elif roles == {"ffn"}:
            per_ffn += n // F
        else:
            raise ModelError(f"{name} has units of several kinds {sorted(roles)}: its cost cannot be counted")
    return BlockCost(fixed, per_head, per_kv, per_ffn)


def expected_block_parameters(cost: BlockCost, layout: Layout, heads: Tensor, ffn: Tensor, blocks: Tensor) -> Tensor:
    """E[parameters of the blocks] for gates that are non-zero with these probabilities; differentiable.

    heads (L, H), ffn (L, F), blocks (L,): P(z != 0) per unit (ones for an ungated kind). Gates are
    independent, so a key/value head stays with probability 1 - prod over its query heads of (1 - p).
    """
    L = layout.num_layers
    kv = 1.0 - (1.0 - heads).reshape(L, layout.num_kv_heads, layout.group_size).prod(-1)  # (L, H_kv)
    per_block = cost.count(heads.sum(-1), kv.sum(-1), ffn.sum(-1))  # (L,)
    return (blocks * per_block).sum()


def kept_block_parameters(cost: BlockCost, layout: Layout, masks: Masks) -> int:
    """Parameters of the blocks a set of (deterministic) masks keeps, each block with its own counts."""
    L, H, F = layout.num_layers, layout.num_heads, layout.ffn_size
    heads = torch.ones(L, H) if masks.heads is None else (masks.heads.detach().cpu() != 0).float()
    ffn = torch.ones(L, F) if masks.ffn is None else (masks.ffn.detach().cpu() != 0).float()
    blocks = torch.ones(L) if masks.blocks is None else (masks.blocks.detach().cpu() != 0).float()
    return round(float(expected_block_parameters(cost, layout, heads, ffn, blocks)))


GATE_EPS = 1e-16  # AdamW's eps for the gates (``JointPruning.param_groups``)


class PruningGates(nn.Module):
    """The learned state: one ``HardConcreteGates`` per gated kind and the two Lagrange multipliers."""

    def __init__(self, layout: Layout, kinds: tuple[str, ...], *, init_drop: float):
        super().__init__()
        shapes = {"heads": (layout.num_layers, layout.num_heads), "ffn": (layout.num_layers, layout.ffn_size),
                  "blocks": (layout.num_layers,)}
        self.units = nn.ModuleDict({k: HardConcreteGates(shapes[k], init_drop=init_drop) for k in kinds})
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))


class SparsityLagrangian(nn.Module):
    """lambda_1 (s - t) + lambda_2 (s - t)^2, once per micro-batch (normalizer "batches"); 0 in evaluation, so
    the held-out loss is the distillation loss alone."""

    kind, weight, normalizer, cfg = "sparsity", 1.0, "batches", None

    def __init__(self, method: JointPruning):
        super().__init__()
        self.method = [method]  # not a submodule: the gates are registered once, as the method's module
        self.student_request = CaptureRequest()
        self.teacher_request = CaptureRequest()

    def forward(self, student, teacher, batch):
        if not self.training:
            return torch.zeros((), device=batch["attention_mask"].device)
        return self.method[0].lagrangian()


class JointPruning(MethodHooks):
    name = "dphubert"

    def __init__(self, cfg: DPHuBERTConfig, student: nn.Module, *, steps: int):
        self.cfg = cfg
        self.layout = layout = resolve_layout(student)
        heads = layout.explicit_head_dim if cfg.heads is None else cfg.heads
        if heads and not layout.explicit_head_dim:
            raise ConfigError(f"dphubert.heads: a {layout.arch.family} config ties head_dim to hidden_size / num_heads, "
                              "so a pruned model cannot keep fewer heads at the same width: set dphubert.heads=false "
                              "(FFN units and blocks are gated) or use a Llama-family teacher")
        self.kinds = tuple(k for k, on in (("heads", heads), ("ffn", cfg.ffn), ("blocks", cfg.blocks)) if on)
        self.cost = block_cost(student, layout)
        self.total = layout.num_layers * self.cost.count(layout.num_heads, layout.num_kv_heads, layout.ffn_size)
        # The most the gates can remove: one head, FFN unit and block stay (a config needs one of each).
        least = self.cost.count(1 if heads else layout.num_heads, 1 if heads else layout.num_kv_heads,
                                1 if cfg.ffn else layout.ffn_size) * (1 if cfg.blocks else layout.num_layers)
        reachable = 1.0 - least / self.total
        if cfg.target_sparsity > reachable:
            more = "" if cfg.blocks else " or set dphubert.blocks=true"
            raise ConfigError(f"dphubert.target_sparsity={cfg.target_sparsity} cannot be reached: gating "
                              f"{', '.join(self.kinds)} of this {layout.arch.family} removes at most {reachable:.3f} of "
                              f"the blocks' parameters; lower the target{more}")
        self.gates = PruningGates(layout, self.kinds, init_drop=cfg.init_drop)
        warmup = cfg.target_warmup_steps if cfg.target_warmup_steps is not None else cfg.target_warmup_ratio * steps
        self.warmup = max(0, round(warmup))
        self.target = 0.0
        self.masks = Masks()
        # The mask hooks stay on the student for the whole run (the masks' tensors change at every forward).
        self._hooks = ExitStack()
        self._hooks.enter_context(apply_masks(student, layout, self.masks))
        self._hooks.callback(student.base_model.register_forward_pre_hook(self._set_masks).remove)

    # ----------------------------------------------------------------------------------- the gates

    def _set_masks(self, module: nn.Module, args) -> None:
        """Before every forward of the student's base model: sampled gates in training, deterministic otherwise."""
        if module.training:
            drawn = {k: self.gates.units[k].sample() for k in self.kinds}
            self.masks.heads, self.masks.ffn, self.masks.blocks = (drawn.get(k) for k in ("heads", "ffn", "blocks"))
        else:
            fixed = self.deterministic_masks()
            self.masks.heads, self.masks.ffn, self.masks.blocks = fixed.heads, fixed.ffn, fixed.blocks

    def deterministic_masks(self) -> Masks:
        """The binary test-time gates (``deterministic_gates``), at least one block kept."""
        fixed = {k: self.gates.units[k].deterministic() for k in self.kinds}
        blocks = fixed.get("blocks")
        if blocks is not None:
            blocks = (blocks > 0).float()
            if not bool(blocks.any()):
                blocks[int(torch.argmax(self.gates.units["blocks"].log_alpha.detach()))] = 1.0
        return Masks(heads=fixed.get("heads"), ffn=fixed.get("ffn"), blocks=blocks)

    def _probabilities(self) -> tuple[Tensor, Tensor, Tensor]:
        L, layout = self.layout.num_layers, self.layout
        device = self.gates.lambda_1.device
        p = {k: self.gates.units[k].probability() for k in self.kinds}
        return (p.get("heads", torch.ones(L, layout.num_heads, device=device)),
                p.get("ffn", torch.ones(L, layout.ffn_size, device=device)),
                p.get("blocks", torch.ones(L, device=device)))

    def expected_sparsity(self) -> Tensor:
        """s = 1 - E[kept block parameters] / all block parameters; differentiable in the gates."""
        return 1.0 - expected_block_parameters(self.cost, self.layout, *self._probabilities()) / self.total

    def kept_sparsity(self) -> float:
        """The share of block parameters the deterministic gates remove, each block with its own counts."""
        return 1.0 - kept_block_parameters(self.cost, self.layout, self.deterministic_masks()) / self.total

    def saved_sparsity(self) -> float:
        """The share of block parameters the saved model removes: every kept block with the common counts."""
        t = uniform_target(self.layout, self.deterministic_masks())
        return 1.0 - t.num_layers * self.cost.count(t.num_heads, t.num_kv_heads, t.intermediate_size) / self.total

    def lagrangian(self) -> Tensor:
        gap = self.expected_sparsity() - self.target
        return self.gates.lambda_1 * gap + self.gates.lambda_2 * gap * gap

    # ------------------------------------------------------------------------------------ the hooks

    def modules(self) -> dict[str, nn.Module]:
        return {"gates": self.gates}

    def terms(self) -> list[nn.Module]:
        return [SparsityLagrangian(self)]

    def param_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        multipliers = {id(self.gates.lambda_1), id(self.gates.lambda_2)}
        # A gate's share of the sparsity gradient is lambda x (its parameters / all block parameters) x p (1 - p):
        # about 1e-10 for an FFN unit of a BERT-base at the start, far below AdamW's eps (train.adam_eps, 1e-6),
        # which would then freeze the gates. Their own eps keeps Adam's step ~ gate_lr wherever the gradient points.
        return [{"params": [p for p in params if id(p) not in multipliers], "lr": self.cfg.gate_lr, "weight_decay": 0.0,
                 "eps": GATE_EPS},
                {"params": [p for p in params if id(p) in multipliers], "lr": self.cfg.multiplier_lr,
                 "weight_decay": 0.0, "maximize": True}]

    def step_begins(self, step: int) -> None:
        # t rises linearly from 0 (Peng et al. 2023, sec. 2.3): a model far from the target at step 1 would get
        # a large penalty before the distillation loss has shaped the gates.
        ramp = 1.0 if self.warmup == 0 else min(1.0, step / self.warmup)
        self.target = self.cfg.target_sparsity * ramp

    def log_values(self) -> dict[str, float]:
        with torch.no_grad():
            values = {"prune/target": self.target, "prune/expected_sparsity": float(self.expected_sparsity()),
                      "prune/kept_sparsity": self.kept_sparsity(), "prune/saved_sparsity": self.saved_sparsity(),
                      "prune/lambda_1": float(self.gates.lambda_1),
                      "prune/lambda_2": float(self.gates.lambda_2)}
            if "blocks" in self.kinds:
                values["prune/kept_blocks"] = float(self.deterministic_masks().blocks.sum())
        return values

    def after_evaluation(self, row: dict[str, float]) -> dict[str, float]:
        return {"eval/kept_sparsity": self.kept_sparsity(), "eval/saved_sparsity": self.saved_sparsity()}

    def final_student(self, student: nn.Module) -> nn.Module:
        return prune_by_gates(student, self.layout, self.deterministic_masks())


def uniform_target(layout: Layout, gates: Masks) -> TargetShape:
    """The shape a config can hold: the kept blocks, and per block the most heads (per key/value group) and FFN
    units any kept block keeps (at least one)."""
    L = layout.num_layers
    blocks = list(range(L)) if gates.blocks is None else torch.nonzero(gates.blocks.cpu()).flatten().tolist()
    ffn = layout.ffn_size if gates.ffn is None else max(1, max(int((gates.ffn[b] != 0).sum()) for b in blocks))
    if gates.heads is None:
        heads, kv_heads = layout.num_heads, layout.num_kv_heads
    else:
        groups = (gates.heads.detach().cpu() != 0).reshape(L, layout.num_kv_heads, layout.group_size)[blocks]
        kv_heads = max(1, int(groups.any(-1).sum(-1).max()))  # key/value groups that any query head keeps
        per_group = max(1, int(groups.sum(-1).max()))
        heads = kv_heads * per_group
    return TargetShape(num_layers=len(blocks), hidden_size=layout.hidden_size, num_heads=heads,
                       num_kv_heads=kv_heads, intermediate_size=ffn)


def prune_by_gates(model: nn.Module, layout: Layout, gates: Masks) -> nn.Module:
    """The dense model that computes what ``model`` computes under the deterministic ``gates`` (module docstring).

    Units are ranked by their gate value (zero-gated ones last) and kept in ``uniform_target``'s counts
    (``select_units``); the kept units' gate values (0 for the zero-gated units a block keeps for the common
    count; any value in [0, 1] would do) are then multiplied into the input columns of the maps that read them.
    """
    L, d = layout.num_layers, layout.hidden_size
    detached = Masks(*(None if m is None else m.detach().float().cpu() for m in (gates.heads, gates.ffn,
                                                                                   gates.hidden, gates.blocks)))
    scores = Scores(heads=torch.ones(L, layout.num_heads) if detached.heads is None else detached.heads,
                    ffn=torch.ones(L, layout.ffn_size) if detached.ffn is None else detached.ffn,
                    hidden=torch.ones(d), blocks=torch.ones(L) if detached.blocks is None else detached.blocks)
    binary = select_units(scores, layout, uniform_target(layout, detached))
    kept = Kept.of(binary, layout)
    pruned = materialize(model, layout, binary)
    blocks = layout.blocks(pruned)
    with torch.no_grad():
        for position, source in enumerate(kept.blocks):
            if detached.heads is not None:
                values = detached.heads[source, kept.heads[position]].repeat_interleave(layout.head_dim)
                _scale_inputs(get_module(blocks[position], layout.arch.attention_output), values)
            if detached.ffn is not None:
                _scale_inputs(get_module(blocks[position], layout.ffn_out), detached.ffn[source, kept.ffn[position]])
    return pruned


def _scale_inputs(module: nn.Module, values: Tensor) -> None:
    """Multiply a Linear's (out, in) or a Conv1D's (in, out) input features by ``values`` (in,), in place."""
    weight = module.weight
    values = values.to(device=weight.device, dtype=weight.dtype)
    weight.mul_(values[:, None] if is_conv1d(module) else values[None, :])


def _check_student(config: DistillConfig, student: nn.Module) -> None:
    """DPHuBERT prunes a copy of the teacher: a student built from the config must be the teacher's shape and
    weights (an existing checkpoint, student.pretrained, is pruned as it is)."""
    sc = config.student
    if sc.pretrained:
        return
    teacher = config_shape(load_model_config(config.teacher, trust_remote_code=config.trust_remote_code))
    mine = config_shape(student.config)

    def shape(s) -> str:
        return f"{s.layers}x{s.hidden_size} ({s.heads} heads, FFN {s.intermediate_size})"

    if sc.init != "teacher" or (mine.layers, mine.hidden_size, mine.heads, mine.intermediate_size) != \
            (teacher.layers, teacher.hidden_size, teacher.heads, teacher.intermediate_size):
        raise ConfigError(f"dphubert prunes a copy of the teacher: set student.init=teacher and student.init_layers=all "
                          f"and leave the student's sizes unset (the student is {shape(mine)} with init={sc.init}, the "
                          f"teacher {shape(teacher)})")


def build(config: DistillConfig, parts) -> JointPruning | None:
    if config.dphubert is None:
        return None
    _check_student(config, parts.student)
    return JointPruning(config.dphubert, parts.student, steps=config.train.steps)
