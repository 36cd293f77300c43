"""Loss terms: each turns one objective config into (what to capture, how to compute its loss).

A term knows which hidden states / Q-K-V projections / logits it needs from each model, owns the
learned projections when it has any (the only state, hence nn.Module), and calls the pure functions
of ``tadistill.objectives``. Each returns the *sum* of its per-row loss; the loop divides once by the
global count named by ``normalizer`` ("tokens": valid tokens, "targets": positions with a label, i.e.
masked-LM positions, or the next-token targets of a causal LM), so
gradient accumulation and data parallelism give the same loss as one large batch.

Terms are built at set-up, when both models are known, so this is where a config that does not fit
the models is refused, with a one-line ConfigError: equal head counts (``require_equal_heads``),
relation heads that divide every width (``require_relation_heads``), layer mappings that fit both
depths (``user_layer_map``), one vocabulary. What needs no model (kinds, ranges) is checked by the config
itself. The pure functions of ``tadistill.objectives`` guard the same conditions with ValueError, for
callers that pass tensors directly; they never speak to the user.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tadistill import config as C
from tadistill.capture.architectures import Architecture
from tadistill.capture.attention import attention_logits
from tadistill.capture.hooks import Captured, CaptureRequest
from tadistill.training.hooks import sampled_by
from tadistill.errors import ConfigError
from tadistill.objectives.chunked import chunked_cross_entropy, chunked_logit_divergence, default_chunk_size
from tadistill.objectives.attention import (
    attention_score_mse, qk_attention_kl, relation_kl, suggest_relation_heads, value_relation_kl,
)
from tadistill.objectives.chunked_relations import default_relation_chunk_size
from tadistill.objectives.hidden import hidden_cosine, hidden_l1_cosine, hidden_mse
from tadistill.objectives.layer_maps import LayerPairs, layer_map
from tadistill.objectives.moment_matching import QValueHead, off_policy_term, on_policy_term
from tadistill.objectives.output import mlm_cross_entropy, soft_target_kl


# What a term's sum is divided by, counted over the whole optimizer step and every process: valid tokens,
# positions with a label (masked-LM positions, or a causal LM's next-token targets), sequences, micro-batches.
NORMALIZERS = ("tokens", "targets", "sequences", "batches")


@dataclass
class ModelOutputs:
    """What one forward pass of a model produced for the terms."""

    captured: Captured
    logits: Tensor | None = None  # (B, T, V) when a term needs the masked-LM distribution
    last_hidden: Tensor | None = None  # (B, T, d) causal LMs: after the final norm, for the chunked losses
    output_layer: Callable[[Tensor], Tensor] | None = None  # causal LMs: (c, d) -> (c, V)


def resolve_teacher_layer(value: C.TeacherLayer, num_layers: int) -> int:
    """'last' / 'last-1' / 'last-2' / 1-based index -> 1-based block index, range-checked."""
    index = {"last": num_layers, "last-1": num_layers - 1, "last-2": num_layers - 2}.get(value, value)
    if not isinstance(index, int) or not 1 <= index <= num_layers:
        raise ConfigError(f"teacher_layer={value!r} is out of range: the teacher has blocks 1..{num_layers}")
    return index


def require_equal_heads(method: str, student: Architecture, teacher: Architecture, alternative: str = "") -> None:
    """Attention maps are compared head by head: the head counts must match."""
    if student.num_heads != teacher.num_heads:
        raise ConfigError(
            f"{method} needs equal head counts (teacher {teacher.num_heads}, student {student.num_heads}): "
            f"set student.num_heads={teacher.num_heads}{alternative}"
        )


def qkv_widths(arch: Architecture) -> list[int]:
    """The widths of a model's concatenated queries (H d_h) and keys / values (H_kv d_h), ascending."""
    return sorted({arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim})


