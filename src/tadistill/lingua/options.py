"""The settings of annotation, training and evaluation, and the checks of a compression rate.

Kept free of torch and transformers, so that the CLI builds its parser (defaults included) without loading them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tadistill.errors import ConfigError
from tadistill.lingua.labels import DEFAULT_WINDOW, GAP_TOP, VARIATION_TOP

ANNOTATORS = ("auto", "instruction", "information")
LABEL_MODES = ("all", "first")
HELDOUT_FRACTION = 0.1
DEFAULT_RATE = 0.33

# The paper's instruction (Pan et al. 2024, Fig. 1) states five constraints; this is our own wording of them.
INSTRUCTION = (
    "Shorten the text below by deleting words, so that you could still rebuild the original from what is left as "
    "faithfully as possible. Follow these rules: 1. Only delete words that carry little information. 2. Keep the "
    "remaining words in their original order. 3. Do not alter any remaining word. 4. Do not use abbreviations or "
    "emojis. 5. Do not add any word or symbol. Delete as many words as you can while keeping as much of the "
    "information as possible. Reply with the shortened text only.\n\nText: {text}\n\nShortened text:"
)


def check_rate(rate) -> float:
    """The share of words kept, in (0, 1]; ConfigError (one line) otherwise."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or math.isnan(rate) or not 0.0 < rate <= 1.0:
        raise ConfigError(f"rate must be in (0, 1] (the share of words kept), got {rate!r}: e.g. --rate 0.33")
    return float(rate)


def check_target_tokens(target) -> int:
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ConfigError(f"target tokens must be a positive integer, got {target!r}: e.g. --target-tokens 200")
    return target


def _positive_ints(obj, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}: change it")


def _fractions(obj, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}: change it")


@dataclass(frozen=True)
class AnnotateOptions:
    """What ``lingua.annotate.annotate`` does; the CLI flags carry the same names.

    Attributes:
        annotator: "instruction", "information", or "auto" (instruction when the teacher's tokenizer has a chat
            template, information otherwise).
        max_chunks: chunks to annotate (the corpus is read in order until there are this many).
        chunk_tokens: the most teacher tokens in a chunk (paper: 512; cut to what the teacher's context allows).
        keep_fraction: information annotator: the share of each chunk's words kept (0.5: balanced classes; the
            compressor ranks words, so its rate is chosen at compression time, not here).
        follow_tokens: information annotator: the tokens of F_i, after the word (``annotate`` docstring).
        own_information: information annotator: add the word's own surprisal to its effect on F_i.
        window: original words searched after the last match (instruction annotator).
        variation_top / gap_top: the shares of samples dropped for the highest variation rate / alignment gap.
        batch_size: sequences per teacher forward or generate call.
        instruction: the instruction with a ``{text}`` field (default: ``INSTRUCTION``).
        heldout_fraction: the tail of the corpus left for ``lingua evaluate``, never annotated.
    """

    annotator: str = "auto"
    max_chunks: int = 300
    chunk_tokens: int = 512
    keep_fraction: float = 0.5
    follow_tokens: int = 16
    own_information: bool = True
    window: int = DEFAULT_WINDOW
    variation_top: float = VARIATION_TOP
    gap_top: float = GAP_TOP
    batch_size: int = 16
    instruction: str = INSTRUCTION
    heldout_fraction: float = HELDOUT_FRACTION

    def __post_init__(self) -> None:
        if self.annotator not in ANNOTATORS:
            raise ConfigError(f"annotator {self.annotator!r} is not one of {', '.join(ANNOTATORS)}: choose one")
        _positive_ints(self, ("max_chunks", "chunk_tokens", "follow_tokens", "window", "batch_size"))
        if not 0.0 < self.keep_fraction < 1.0:
            raise ConfigError(f"keep_fraction must be in (0, 1), got {self.keep_fraction}: change it")
        _fractions(self, ("variation_top", "gap_top", "heldout_fraction"))
        if "{text}" not in self.instruction:
            raise ConfigError("the instruction has no {text} field: write {text} where the chunk goes")


@dataclass(frozen=True)
class TrainOptions:
    """What ``lingua.train.train_compressor`` does.

    Attributes:
        steps: optimizer steps; batch_size: chunks per step.
        lr: AdamW peak learning rate (linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0).
        weight_decay: AdamW decay of the matrices.
        label_subtokens: "all" (every sub-token carries its word's label) or "first" (``train`` docstring).
        heldout_fraction: the tail of the samples scored before and after training, never trained on.
        seed: the head's initialisation and the order of the samples.
    """

    steps: int = 200  # with batch_size 8: the measured built-in run (README, Prompt compression)
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    label_subtokens: str = "all"
    heldout_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_ints(self, ("steps", "batch_size"))
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}: change it")
        if self.label_subtokens not in LABEL_MODES:
            raise ConfigError(f"label_subtokens must be one of {', '.join(LABEL_MODES)}, got {self.label_subtokens!r}")
        _fractions(self, ("heldout_fraction", "warmup_ratio"))


@dataclass(frozen=True)
class EvaluateOptions:
    """What ``lingua.evaluate.evaluate_compression`` measures.

    Attributes:
        rates: shares of prompt words kept. examples: held-out examples.
        prompt_tokens / continuation_tokens: LM tokens of each example's prompt (at most) and continuation.
        batch_size: LM sequences per forward. heldout_fraction: must match the annotation's.
        seed: the random baseline's generator.
    """

    rates: tuple[float, ...] = (0.25, 0.5, 0.75)
    examples: int = 100
    prompt_tokens: int = 80
    continuation_tokens: int = 32
    batch_size: int = 16
    heldout_fraction: float = HELDOUT_FRACTION
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rates:
            raise ConfigError("give at least one rate, e.g. --rates 0.25 0.5")
        for rate in self.rates:
            check_rate(rate)
        _positive_ints(self, ("examples", "prompt_tokens", "continuation_tokens", "batch_size"))
        _fractions(self, ("heldout_fraction",))
