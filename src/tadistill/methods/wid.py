"""Weight-inherited distillation (Wu et al. 2023, WID; docs/methods.md, WID).

The student starts as the teacher and inherits its weights; no alignment loss is needed. Identity-initialised
compactors sit on the input and output side of every linear map (``structure/compactors.py``) and train with
the student on the plain MLM loss. Every ``w_step`` steps the compactor rows / columns of smallest L2 norm are
masked (sec. 3.2), the masked count of each kind growing by 1/``intervals`` (16) of (width - target):

- hidden channels: one set for the whole residual stream (the output rows of every compactor writing the
  stream plus the input columns of every one reading it score a channel); the stream is masked by
  ``structure.masks`` (writers' outputs multiplied, LayerNorm statistics over the kept channels only), so the
  masked network is exactly the narrower one;
- FFN units per block: output rows of the up map's compactor + input columns of the down map's. (F - F_t)/16
  per interval is 4x (d - d_t)/16 for BERT's 4x FFN, the paper's rule;
- attention per block, ``attention='dims'``: the same number of dimensions leaves every head (the rows of the
  Q, K, V output compactors and the columns of the attention output's input compactor of one feature
  h * head_dim + j score it); ``'heads'``: whole heads, scored by their features.

A masked unit's output fades linearly to 0 over ``fade_steps`` (default w_step), and the gradient of its
compactor entries is replaced by lambda W (lambda = 20; ``before_update``), so they decay to zero (the paper's
rule, after ResRep, Ding et al. 2021). Why the fade: under AdamW a gradient lambda W moves an entry by about the
learning rate per step whatever lambda is (5e-5: 20,000 steps to take an identity entry to 0), so the stored
entries alone would not empty a unit before the cut; the fade removes it gradually and ends exactly at 0.

At the end (``final_student``) the compactors and the binary masks are folded into the weights
(W' = C_out W C_in) and the kept rows and columns copied into a dense model of the student's depth and the
target widths (``structure.materialize``); per-dimension attention multiplies the queries by
sqrt(head_dim_kept / head_dim), the attention scale the narrower heads would otherwise change.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tadistill.capture.architectures import get_module
from tadistill.config import DistillConfig, WIDConfig
from tadistill.errors import ConfigError, ModelError
from tadistill.loading import load_pretrained
from tadistill.structure import (
    Kept,
    Layout,
    Masks,
    apply_masks,
    materialize,
    resolve_layout,
)
from tadistill.structure.compactors import Compactors, compactor_sites, fold_into_copy
from tadistill.training.hooks import MethodHooks

# Encoders whose Q, K, V are separate maps and whose head width is hidden_size / heads (no rotary embedding that
# per-dimension pruning would break): what the WID paper compresses.
FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta")
KINDS = ("hidden", "attention", "ffn")


@dataclass(frozen=True)
class Targets:
    hidden: int
    ffn: int
    heads: int  # query heads kept per block
    head_dim: int  # dimensions kept per head


def targets(cfg: WIDConfig, layout: Layout) -> Targets:
    """The target widths of ``cfg`` for a student of ``layout``; one-line ConfigErrors for impossible ones."""
    d, F, H, dh = layout.hidden_size, layout.ffn_size, layout.num_heads, layout.head_dim
    hidden = cfg.hidden_size or max(1, round(cfg.width_ratio * d))
    ffn = cfg.intermediate_size or max(1, round(F * hidden / d))
    for name, value, size in (("hidden_size", hidden, d), ("intermediate_size", ffn, F)):
        if value > size:
            raise ConfigError(f"wid.{name}={value} is larger than the student's {size}: WID only removes units; "
                              f"choose at most {size}")
    if cfg.attention == "dims":
        if hidden % H:
            raise ConfigError(f"wid.attention=dims keeps all {H} heads, so wid.hidden_size={hidden} must be a multiple "
                              f"of {H} (e.g. {max(H, hidden // H * H)}), or use wid.attention=heads")
        return Targets(hidden, ffn, H, hidden // H)
    if hidden % dh:
        raise ConfigError(f"wid.attention=heads keeps whole heads of width {dh}, so wid.hidden_size={hidden} must be a "
                          f"multiple of {dh} (e.g. {max(dh, hidden // dh * dh)}), or use wid.attention=dims")
    return Targets(hidden, ffn, hidden // dh, dh)


def scheduled(total: int, done: int, intervals: int) -> int:
    """Units masked after ``done`` of ``intervals`` growths: (total / intervals) more per growth, rounded up."""
    return min(total, math.ceil(done * total / intervals))


def smallest(scores: Tensor, k: int) -> list[int]:
    """Indices of the k smallest scores; ties go to the higher index (the leading units stay, as slicing keeps)."""
    n = scores.numel()
    order = torch.argsort(scores.flip(0).float().cpu(), stable=True)  # ascending; reversed, so ties: high first
    return sorted((n - 1 - order[:k]).tolist())


class WID(MethodHooks):
    name = "wid"

    def __init__(self, cfg: WIDConfig, student: nn.Module, layout: Layout, goal: Targets):
        self.cfg, self.layout, self.goal = cfg, layout, goal
        self.fade = max(1, cfg.w_step if cfg.fade_steps is None else cfg.fade_steps)
        self.compactors = Compactors(compactor_sites(student, layout))
        L, A = layout.num_layers, layout.num_heads * layout.head_dim
        # The step each unit was masked at; -1: kept. Attention is per feature h * head_dim + j (heads mode masks
        # all features of a head at once).
        self.masked_at = {"hidden": torch.full((layout.hidden_size,), -1, dtype=torch.long),
                          "attention": torch.full((L, A), -1, dtype=torch.long),
                          "ffn": torch.full((L, layout.ffn_size), -1, dtype=torch.long)}
        self.step = 0
        self.grown = 0  # mask growths applied so far
        self.stream = Masks()  # the residual stream's hidden-channel multipliers, read by structure's hooks
        # Order matters: compactor hooks first, so a writer's output is mixed, then masked (compactors.py).
        self._hooks = ExitStack()
        self._hooks.enter_context(self.compactors.installed(student))
        self._hooks.enter_context(apply_masks(student, layout, self.stream))

    # ------------------------------------------------------------------------------------ schedule

    def norms(self) -> dict[str, Tensor]:
        """L2 norm per unit over every compactor row (output side) or column (input side) that holds it."""
        squares = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in self.masked_at.items()}
        for site in self.compactors.sites:
            c = self.compactors.matrix(site).detach().double().cpu()
            per_unit = (c * c).sum(1 if site.side == "out" else 0)  # rows produce outputs; columns read inputs
            if site.axis == "hidden":
                squares["hidden"] += per_unit
            else:
                squares[site.axis][site.block] += per_unit
        return {k: v.sqrt() for k, v in squares.items()}

    def _grow(self, step: int) -> None:
        """Mask more units when an interval has passed (the counts are a function of the step: resume-safe)."""
        cfg, layout, goal = self.cfg, self.layout, self.goal
        done = min((step - 1) // cfg.w_step, cfg.intervals)
        if done == self.grown:  # the compactors are read only at a step that masks something
            return
        norms = self.norms()

        def mask(at: Tensor, scores: Tensor, total: int) -> None:  # at, scores: (U,) of one group of units
            free = at < 0
            more = scheduled(total, done, cfg.intervals) - int((~free).sum())
            if more > 0:
                at[smallest(torch.where(free, scores, torch.full_like(scores, math.inf)), more)] = step

        mask(self.masked_at["hidden"], norms["hidden"], layout.hidden_size - goal.hidden)
        H, dh = layout.num_heads, layout.head_dim
        for i in range(layout.num_layers):
            mask(self.masked_at["ffn"][i], norms["ffn"][i], layout.ffn_size - goal.ffn)
            at = self.masked_at["attention"][i].view(H, dh)  # a view: masking writes through
            scores = norms["attention"][i].view(H, dh)
            if cfg.attention == "dims":
                for h in range(H):
                    mask(at[h], scores[h], dh - goal.head_dim)
            else:
                heads = at[:, 0].clone()
                mask(heads, scores.pow(2).sum(1).sqrt(), H - goal.heads)
                at.copy_(heads[:, None].expand(H, dh))
        self.grown = done

    def multipliers(self, kind: str, step: int) -> Tensor | None:
        """Per unit: 1 kept, fading linearly to 0 over ``fade`` steps once masked; None while nothing is masked."""
        at = self.masked_at[kind]
        if bool((at < 0).all()):
            return None
        gone = (step - at + 1).clamp_min(0).float() / self.fade  # masked at this step: 1 / fade gone
        return torch.where(at < 0, torch.ones_like(gone), (1.0 - gone).clamp_min(0.0))

    def _apply(self, step: int) -> None:
        """This step's multipliers, moved once to the device the compactors live on (not at every forward)."""
        device = next(self.compactors.parameters()).device

        def on_device(kind: str) -> Tensor | None:
            m = self.multipliers(kind, step)
            return None if m is None else m.to(device)

        self.stream.hidden = on_device("hidden")
        self.compactors.unit_scale["attention"] = on_device("attention")
        self.compactors.unit_scale["ffn"] = on_device("ffn")

    # --------------------------------------------------------------------------------------- hooks

    def modules(self) -> dict[str, nn.Module]:
        return {"compactors": self.compactors}

    def param_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        # No weight decay: decoupled decay would pull every compactor from the identity toward 0.
        return [{"params": params, "lr": self.cfg.compactor_lr, "weight_decay": 0.0}]

    def step_begins(self, step: int) -> None:
        self.step = step
        self._grow(step)
        self._apply(step)

    def _masked(self, site) -> Tensor:
        at = self.masked_at[site.axis]
        return (at if site.axis == "hidden" else at[site.block]) >= 0

    def before_update(self, step: int) -> None:
        """Masked rows (output side) and columns (input side) of every compactor get the gradient lambda W."""
        lam = self.cfg.decay
        for site in self.compactors.sites:
            masked = self._masked(site)
            if not bool(masked.any()):
                continue
            weight = self.compactors.matrix(site)
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            index = masked.nonzero().flatten().to(weight.device)
            dim = 0 if site.side == "out" else 1
            weight.grad.index_copy_(dim, index, lam * weight.detach().index_select(dim, index))

    def log_values(self) -> dict[str, float]:
        kept = {k: float((v < 0).sum()) / (1 if k == "hidden" else v.shape[0]) for k, v in self.masked_at.items()}
        masked_norms = []
        for site in self.compactors.sites:
            masked = self._masked(site)
            if bool(masked.any()):
                c = self.compactors.matrix(site).detach()
                part = c[masked.to(c.device)] if site.side == "out" else c[:, masked.to(c.device)].T
                masked_norms.append(part.norm(dim=1).mean())
        return {"wid/hidden": kept["hidden"], "wid/attention": kept["attention"], "wid/ffn": kept["ffn"],
                "wid/masked_norm": float(torch.stack(masked_norms).mean()) if masked_norms else 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "masked_at": {k: v.clone() for k, v in self.masked_at.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.grown = min(max(self.step - 1, 0) // self.cfg.w_step, self.cfg.intervals)  # what the masks hold
        for kind in KINDS:
            self.masked_at[kind].copy_(torch.as_tensor(state["masked_at"][kind]))
        self._apply(self.step)

    # ------------------------------------------------------------------------------------- the end

    def kept(self) -> Kept:
        """The kept units, once every masked unit has faded out (binary masks)."""
        layout, goal = self.layout, self.goal
        for kind in KINDS:
            m = self.multipliers(kind, self.step)
            if m is not None and not bool(((m == 0) | (m == 1)).all()):
                raise ConfigError(f"wid: masked {kind} units have not faded out at step {self.step}: train for at least "
                                  "wid.intervals x wid.w_step + wid.fade_steps steps")
        free = {k: (v < 0) for k, v in self.masked_at.items()}
        H, dh, L = layout.num_heads, layout.head_dim, layout.num_layers

        def indices(m: Tensor) -> list[int]:
            return m.nonzero().flatten().tolist()

        heads = [indices(free["attention"][i].view(H, dh).any(1)) for i in range(L)]
        features = [indices(free["attention"][i]) for i in range(L)] if self.cfg.attention == "dims" else None
        if not (len(indices(free["hidden"])) == goal.hidden and all(len(h) == goal.heads for h in heads)
                and all(int(free["ffn"][i].sum()) == goal.ffn for i in range(L))):
            raise ConfigError(f"wid: the masks have not reached the target widths at step {self.step}: train for at "
                              "least wid.intervals x wid.w_step + wid.fade_steps steps")
        return Kept(blocks=list(range(L)), heads=heads, kv_heads=heads, ffn=[indices(free["ffn"][i]) for i in range(L)],
                    hidden=indices(free["hidden"]), features=features)

    def final_student(self, student: nn.Module) -> nn.Module:
        """Fold the compactors (and the binary masks) into the weights and keep the surviving units."""
        kept = self.kept()
        folded = fold_into_copy(student, self.compactors)
        small = materialize(folded, resolve_layout(folded), None, kept=kept)
        if self.cfg.attention == "dims" and self.goal.head_dim != self.layout.head_dim:
            # q.k / sqrt(head_dim) over the kept dimensions; the narrower heads divide by sqrt(kept) instead.
            ratio = math.sqrt(self.goal.head_dim / self.layout.head_dim)
            arch = resolve_layout(small).arch
            with torch.no_grad():
                for block in get_module(small, arch.layers):
                    query = get_module(block, arch.query)
                    query.weight.mul_(ratio)
                    if query.bias is not None:
                        query.bias.mul_(ratio)
        return small


def inherit_head(config: DistillConfig, student: nn.Module) -> None:
    """Copy the teacher's masked-LM head into a student that starts as the teacher (in place).

    The run loads its teacher without the head when no objective runs the teacher (WID's loss is the plain MLM
    loss: ``mlm`` never reads the teacher), so the student's head would start random and the first steps would
    spend themselves refitting it. The teacher is loaded once more, with its head, and the student's tensors
    outside the base model (BERT's ``cls.*``) are copied from it.
    """
    sc = config.student
    if sc.init != "teacher" or sc.pretrained or student.get_output_embeddings() is None:
        return
    try:
        teacher = load_pretrained(config.teacher, head="mlm", trust_remote_code=config.trust_remote_code)
    except ModelError as exc:
        if "no masked-LM head" not in str(exc):
            raise
        raise ModelError(f"wid's student inherits the teacher's masked-LM head and teacher {config.teacher!r} has "
                         "none: use a teacher with one (bert-base-uncased, builtin-mlm)") from None
    source = teacher.state_dict()
    inside = student.base_model_prefix + "."
    with torch.no_grad():
        for name, tensor in student.state_dict(keep_vars=True).items():
            if not name.startswith(inside) and name in source and source[name].shape == tensor.shape:
                tensor.copy_(source[name])


def build(config: DistillConfig, parts) -> WID | None:
    cfg = config.wid
    if cfg is None:
        return None
    family = parts.student_arch.family
    if family not in FAMILIES or parts.student_arch.fused_qkv is not None:
        raise ConfigError(f"wid supports the encoder families {', '.join(FAMILIES)}; the student is a {family}: use "
                          "minitron for causal LMs")
    layout = resolve_layout(parts.student)
    goal = targets(cfg, layout)
    fade = max(1, cfg.w_step if cfg.fade_steps is None else cfg.fade_steps)
    needed = cfg.intervals * cfg.w_step + fade
    if config.train.steps < needed:
        raise ConfigError(f"wid masks over wid.intervals x wid.w_step + fade = {needed} steps but train.steps is "
                          f"{config.train.steps}: raise train.steps or lower wid.w_step")
    inherit_head(config, parts.student)
    return WID(cfg, parts.student, layout, goal)