def relation_heads_hint(*widths: int) -> str:
    """The suggestions of ``suggest_relation_heads`` for an error message: '8, 4 or 2'."""
    words = [str(v) for v in suggest_relation_heads(*widths)]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def require_relation_heads(relation_heads: int, student: Architecture, teacher: Architecture, *, setting: str) -> None:
    """MiniLMv2 cuts every Q/K/V width of both models into ``relation_heads`` heads (Wang et al. 2021, eq. 1-3).

    A count that does not divide them all is a one-line ConfigError that suggests common divisors of every
    width (not a fixed number: 12 does not divide a 64-wide student) and ends with ``setting=<best>``, the
    way to set it (``--set objectives.minilmv2.relation_heads`` in a run, ``relation_heads`` for fidelity).
    """
    every = sorted(set(qkv_widths(student)) | set(qkv_widths(teacher)))
    advice = f"such as {relation_heads_hint(*every)}: {setting}={suggest_relation_heads(*every)[0]}"
    if isinstance(relation_heads, bool) or not isinstance(relation_heads, int) or relation_heads < 1:
        raise ConfigError(f"relation_heads={relation_heads!r} must be a positive integer dividing both models' "
                          f"widths {every}, {advice}")
    for who, arch in (("student", student), ("teacher", teacher)):
        for width in qkv_widths(arch):
            if width % relation_heads:
                raise ConfigError(f"relation_heads={relation_heads} must divide the {who} width {width}: choose a "
                                  f"common divisor of both models' widths {every}, {advice}")


def user_layer_map(what: str, strategy: str, student: Architecture, teacher: Architecture, **options) -> LayerPairs:
    """``layer_map`` on the user's values: its ValueErrors become one-line ConfigErrors that name ``what``.

    The mapping's own checks (an explicit list that does not fit the depths, a student deeper than its
    teacher) are the user's checks too: repeating them here would be a second copy to keep in step.
    """
    try:
        return layer_map(strategy, student.num_layers, teacher.num_layers, **options)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _linear(d_in: int, d_out: int, *, equal_widths: bool = False) -> nn.Module:
    """A learned W h_S where the widths differ; the identity where they match, unless ``equal_widths``: then a
    learned W that starts as the identity (DPHuBERT's prediction heads, Peng et al. 2023: its student starts as
    the teacher, so its distance starts at 0)."""
    if d_in != d_out:
        return nn.Linear(d_in, d_out)
    if not equal_widths:
        return nn.Identity()
    layer = nn.Linear(d_in, d_out)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(d_in))
        layer.bias.zero_()
    return layer


class Term(nn.Module):
    """Base: subclasses set the requests in __init__ and implement forward -> summed loss."""

    # The global count the loop divides this term's sum by (one of NORMALIZERS). What a term reads from the
    # models (logits, a causal LM's head, the teacher at all) is a trait of its kind, in registry.OBJECTIVES.
    normalizer = "tokens"

    def __init__(self, cfg, student: Architecture, teacher: Architecture):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.kind
        self.weight = cfg.weight
        self.causal = student.causal
        self.student_request = CaptureRequest()
        self.teacher_request = CaptureRequest()

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


class OutputKLTerm(Term):
    """OD / DistilBERT soft targets: tau^2 KL(p_T^tau || p_S^tau) of masked-LM distributions."""


    def __init__(self, cfg: C.OutputKL, student: Architecture, teacher: Architecture):
        super().__init__(cfg, student, teacher)
        self.normalizer = "targets" if cfg.positions == "masked" else "tokens"
        if student.vocab_size != teacher.vocab_size:
            # Same tokenizer (checked when the student is loaded) but, say, a padded embedding table.
            raise ConfigError(f"output-kl compares the two models' distributions token by token, and the student has "
                              f"{student.vocab_size} vocabulary entries, the teacher {teacher.vocab_size}: build the "
                              "student from the teacher's config")

    def forward(self, student, teacher, batch):
        if self.cfg.positions == "masked":
            mask = batch["labels"] != -100
        else:
            mask = batch["attention_mask"].bool()
        return soft_target_kl(
            student.logits, teacher.logits, mask, temperature=self.cfg.temperature, scale_by_t2=self.cfg.scale_by_t2
        )


class MaskedLMTerm(Term):
    """Hard masked-LM loss on the corpus labels."""

    normalizer = "targets"

    def forward(self, student, teacher, batch):
        return mlm_cross_entropy(student.logits, batch["labels"])


