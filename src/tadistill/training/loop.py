"""The training loop, on Hugging Face Accelerate (so DDP / FSDP / DeepSpeed run the same code).

One optimizer step:
1. build the step's micro-batches (their order and masks are pure functions of the step number and
   the seed, so a resumed run sees exactly the same data);
2. count the valid tokens and masked positions of the whole step, summed over processes;
3. per micro-batch: teacher forward under inference_mode, student forward, each term's summed loss
   divided by its global count (style rule "sum, then normalize once"), backward (gradient sync only
   on the last micro-batch);
4. stop on a NaN / inf loss before the weights are touched; clip, step, schedule;
5. log, evaluate on held-out text, checkpoint atomically.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from tadistill.capture.architectures import Architecture
from tadistill.capture.hooks import Captured, CaptureRequest, capture
from tadistill.config import DistillConfig
from tadistill.data.batches import BatchOrder, collate
from tadistill.data.masking import mask_tokens
from tadistill.data.tokenized import SequenceSet
from tadistill.errors import TrainingError
from tadistill.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tadistill.training.rundir import RunDir, config_to_yaml
from tadistill.training.terms import ModelOutputs, Term, merge_requests


@dataclass
class TokenizerInfo:
    pad_id: int
    mask_id: int | None
    vocab_size: int
    special_ids: list[int]


@dataclass
class LoopResult:
    start_step: int
    final_step: int
    evaluations: list[dict] = field(default_factory=list)  # eval rows logged by this call
    stopped_early: bool = False


class Distiller(nn.Module):
    """Student + loss terms in one module, so that one DDP / FSDP wrapper covers every trained weight."""

    def __init__(self, student: nn.Module, terms: list[Term]):
        super().__init__()
        self.student = student
        self.terms = nn.ModuleList(terms)
        self.needs_logits = any(t.needs_logits for t in terms)

    def forward(self, inputs: dict[str, Tensor], batch: dict[str, Tensor], teacher: ModelOutputs, captured: Captured):
        out = self.student(**inputs)
        student = ModelOutputs(captured, out.logits if self.needs_logits else None)
        return torch.stack([term(student, teacher, batch).float() for term in self.terms])  # (n_terms,) sums


def _seed_for(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_batch(
    sequences: list[Tensor], tok: TokenizerInfo, *, mask: bool, probability: float, seed: int
) -> dict[str, Tensor]:
    """Collate and (when a term needs labels) apply BERT's 80/10/10 masking with a seeded generator."""
    batch = collate(sequences, pad_id=tok.pad_id, special_ids=tok.special_ids)
    if mask:
        generator = torch.Generator().manual_seed(seed)
        batch["input_ids"], batch["labels"] = mask_tokens(
            batch["input_ids"],
            batch["special_tokens_mask"],
            mask_token_id=tok.mask_id,
            vocab_size=tok.vocab_size,
            probability=probability,
            generator=generator,
        )
    else:
        batch["labels"] = torch.full_like(batch["input_ids"], -100)
    return batch


def _counts(batches: list[dict[str, Tensor]], device) -> Tensor:
    """(2,) valid tokens and masked positions of the given micro-batches."""
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    masked = sum(int((b["labels"] != -100).sum()) for b in batches)
    return torch.tensor([tokens, masked], dtype=torch.float64, device=device)


