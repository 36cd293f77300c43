"""DistiLLM's adaptive off-policy use of student-generated outputs (Ko et al. 2024, ICML, section 3.2).

Two pieces the training loop drives; neither touches a model:

- ``ReplayBuffer``: a fixed-capacity FIFO of student-generated sequences (token ids plus prompt length).
- ``AdaptiveOffPolicy``: the adaptive SGO scheduler. It holds phi, the probability of training on
  student-generated outputs (SGO), raises phi when the validation loss rises, and draws each batch's
  source: the dataset, fresh student generations (pushed to the buffer), or a replay from the buffer.

Where the rules come from (official code, github.com/jongwooko/distillm, ``finetune.py`` and
``arguments.py``; the paper's Algorithm 1 describes the same procedure):

- phi starts at ``--init-threshold`` (0.0 in the GPT-2 / OPT scripts, 0.2 in the OpenLLaMA2 script).
- After each validation, if ``loss >= reference + loss_eps`` (``--loss-eps`` 0.1), phi += 0.1, capped at
  1.0, and the reference becomes that loss. The reference is the loss measured BEFORE training and is
  only replaced on a rise: a falling loss leaves both phi and the reference unchanged.
- Each batch draws u ~ U(0, 1). With g = phi * r(t) the share of fresh generation, r(t) = 1 - t / T by
  default (``--replay-ratio decreasing``; 0.5 for ``constant``, t / T for ``increasing``):
  u < g, or u < phi while the buffer is not yet full -> "generate"; else u < phi -> "replay";
  else "dataset". So replay only starts once the buffer is full, and reuse grows over training.
- The buffer is a FIFO of ``--capacity`` 1000 sequences, sampled uniformly without replacement.

Reconstructed here, not taken from the official code: the draws use an explicit ``torch.Generator``
(the official code uses numpy's and Python's global RNGs), progress is t / T with t the number of
optimizer steps completed (the official code counts from 1), and both classes serialize to tensors and
plain numbers so that a resumed run draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import Tensor

from tadistill.errors import ConfigError

DECISIONS = ("dataset", "generate", "replay")
SCHEDULES = ("decreasing", "constant", "increasing")


class ReplayBuffer:
    """Fixed-capacity FIFO of student-generated sequences, stored on the CPU as 1-D int64 tensors.

    Each entry is a full sequence (prompt followed by the generated continuation) and its prompt
    length, so the loop can rebuild the loss mask (continuation tokens only). When full, pushing a new
    entry evicts the oldest one (DistiLLM keeps a ``deque(maxlen=capacity)``).
    """

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ConfigError(f"replay buffer capacity must be a positive integer, got {capacity!r}: set e.g. 1000")
        self.capacity = capacity
        self._entries: deque[tuple[Tensor, int]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, sequences: list[Tensor], prompt_lengths: list[int]) -> None:
        """Append sequences (oldest first in, first out), evicting the oldest entries beyond capacity.

        Args:
            sequences: 1-D integer tensors of token ids (any length, any device); copied to the CPU as
                int64, so later in-place changes by the caller do not reach the buffer.
            prompt_lengths: one int per sequence, 0 <= prompt length <= len(sequence).
        """
        if len(sequences) != len(prompt_lengths):
            raise ValueError(f"push: {len(sequences)} sequences but {len(prompt_lengths)} prompt lengths")
        checked = []
        for seq, plen in zip(sequences, prompt_lengths):
            if not isinstance(seq, Tensor) or seq.dim() != 1 or seq.is_floating_point() or seq.is_complex():
                raise ValueError("push: each sequence must be a 1-D integer tensor of token ids")
            plen = int(plen)
            if not 0 <= plen <= seq.numel():
                raise ValueError(f"push: prompt length {plen} outside [0, {seq.numel()}]")
            checked.append((seq.detach().to("cpu", torch.int64).clone(), plen))
        self._entries.extend(checked)  # validated first: a bad batch leaves the buffer unchanged

    def sample(self, n: int, generator: torch.Generator) -> tuple[list[Tensor], list[int]]:
        """Draw ``n`` distinct entries uniformly at random (without replacement, like ``random.sample``).

        Returns the sequences (CPU int64, 1-D; the buffer's own tensors, do not modify them in place)
        and their prompt lengths, in the order drawn. Exactly one ``randperm`` is drawn from
        ``generator``, so equal generator states give equal draws.
        """
        if not 0 < n <= len(self._entries):
            raise ValueError(f"sample: asked for {n} sequences from a buffer holding {len(self._entries)}")
        order = torch.randperm(len(self._entries), generator=generator, device=generator.device)[:n].tolist()
        picked = [self._entries[i] for i in order]
        return [seq for seq, _ in picked], [plen for _, plen in picked]

    def state_dict(self) -> dict:
        """Tensors and ints only (loadable with ``torch.load(weights_only=True)``), oldest entry first.

        ``tokens``: (sum of lengths,) int64, all sequences concatenated; ``lengths``, ``prompt_lengths``:
        (N,) int64; ``capacity``: int.
        """
        seqs = [seq for seq, _ in self._entries]
        return {
            "capacity": self.capacity,
            "tokens": torch.cat(seqs) if seqs else torch.zeros(0, dtype=torch.int64),
            "lengths": torch.tensor([s.numel() for s in seqs], dtype=torch.int64),
            "prompt_lengths": torch.tensor([p for _, p in self._entries], dtype=torch.int64),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the entries saved by ``state_dict``, in the same order (so FIFO eviction continues)."""
        if int(state["capacity"]) != self.capacity:
            raise ConfigError(
                f"replay capacity is {self.capacity} but the checkpoint was saved with {int(state['capacity'])}: "
                "resume with the same capacity or start a new run"
            )
        lengths = state["lengths"].tolist()
        tokens = state["tokens"].to("cpu", torch.int64)
        if sum(lengths) != tokens.numel() or len(lengths) != state["prompt_lengths"].numel():
            raise ValueError("replay buffer state is inconsistent (lengths do not match tokens)")
        self._entries.clear()
        self._entries.extend(zip((t.clone() for t in tokens.split(lengths)), state["prompt_lengths"].tolist()))


def _probability(value: float, name: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"adaptive off-policy {name} must be a probability in [0, 1], got {value!r}: set e.g. 0.1")
    return float(value)


class AdaptiveOffPolicy:
    """DistiLLM's adaptive SGO scheduler: phi rises when the validation loss rises (Ko et al. 2024, 3.2).

    Args:
        total_steps: T, the number of optimizer steps of the run (progress t / T sets the share of fresh
            generation within phi).
        capacity: the replay buffer's capacity; replay is drawn only once the buffer holds this many.
        initial: phi at the start (official default 0.0; 0.2 in its OpenLLaMA2 recipe).
        loss_eps: the rise of the validation loss, over the reference, that triggers an increase (0.1).
        increment: how much phi grows per trigger (0.1 in the official code).
        maximum: cap on phi (1.0).
        schedule: the share r(t) of fresh generation within phi: "decreasing" (1 - t/T, the official
            default), "constant" (1/2) or "increasing" (t/T).

    ``counts`` records how many batches each decision produced (log their fractions).
    """

    def __init__(
        self,
        *,
        total_steps: int,
        capacity: int = 1000,
        initial: float = 0.0,
        loss_eps: float = 0.1,
        increment: float = 0.1,
        maximum: float = 1.0,
        schedule: str = "decreasing",
    ) -> None:
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ConfigError(f"total_steps must be a positive integer, got {total_steps!r}: set train.steps")
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ConfigError(f"replay capacity must be a positive integer, got {capacity!r}: set e.g. 1000")
        if not (isinstance(loss_eps, (int, float)) and math.isfinite(loss_eps) and loss_eps >= 0):
            raise ConfigError(f"loss_eps must be a number >= 0, got {loss_eps!r}: set e.g. 0.1")
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown replay schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
        self.total_steps = total_steps
        self.capacity = capacity
        self.loss_eps = float(loss_eps)
        self.increment = _probability(increment, "increment")
        self.maximum = _probability(maximum, "maximum")
        self.schedule = schedule
        self.probability = min(_probability(initial, "initial"), self.maximum)
        self.reference_loss: float | None = None
        self.counts = dict.fromkeys(DECISIONS, 0)

    def update(self, validation_loss: float) -> float:
        """Feed one validation loss; return phi after the update.

        The first call only records the reference (the official code evaluates once before training).
        Later: if ``loss >= reference + loss_eps``, phi = min(phi + increment, maximum) and the reference
        becomes this loss; otherwise nothing changes (the reference is NOT lowered when the loss falls,
        as in the official code). A NaN or infinite loss changes nothing.
        """
        loss = float(validation_loss)
        if not math.isfinite(loss):
            return self.probability
        if self.reference_loss is None:
            self.reference_loss = loss
        elif loss >= self.reference_loss + self.loss_eps:
            self.probability = min(self.probability + self.increment, self.maximum)
            self.reference_loss = loss
        return self.probability

    def generate_share(self, step: int) -> float:
        """g = phi * r(t / T): the probability of fresh generation once the buffer is full."""
        progress = min(max(step / self.total_steps, 0.0), 1.0)
        ratio = {"decreasing": 1.0 - progress, "constant": 0.5, "increasing": progress}[self.schedule]
        return self.probability * ratio

    def decide(self, generator: torch.Generator, buffer_size: int, *, step: int) -> str:
        """Draw this batch's source: "dataset", "generate" (then push the outputs) or "replay".

        Args:
            generator: one uniform number is drawn from it on every call, whatever phi is, so the
                random stream does not depend on the schedule's state.
            buffer_size: ``len(buffer)`` now.
            step: optimizer steps completed so far (t in t / T).
        """
        u = float(torch.rand((), generator=generator, device=generator.device))
        if u < self.generate_share(step) or (u < self.probability and buffer_size < self.capacity):
            choice = "generate"
        elif u < self.probability:
            choice = "replay"
        else:
            choice = "dataset"
        self.counts[choice] += 1
        return choice

    def state_dict(self) -> dict:
        """Plain floats, ints and None (loadable with ``torch.load(weights_only=True)``)."""
        return {"probability": self.probability, "reference_loss": self.reference_loss, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        """Restore phi, the reference loss and the counts; the settings come from the constructor."""
        self.probability = float(state["probability"])
        ref = state["reference_loss"]
        self.reference_loss = None if ref is None else float(ref)
        self.counts = {k: int(state["counts"].get(k, 0)) for k in DECISIONS}