class LogitDivergenceTerm(Term):
    """Causal LMs: next-token divergence at every target position, chunk by chunk (GKD eq. 1, DistiLLM).

    ``batch["labels"]`` holds, at position t, the token t predicts (already shifted), -100 where nothing is
    distilled (prompt, padding, after the end of a sample). Neither model's (B, T, V) logits are built:
    both output layers run on ``chunk_size`` rows at a time.
    """

    normalizer = "targets"

    def __init__(self, cfg: C.LogitDivergence, student: Architecture, teacher: Architecture):
        super().__init__(cfg, student, teacher)
        vocab = max(student.vocab_size or 0, teacher.vocab_size or 0)
        self.chunk_size = cfg.chunk_size or default_chunk_size(vocab)

    def forward(self, student, teacher, batch):
        mask = batch["labels"] != -100  # (B, T)
        teacher_rows = teacher.last_hidden[mask]  # (N, d_T): small next to (N, V)
        teacher_head = teacher.output_layer
        c = self.cfg
        return chunked_logit_divergence(
            student.last_hidden, student.output_layer, lambda rows: teacher_head(teacher_rows[rows]), mask,
            chunk_size=self.chunk_size, kind=c.divergence, temperature=c.temperature, beta=c.beta, alpha=c.alpha,
            teacher_topk=c.teacher_topk,
        )


class CausalLMTerm(Term):
    """The student's own next-token cross-entropy on the corpus (needs no teacher)."""

    normalizer = "targets"

    def __init__(self, cfg: C.CausalLM, student: Architecture, teacher: Architecture):
        super().__init__(cfg, student, teacher)
        self.chunk_size = cfg.chunk_size or default_chunk_size(student.vocab_size)

    def forward(self, student, teacher, batch):
        return chunked_cross_entropy(student.last_hidden, student.output_layer, batch["labels"],
                                     chunk_size=self.chunk_size)


class HiddenStatesTerm(Term):
    """HS: MSE or cosine between projected student and teacher hidden states under a layer mapping."""

    def __init__(self, cfg: C.HiddenStates, student: Architecture, teacher: Architecture):
        super().__init__(cfg, student, teacher)
        self.pairs = user_layer_map(
            "objectives.hidden", cfg.mapping, student, teacher, explicit=cfg.layers,
            include_embeddings=cfg.include_embeddings,
        )
        self.student_request = CaptureRequest(hidden=tuple(sorted({s for s, _ in self.pairs})))
        self.teacher_request = CaptureRequest(hidden=tuple(sorted({t for _, ts in self.pairs for t in ts})))
        d_s, d_t = student.hidden_size, teacher.hidden_size
        # One W per student layer (or one shared W, TinyBERT's fit_dense); identity when widths match.
        # 'concat' maps the student to the concatenation of its teacher layers (1-to-N mappings).
        self.projections = nn.ModuleDict()
        if cfg.multi_target == "concat":
            for s, ts in self.pairs:
                self.projections[str(s)] = nn.Linear(d_s, d_t * len(ts))
        elif cfg.projection == "shared":
            self.shared = _linear(d_s, d_t, equal_widths=cfg.project_equal_widths)
        else:
            for s, _ in self.pairs:
                self.projections[str(s)] = _linear(d_s, d_t, equal_widths=cfg.project_equal_widths)

    def _project(self, s: int, h: Tensor) -> Tensor:
        if self.cfg.multi_target != "concat" and self.cfg.projection == "shared":
            return self.shared(h)
        return self.projections[str(s)](h)

    def forward(self, student, teacher, batch):
        mask = batch["attention_mask"].bool()
        distance = {"mse": hidden_mse, "cosine": hidden_cosine, "l1+cosine": hidden_l1_cosine}[self.cfg.loss]
        total = torch.zeros((), device=mask.device)
        for s, ts in self.pairs:
            h_s = self._project(s, student.captured.hidden[s])  # (B, T, d_T) or (B, T, n d_T)
            if self.cfg.multi_target == "concat":
                total = total + distance(h_s, torch.cat([teacher.captured.hidden[t] for t in ts], dim=-1), mask)
            else:
                for t in ts:
                    total = total + distance(h_s, teacher.captured.hidden[t], mask)
        return total