class Trainer:
    """Holds what the loop needs; ``run()`` is the loop."""

    def __init__(
        self,
        config: DistillConfig,
        run: RunDir,
        accelerator: Accelerator,
        *,
        teacher: nn.Module,
        teacher_arch: Architecture,
        student: nn.Module,
        student_arch: Architecture,
        terms: list[Term],
        train: SequenceSet,
        heldout: SequenceSet,
        tokenizer: TokenizerInfo,
        progress: bool = True,
    ):
        self.cfg, self.run_dir, self.acc = config, run, accelerator
        self.teacher, self.teacher_arch = teacher.eval().requires_grad_(False), teacher_arch
        self.student_arch = student_arch
        self.terms, self.tok = terms, tokenizer
        self.train_set, self.heldout = train, heldout
        self.progress = progress
        self.mask_inputs = any(
            t.kind == "mlm" or (t.kind == "output-kl" and t.cfg.positions == "masked") for t in terms
        )
        self.normalizers = [0 if t.normalizer == "tokens" else 1 for t in terms]
        self.weights = torch.tensor([t.weight for t in terms], dtype=torch.float64)
        self.s_request: CaptureRequest = merge_requests([t.student_request for t in terms])
        self.t_request: CaptureRequest = merge_requests([t.teacher_request for t in terms])
        self.student = student

        tc = config.train
        world = accelerator.num_processes
        self.order = BatchOrder(len(train), tc.batch_size, seed=tc.seed)
        self.distiller = Distiller(student, terms)
        decay = [p for p in self.distiller.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.distiller.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr,
            betas=tc.adam_betas,
            eps=tc.adam_eps,
        )
        warmup = max(tc.warmup_steps, int(tc.warmup_ratio * tc.steps))
        names = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
        scheduler = get_scheduler(names[tc.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=tc.steps)
        # The teacher is not prepared (no optimizer, no gradient sync): only moved and kept in eval mode.
        self.teacher.to(accelerator.device)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(self.distiller, optimizer, scheduler)
        self.world = world

    # ------------------------------------------------------------------------------------- batches

    def _micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        """Micro-batches of optimizer step ``step`` (1-based) for this process."""
        tc, acc = self.cfg.train, self.acc
        out = []
        for micro in range(tc.grad_accum):
            number = ((step - 1) * tc.grad_accum + micro) * self.world + acc.process_index
            sequences = [self.train_set[i] for i in self.order.indices(number)]
            batch = make_batch(
                sequences,
                self.tok,
                mask=self.mask_inputs,
                probability=self.cfg.data.mlm_probability,
                seed=_seed_for(tc.seed, "train", number),
            )
            out.append({k: v.to(acc.device, non_blocking=True) for k, v in batch.items()})
        return out

    def _teacher_outputs(self, inputs: dict[str, Tensor], captured: Captured) -> ModelOutputs:
        with torch.inference_mode(), self.acc.autocast():
            out = self.teacher(**inputs)
        # Tensors made under inference_mode cannot be saved for backward: clone the few we keep.
        logits = out.logits.clone() if self.distiller.needs_logits else None
        return ModelOutputs(captured.clone(), logits)

    @staticmethod
    def _inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    # ---------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, s_cap: Captured, t_cap: Captured) -> dict[str, float]:
        """Held-out distillation loss per term (fixed batches and masks: comparable across steps)."""
        tc = self.cfg.train
        self.model.eval()
        sums = torch.zeros(len(self.terms), dtype=torch.float64, device=self.acc.device)
        counts = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
        n = min(len(self.heldout), tc.eval_batches * tc.batch_size)
        for start in range(0, n, tc.batch_size):
            seqs = [self.heldout[i] for i in range(start, min(start + tc.batch_size, n))]
            batch = make_batch(
                seqs, self.tok, mask=self.mask_inputs, probability=self.cfg.data.mlm_probability,
                seed=_seed_for(tc.seed, "eval", start),
            )
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            teacher = self._teacher_outputs(self._inputs(batch), t_cap)
            with self.acc.autocast():
                sums += self.model(self._inputs(batch), batch, teacher, s_cap).double()
            counts += _counts([batch], self.acc.device)
        self.model.train()
        values = sums / counts[self.normalizers].clamp_min(1)
        row = {f"eval/{t.kind}": float(v) for t, v in zip(self.terms, values)}
        row["eval/loss"] = float((values * self.weights.to(values.device)).sum())
        return row

    # ---------------------------------------------------------------------------------------- loop

    def run(self) -> LoopResult:
        tc, acc, run = self.cfg.train, self.acc, self.run_dir
        start_step = 0
        ckpt = latest_checkpoint(run.checkpoints)
        if ckpt is not None:
            start_step = load_checkpoint(acc, ckpt)
        if acc.is_main_process:
            # Rows logged after the checkpoint (or by an attempt killed before any) are replayed exactly.
            run.truncate_metrics(start_step if ckpt is not None else -1)
        stop_at = min(tc.steps, tc.stop_at or tc.steps)
        result = LoopResult(start_step=start_step, final_step=start_step)
        config_yaml = config_to_yaml(self.cfg)
        last_good = ckpt

        with ExitStack() as stack:
            s_cap = stack.enter_context(capture(self.student, self.student_arch, self.s_request))
            t_cap = stack.enter_context(capture(self.teacher, self.teacher_arch, self.t_request))
            if start_step == 0:
                result.evaluations.append(self._log_eval(0, s_cap, t_cap))
            bar = tqdm(
                total=tc.steps, initial=start_step, disable=not (self.progress and acc.is_main_process),
                desc="distill", unit="step", dynamic_ncols=True,
            )
            self.model.train()
            tick, tokens_since = time.perf_counter(), 0.0
            for step in range(start_step + 1, stop_at + 1):
                batches = self._micro_batches(step)
                counts = acc.reduce(_counts(batches, acc.device), reduction="sum")  # (2,) global
                denominators = counts[self.normalizers].clamp_min(1)  # all-masked step -> loss 0, not NaN
                scale = self.weights.to(acc.device) * self.world / denominators
                step_sums = torch.zeros(len(self.terms), dtype=torch.float64, device=acc.device)
                for i, batch in enumerate(batches):
                    sync = i == len(batches) - 1
                    with nullcontext() if sync else acc.no_sync(self.model):
                        teacher = self._teacher_outputs(self._inputs(batch), t_cap)
                        with acc.autocast():
                            sums = self.model(self._inputs(batch), batch, teacher, s_cap)
                        acc.backward((sums * scale.to(sums.dtype)).sum())
                    step_sums += sums.detach().double()
                values = acc.reduce(step_sums, reduction="sum") / denominators  # per-term, normalized
                loss = float((values * self.weights.to(values.device)).sum())
                if not math.isfinite(loss):
                    self.optimizer.zero_grad(set_to_none=True)
                    parts = ", ".join(f"{t.kind}: {float(v):.4g}" for t, v in zip(self.terms, values))
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                    raise TrainingError(
                        f"loss is {loss} at step {step} ({parts}): training stopped and {where}; "
                        "lower train.lr, raise train.warmup_steps or use train.precision=no"
                    )
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), tc.max_grad_norm) if tc.max_grad_norm else None
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                result.final_step = step

                tokens_since += float(counts[0])
                if step % tc.log_every == 0 or step == stop_at:
                    elapsed = time.perf_counter() - tick
                    row = {"step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]}
                    row.update({f"loss/{t.kind}": float(v) for t, v in zip(self.terms, values)})
                    if grad_norm is not None:
                        row["grad_norm"] = float(grad_norm)
                    row["tokens_per_s"] = tokens_since / max(elapsed, 1e-9)
                    self._log(row)
                    bar.set_postfix(
                        {"loss": f"{loss:.4f}", **{t.kind: f"{float(v):.3f}" for t, v in zip(self.terms, values)},
                         "tok/s": f"{row['tokens_per_s']:.0f}"},
                        refresh=False,
                    )
                    tick, tokens_since = time.perf_counter(), 0.0
                bar.update(1)
                if tc.eval_every and step % tc.eval_every == 0 and step != tc.steps:
                    result.evaluations.append(self._log_eval(step, s_cap, t_cap))
                if (tc.save_every and step % tc.save_every == 0) or step == stop_at:
                    last_good = save_checkpoint(acc, run.checkpoints, step, config_yaml=config_yaml, keep=tc.keep_checkpoints)
            bar.close()
            finished_now = result.final_step == tc.steps and start_step < tc.steps
            if finished_now and (not result.evaluations or result.evaluations[-1]["step"] != tc.steps):
                result.evaluations.append(self._log_eval(tc.steps, s_cap, t_cap))
        result.stopped_early = result.final_step < tc.steps
        return result

    def _log(self, row: dict) -> None:
        if self.acc.is_main_process:
            self.run_dir.log(row)
        self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def _log_eval(self, step: int, s_cap: Captured, t_cap: Captured) -> dict:
        row = {"step": step, **self.evaluate(s_cap, t_cap)}
        self._log(row)
        return row
