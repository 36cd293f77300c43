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
``step_begins(step)``       per optimizer step, before its first forward: schedules that move with
                            the step (DPHuBERT's sparsity-target ramp, WID's mask growth)
``continuation(request)``   per micro-batch, before any forward: where the batch's continuations
                            come from; None keeps the dataset's (at most one method per lane may
                            return continuations)
``passes(step, number)``    per micro-batch: the settings the lane runs it under, one forward and
                            backward each, gradients averaged (AutoDistil's sandwich rule: largest,
                            smallest and random sub-networks of a weight-shared supernet); None: one
                            plain pass (at most one method per lane may return passes)
``held_parameters(step)``   per optimizer step, after backward: parameters that must not move at
                            this step (alternating updates); their gradients are dropped
``before_update(step)``     per optimizer step, after the last backward, before clipping and the
                            optimizer: edit gradients in place (WID: masked compactor entries decay)
``after_evaluation(row)``   after each held-out evaluation: values to add to the evaluation row
``log_values()``            at each logged step: values to add to the training row
``state_dict()`` /          at each checkpoint / on resume: the method's own state (plain numbers,
``load_state_dict(state)``  strings, lists, dicts and tensors; never pickled)
``final_student(student)``  once, when the lane finishes, before the student is saved: the model to
                            save instead (WID folds its compactors into the weights; DPHuBERT and
                            AutoDistil keep the units their masks or search chose); None keeps it.
                            Methods apply in registry order, each to the previous one's result
==========================  ===================================================================

Random draws inside hooks (sub-networks, gates) use ``seed_for(train.seed, purpose, number)`` or run in
the lane's random stream (forwards do), so a resumed run and a study lane draw what a solo run draws.

Design rule (house style 14): a hook exists here only when two or more methods need it (``passes``: AutoDistil
and every weight-sharing supernet of its kind, DynaBERT, once-for-all; ``final_student``: WID, DPHuBERT,
AutoDistil; ``before_update``: WID, AMMD-style alternation; ``step_begins``: DPHuBERT, WID).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Where a micro-batch's continuations came from; carried in batch["sampled_by"] (dataset batches carry none)
# for the terms that treat on-policy batches differently (AMMD's on-policy moment).
SAMPLED_BY = {"student": 1, "teacher": 2, "replay": 3}


def seed_for(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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

    def step_begins(self, step: int) -> None:
        return None

    def continuation(self, request: ContinuationRequest) -> Continuation | None:
        return None

    def passes(self, step: int, number: int) -> list[Callable[[], AbstractContextManager]] | None:
        """Context factories, one per forward + backward of micro-batch ``number``; None: one plain pass."""
        return None

    def held_parameters(self, step: int) -> list[nn.Parameter]:
        return []

    def before_update(self, step: int) -> None:
        return None

    def after_evaluation(self, row: dict[str, float]) -> dict[str, float]:
        return {}

    def log_values(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def final_student(self, student: nn.Module) -> nn.Module | None:
        return None


def overrides(method: MethodHooks, hook: str) -> bool:
    """Whether ``method`` defines ``hook`` itself (the lane refuses two methods that both choose a thing)."""
    return getattr(type(method), hook) is not getattr(MethodHooks, hook)


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
