"""The method interface: what a method adds to the training loop, declared in the method's own file.

The loop (``training/loop.py``) knows steps, not methods. A method that needs more than loss terms
(GKD's sampled continuations, DistiLLM's adaptive schedule and replay buffer, AMMD's alternating
updates, the pruning masks and Lagrange multipliers of DPHuBERT ...) subclasses ``MethodHooks`` in a file
of ``tadistill/methods/`` and gets one row in ``registry.METHODS``; the loop calls the hooks at fixed
points. Every hook has a do-nothing default, so a method overrides only what it uses.

When the loop calls them, for each lane and each of its methods (in registry order):

==========================  ===================================================================
``modules()``               once, when the lane is built: learned modules trained with the student
                            (registered inside the lane's ``Distiller``, so DDP / FSDP, the
                            optimizer and the checkpoints cover them)
``terms()``                 once, when the lane is built: extra loss terms (e.g. a sparsity
                            Lagrangian), added to the objectives' terms
``param_groups(params)``    once, when the optimizer is built: optimizer groups for the method's
                            own parameters (other lr, no decay, ``maximize`` for multipliers)
``continuation(request)``   per micro-batch, before any forward: where the batch's continuations
                            come from; None keeps the dataset's (at most one method per lane may
                            return continuations)
``held_parameters(step)``   per optimizer step, after backward: parameters that must not move at
                            this step (alternating updates); their gradients are dropped
``after_evaluation(row)``   after each held-out evaluation: values to add to the evaluation row
``log_values()``            at each logged step: values to add to the training row
``state_dict()`` /          at each checkpoint / on resume: the method's own state (plain numbers,
``load_state_dict(state)``  strings, lists, dicts and tensors; never pickled)
==========================  ===================================================================

Design rule (house style 14): a hook exists here only when two or more methods need it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Where a micro-batch's continuations came from; carried in batch["sampled_by"] (dataset batches carry none)
# for the terms that treat on-policy batches differently (AMMD's on-policy moment).
SAMPLED_BY = {"student": 1, "teacher": 2, "replay": 3}


@dataclass
class ContinuationRequest:
    """What a method sees when it chooses a micro-batch's continuations.

    ``sample(who, temperature=, top_p=, max_new_tokens=)`` samples continuations of the prompts from the
    "student" or the "teacher" (no gradient, seeded by the batch number, so a resumed run and a study lane
    draw exactly what a solo run draws).
    ``generator(purpose)`` returns a fresh CPU generator seeded by (train.seed, purpose, batch number).
    """

    number: int  # global micro-batch number (seeds)
    step: int  # the optimizer step being computed (1-based)
    sequences: list[Tensor]  # the dataset's sequences of this micro-batch (prompt + continuation)
    prompt_lengths: list[int]
    sample: Callable[..., list[Tensor]]
    generator: Callable[[str], torch.Generator]


@dataclass
class Continuation:
    """A method's answer: sequences that replace the dataset's in this micro-batch, and who made them."""

    source: str  # a key of SAMPLED_BY
    sequences: list[Tensor]
    prompt_lengths: list[int]


class MethodHooks:
    """Base class of a method's training behaviour; see the module docstring for when each hook runs."""

    name: str = "method"
    uses_teacher: bool = False  # the method runs the teacher itself (e.g. teacher-sampled continuations)

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def terms(self) -> list[nn.Module]:
        return []

    def param_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]] | None:
        """Optimizer groups for ``params`` (this method's own parameters); None: the lane's default groups."""
        return None

    def continuation(self, request: ContinuationRequest) -> Continuation | None:
        return None

    def held_parameters(self, step: int) -> list[nn.Parameter]:
        return []

    def after_evaluation(self, row: dict[str, float]) -> dict[str, float]:
        return {}

    def log_values(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def continuation_count(counts: dict[str, int], sources: tuple[str, ...]) -> dict[str, float]:
    """``policy/<source>``: the fraction of micro-batches drawn from each source so far (logged by samplers)."""
    total = max(sum(counts.values()), 1)
    return {f"policy/{name}": counts.get(name, 0) / total for name in sources}


def sampled_by(batch: dict[str, Tensor]) -> str:
    """The source of a batch's continuations: 'dataset' or a key of SAMPLED_BY."""
    code = batch.get("sampled_by")
    if code is None:
        return "dataset"
    return {v: k for k, v in SAMPLED_BY.items()}[int(code)]