class MiniLMv2Term(Term):
    """MHA relations (MiniLMv2 eq. 1-3): KL of Q-Q, K-K, V-V relations, student last block."""

    def __init__(self, cfg: C.MiniLMv2, student: Architecture, teacher: Architecture):
        super().__init__(cfg, student, teacher)
        self.t_layer = resolve_teacher_layer(cfg.teacher_layer, teacher.num_layers)
        self.s_layer = student.num_layers
        require_relation_heads(cfg.relation_heads, student, teacher, setting="--set objectives.minilmv2.relation_heads")
        self.student_request = CaptureRequest(qkv=(self.s_layer,))
        self.teacher_request = CaptureRequest(qkv=(self.t_layer,))

    def forward(self, student, teacher, batch):
        mask = batch["attention_mask"].bool()
        pick = {"qq": "query", "kk": "key", "vv": "value"}
        heads = self.cfg.relation_heads
        # Long sequences: query rows chunk by chunk, so no (B, A_r, T, T) relation exists whole (same value).
        chunk = self.cfg.chunk_size or default_relation_chunk_size(mask.shape[0], heads, mask.shape[1])
        total = torch.zeros((), device=mask.device)
        for relation in self.cfg.relations:
            name = pick[relation]
            x_s = getattr(student.captured, name)[self.s_layer]  # (B, T, d_S)
            x_t = getattr(teacher.captured, name)[self.t_layer]  # (B, T, d_T)
            total = total + relation_kl(x_s, x_t, mask, relation_heads=heads, causal=self.causal, chunk_size=chunk)
        return total


class MiniLMTerm(Term):
    """MiniLM v1 (eq. 1-4): last-block attention distributions + value relation, equal head counts."""

    def __init__(self, cfg: C.MiniLM, student: Architecture, teacher: Architecture):
        super().__init__(cfg, student, teacher)
        require_equal_heads("minilm", student, teacher, " or use the minilmv2 recipe")
        self.heads = (student.num_heads, student.num_kv_heads, teacher.num_heads, teacher.num_kv_heads)
        self.student_request = CaptureRequest(qkv=(student.num_layers,))
        self.teacher_request = CaptureRequest(qkv=(teacher.num_layers,))
        self.s_layer, self.t_layer = student.num_layers, teacher.num_layers

    def forward(self, student, teacher, batch):
        mask = batch["attention_mask"].bool()
        s, t = student.captured, teacher.captured
        h_s, kv_s, h_t, kv_t = self.heads
        # Long sequences: query rows chunk by chunk, so no (B, H, T, T) map exists whole (same value).
        chunk = self.cfg.chunk_size or default_relation_chunk_size(mask.shape[0], h_s, mask.shape[1])
        total = qk_attention_kl(s.query[self.s_layer], s.key[self.s_layer], t.query[self.t_layer],
                                t.key[self.t_layer], mask, num_heads=h_s, student_kv_heads=kv_s,
                                teacher_kv_heads=kv_t, causal=self.causal, chunk_size=chunk)
        if self.cfg.value_relation:
            # One value relation per attention head (h_s == h_t): under grouped-query attention the value
            # heads the two models' query heads read need not pair one to one (value_relation_kl).
            total = total + value_relation_kl(
                s.value[self.s_layer], t.value[self.t_layer], mask, num_heads=h_s, student_kv_heads=kv_s,
                teacher_kv_heads=kv_t, causal=self.causal, chunk_size=chunk,
            )
        return total


class DirectQKVTerm(Term):
    """DirectMiniLM: MSE between linearly projected student Q/K/V and the teacher's Q/K/V."""

    def __init__(self, cfg: C.DirectQKV, student: Architecture, teacher: Architecture):
        super().__init__(cfg, student, teacher)
        self.t_layer = resolve_teacher_layer(cfg.teacher_layer, teacher.num_layers)
        self.s_layer = student.num_layers
        width = {
            "q": (student.num_heads * student.head_dim, teacher.num_heads * teacher.head_dim),
            "k": (student.num_kv_heads * student.head_dim, teacher.num_kv_heads * teacher.head_dim),
        }
        width["v"] = width["k"]
        # The method is defined with a learned linear map even at equal widths.
        self.projections = nn.ModuleDict({r: nn.Linear(*width[r]) for r in cfg.relations})
        self.student_request = CaptureRequest(qkv=(self.s_layer,))
        self.teacher_request = CaptureRequest(qkv=(self.t_layer,))

    def forward(self, student, teacher, batch):
        mask = batch["attention_mask"].bool()
        pick = {"q": "query", "k": "key", "v": "value"}
        total = torch.zeros((), device=mask.device)
        for r in self.cfg.relations:
            x_s = self.projections[r](getattr(student.captured, pick[r])[self.s_layer])
            total = total + hidden_mse(x_s, getattr(teacher.captured, pick[r])[self.t_layer], mask)
        return total


