"""What determines the built-in GPT-2 teacher (``builtin-gpt2``), and where its trained copy is cached.

This module only describes and locates the teacher; it trains nothing. It sits in the models layer so
that ``loading.resolve_model_path("builtin-gpt2")`` can find the cached folder without reaching up to
the training stack. Training on first use is done above training, by the entry points
(``tadistill.teachers.causal.ensure_builtin_teacher``): the training of the teacher is an ordinary run
of the loop, which itself loads models through ``loading``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tadistill.errors import ConfigError

TEACHER_FILE = "teacher.json"
# Bumped whenever training changes in a way that changes the weights, so cached teachers are retrained.
# 2: trained by the ordinary distill loop (pretrain recipe, lm objective) instead of a loop of its own.
TEACHER_FORMAT = 2
# data.max_length's floor (DataConfig): a packed sequence shorter than this teaches nothing.
MIN_CONTEXT = 8


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that determines the teacher's weights (on a given machine and corpus).

    Defaults: 4 layers x 256 wide, 4 heads, a 4096-token BPE vocabulary, 128-token context: 4.2M
    parameters, the embeddings tied with the output layer. A 4096 vocabulary rather than 8192 halves the
    output layer, the largest matmul at this width: a step is ~30% faster (1.2 s vs 1.7 s idle), here
    and in every distillation that computes the teacher's logits. 360 steps of 32 x 128 tokens see 1.47M
    tokens, 4.1 passes over the 0.36M training tokens of the built-in corpus; lr 2e-3 beat 1e-3 there
    (held-out perplexity 126 vs 148, measured with the former trainer of its own).

    Format 2, trained by the distill loop (measured on 2 CPU cores): held-out perplexity 143.1 from
    4,414 at the random init (``causal_perplexity``, each of the 189 held-out texts its own sequence,
    6,120 predicted tokens); 133.3 by the former trainer's packed measure, where that trainer reached
    126.3. Not shown to be a real gap: at a smaller scale (2x64, 150 steps, 4 seeds) the two trainers'
    held-out losses differed by -0.03, +0.25, +0.07 and -0.05 nats, seed by seed. 72 minutes here, under a load
    average of 9 to 16 from other jobs (8 to 18 s a step); not re-measured idle, where the former trainer
    took ~1.3 s a step (~8 minutes): a step does the same work (the LM loss is one chunk of 4,064 rows),
    and the paired small runs took the same time with both trainers.

    Attributes:
        layers: transformer blocks (GPT2Config.n_layer).
        hidden: model width (n_embd); the MLP is 4x wider, as in GPT-2.
        heads: attention heads (n_head); must divide ``hidden``.
        context: tokens per training sequence and the model's positions (n_positions); at least 8.
        vocab_size: BPE vocabulary requested (bytes and <|endoftext|> included, >= 258).
        steps: optimizer steps.
        batch_size: sequences per step.
        lr: peak learning rate of AdamW.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio`` at the last step.
        warmup: steps of linear warm-up to ``lr``.
        weight_decay: AdamW decay of the matrices (biases and LayerNorm gains are not decayed).
        dropout: dropout of embeddings, attention and residuals; 0 because the model sees each token
            only a few times (as nanoGPT pretraining).
        grad_clip: global gradient-norm clip (0 disables it).
        heldout_fraction: share of texts kept out of training for the held-out loss.
        seed: seeds the initialisation, the data order and dropout.
    """

    layers: int = 4
    hidden: int = 256
    heads: int = 4
    context: int = 128
    vocab_size: int = 4096
    steps: int = 360
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    dropout: float = 0.0
    grad_clip: float = 1.0
    heldout_fraction: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "context", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TeacherSpec.{name}={getattr(self, name)} must be at least 1")
        if self.hidden % self.heads:
            raise ConfigError(f"TeacherSpec.hidden={self.hidden} must be a multiple of heads={self.heads}")
        if self.context < MIN_CONTEXT:
            raise ConfigError(f"TeacherSpec.context={self.context} must be at least {MIN_CONTEXT} tokens")
        if self.vocab_size < 258:
            raise ConfigError(f"TeacherSpec.vocab_size={self.vocab_size} must be at least 258 (256 bytes + merges)")
        if not 0 <= self.warmup <= self.steps:
            raise ConfigError(f"TeacherSpec.warmup={self.warmup} must be between 0 and steps={self.steps}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1):
            raise ConfigError("TeacherSpec needs lr > 0 and 0 <= min_lr_ratio <= 1")
        if self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.dropout < 1:
            raise ConfigError("TeacherSpec needs weight_decay >= 0, grad_clip >= 0 and 0 <= dropout < 1")
        if not 0 < self.heldout_fraction < 0.5:
            raise ConfigError(f"TeacherSpec.heldout_fraction={self.heldout_fraction} must be in (0, 0.5)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TeacherSpec:
        """Rebuild a spec from ``to_dict()`` output (for example ``teacher.json["spec"]``)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TeacherSpec fields {unknown}: use only {sorted(known)}")
        return cls(**data)

    def fingerprint(self) -> str:
        """A short stable hash of the spec, the trainer format and the built-in corpus version."""
        from tadistill.data.builtin import BUILTIN_CORPUS_VERSION

        key = json.dumps({"spec": self.to_dict(), "format": TEACHER_FORMAT, "corpus": BUILTIN_CORPUS_VERSION},
                         sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:12]


def is_teacher(folder: Path) -> bool:
    """Whether ``folder`` holds a complete teacher (``teacher.json`` is written last, then published)."""
    return (Path(folder) / TEACHER_FILE).is_file()


def default_teacher_dir(spec: TeacherSpec = TeacherSpec()) -> Path:
    """The cache folder of the built-in-corpus teacher of ``spec`` (under ``$TADISTILL_CACHE``)."""
    # Imported here and read at call time, so that a changed cache root is honoured.
    from tadistill.data import prepare

    return Path(prepare.DEFAULT_CACHE) / "teachers" / f"gpt2-builtin-{spec.fingerprint()}"