class AttentionScoreTerm(Term):
    """TinyBERT general distillation: MSE of pre-softmax attention scores, uniform mapping."""

    def __init__(self, cfg: C.AttentionScoreMSE, student: Architecture, teacher: Architecture):
        super().__init__(cfg, student, teacher)
        require_equal_heads("attention-mse", student, teacher)
        # TinyBERT: student block i (0-based) <- teacher block i k + k - 1, the 'uniform' mapping.
        self.pairs = [(s, ts[0]) for s, ts in user_layer_map("attention-mse", "uniform", student, teacher)]
        self.heads = (student.num_heads, student.num_kv_heads, teacher.num_heads, teacher.num_kv_heads)
        self.student_request = CaptureRequest(qkv=tuple(s for s, _ in self.pairs))
        self.teacher_request = CaptureRequest(qkv=tuple(t for _, t in self.pairs))

    def forward(self, student, teacher, batch):
        mask = batch["attention_mask"].bool()
        s, t = student.captured, teacher.captured
        h_s, kv_s, h_t, kv_t = self.heads
        total = torch.zeros((), device=mask.device)
        for ls, lt in self.pairs:
            scores_s = attention_logits(s.query[ls], s.key[ls], num_heads=h_s, num_kv_heads=kv_s)
            scores_t = attention_logits(t.query[lt], t.key[lt], num_heads=h_t, num_kv_heads=kv_t)
            total = total + attention_score_mse(scores_s, scores_t, mask, causal=self.causal)
        return total


class MomentMatchingTerm(Term):
    """AMMD (docs/methods.md, AMMD): a Q head f(s_t, a) over the teacher's last hidden states plays against the
    student. Each batch gives the off-policy moment (teacher or dataset continuations) or the on-policy one
    (student samples, policy gradient); the value logged is the moment gap, the gradients are the student's
    descent and the Q head's ascent (see ``objectives/moment_matching.py``).

    Both models' (B, T, V) log-probabilities are built here (the policy gradient needs the student's at the
    sampled tokens and the Q head's expectations need full rows): not chunked, unlike the logits term.
    """

    normalizer = "targets"

    def __init__(self, cfg: C.MomentMatching, student: Architecture, teacher: Architecture):
        super().__init__(cfg, student, teacher)
        if not (student.vocab_size and teacher.vocab_size):
            raise ConfigError("moment-matching needs language models with a vocabulary (vocab_size in their configs)")
        # One Q value per real token: padded embedding rows beyond the smaller table are not tokens.
        self.q_head = QValueHead(teacher.hidden_size, min(student.vocab_size, teacher.vocab_size), bound=cfg.bound)

    def forward(self, student, teacher, batch):
        mask = batch["labels"] != -100  # (B, T)
        log_q_s = torch.log_softmax(student.output_layer(student.last_hidden).float(), dim=-1)  # (B, T, V_S)
        with torch.no_grad():
            log_q_t = torch.log_softmax(teacher.output_layer(teacher.last_hidden).float(), dim=-1)  # (B, T, V_T)
        v = min(log_q_s.shape[-1], log_q_t.shape[-1])  # padded vocabularies: the real tokens only
        log_q_s, log_q_t = log_q_s[..., :v].log_softmax(-1), log_q_t[..., :v].log_softmax(-1)
        q = self.q_head(teacher.last_hidden)  # (B, T, V)
        y = batch["labels"].clamp_min(0)
        if sampled_by(batch) == "student":
            part = on_policy_term(q, log_q_s, log_q_t, y, mask, reward_to_go=self.cfg.reward_to_go,
                                  baseline=self.cfg.baseline)
        else:
            part = off_policy_term(q, log_q_s, y, mask)
        # Value: the moment gap; gradient: the student's descent plus the Q head's ascent.
        return part.student_loss + (part.q_loss - part.q_loss.detach())


def merge_requests(requests: list[CaptureRequest]) -> CaptureRequest:
    """One request covering several terms (each hook is installed once)."""
    return functools.reduce(CaptureRequest.union, requests, CaptureRequest())
