"""The training loop, on Hugging Face Accelerate (so DDP / FSDP / DeepSpeed run the same code).

It trains one or several lanes (students, see ``lane.py``) over the same batches, running the teacher
once per batch for all of them. One optimizer step:
1. build the step's micro-batches (their order and masks are pure functions of the step number and
   the seed, so a resumed run sees exactly the same data); the lanes' methods see the step begin
   (``step_begins``: schedules) and may replace a micro-batch's continuations (``continuation``:
   sampled, replayed);
2. count the valid tokens and masked positions of the whole step, summed over processes;
3. per micro-batch: teacher forward under inference_mode (once per input variant: clean text, and
   BERT-masked text when a lane needs it); then, per lane and inside its own random stream, student
   forward, each term's summed loss divided by its global count ("sum, then normalize once"), backward
   (gradient sync only on the last micro-batch); a method may run the micro-batch in several passes
   (``passes``: a supernet's sub-networks), averaged;
4. per lane, right after its last backward: stop on a NaN / inf loss before the weights are touched; drop
   the gradients of the parameters a method holds this step (``held_parameters``); let methods edit
   gradients (``before_update``); clip, step, schedule;
5. log (with the methods' ``log_values``), evaluate on held-out text (``after_evaluation``), checkpoint
   atomically (the lanes' and methods' ``state_dict``).

The loop names no method: what a method adds is declared through ``training/hooks.py``.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from tadistill.capture.architectures import Architecture
from tadistill.capture.heads import causal_lm_parts
from tadistill.capture.hooks import Captured, capture
from tadistill.data.batches import BatchOrder, collate
from tadistill.data.masking import mask_tokens
from tadistill.data.tokenized import SequenceSet
from tadistill.errors import TrainingError
from tadistill.loading import placed_by_loading
from tadistill.training.checkpoint import restore_checkpoint, save_checkpoint
from tadistill.training.hooks import SAMPLED_BY, ContinuationRequest, seed_for
from tadistill.training.lane import (
    Lane,
    _rng_state,
    _set_rng_state,
    check_shared,
    compile_forward,
    forward_module,
)
from tadistill.training.sampling import sample_continuations
from tadistill.training.signals import Interrupted, StopSignals
from tadistill.training.teacher_cache import TeacherSignals
from tadistill.training.terms import NORMALIZERS, ModelOutputs, merge_requests
from tadistill.training.trackers import Trackers


@dataclass
class TokenizerInfo:
    pad_id: int
    mask_id: int | None
    vocab_size: int
    special_ids: list[int]
    eos_id: int | None = None

    @classmethod
    def of(cls, tokenizer) -> TokenizerInfo:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(
            pad_id=pad if pad is not None else 0,
            mask_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_ids=list(tokenizer.all_special_ids),
            eos_id=tokenizer.eos_token_id,
        )


@dataclass
class MicroBatch:
    """One micro-batch of the data: its number (seeds), sequences, prompt lengths and collated variants."""

    number: int
    sequences: list[Tensor]
    prompt_lengths: list[int]
    variants: dict[bool, dict[str, Tensor]]  # masked-LM inputs or not -> batch on the device
    indices: list[int]  # positions in the training set (offline teacher signals are stored by them)


@dataclass
class LoopResult:
    start_step: int
    final_step: int
    stopped_early: bool = False
    interrupted: int | None = None  # the signal that stopped the run (after a checkpoint)
    evaluations: dict[str, list[dict]] = field(default_factory=dict)  # lane -> eval rows logged now
    tokens_seen: int = 0  # valid tokens of the dataset batches trained on so far, every process (resumed too)


def next_token_labels(input_ids: Tensor, attention_mask: Tensor, prompt_lengths: list[int] | None) -> Tensor:
    """(B, T) causal-LM targets: labels[b, t] = input_ids[b, t + 1], the token position t predicts.

    -100 where there is nothing to learn: the last real token of a row (no next token), padding, and
    positions whose next token belongs to the prompt (GKD masks the prompt; only completions are distilled).
    """
    b, t = input_ids.shape
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    nxt = torch.arange(t).unsqueeze(0) + 1  # (1, T): index of the predicted token
    lengths = attention_mask.sum(1, keepdim=True)  # (B, 1)
    starts = torch.tensor(prompt_lengths or [0] * b).unsqueeze(1)  # (B, 1): first completion token
    keep = (nxt < lengths) & (nxt >= starts)
    return labels.masked_fill(~keep, -100)


def make_batch(
    sequences: list[Tensor], tok: TokenizerInfo, *, mask: bool, probability: float, seed: int,
    causal: bool = False, prompt_lengths: list[int] | None = None,
) -> dict[str, Tensor]:
    """Collate and add ``labels``: what each position predicts (-100: nothing).

    Masked LMs: BERT's 80/10/10 masking from a seeded generator when a lane needs it (labels at the masked
    positions). Causal LMs: the next token (``next_token_labels``).
    """
    batch = collate(sequences, pad_id=tok.pad_id, special_ids=tok.special_ids)
    if causal:
        batch["labels"] = next_token_labels(batch["input_ids"], batch["attention_mask"], prompt_lengths)
    elif mask:
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
    """(4,) counts of the given micro-batches, one per terms.NORMALIZERS entry, float64 on ``device``:
    valid tokens, positions with a label, sequences, micro-batches.

    Summed on the device, never read back here: the loop reads its host values once per step.
    """
    counts = torch.zeros(len(NORMALIZERS), dtype=torch.float64, device=device)
    for b in batches:
        counts[0] += b["attention_mask"].sum(dtype=torch.float64)
        counts[1] += (b["labels"] != -100).sum(dtype=torch.float64)
        counts[2] += b["attention_mask"].shape[0]
        counts[3] += 1
    return counts


def _variant_key(masked: bool) -> str:
    return "masked" if masked else "clean"


def _inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class Trainer:
    """Holds what the loop needs; ``run()`` is the loop."""

    def __init__(
        self,
        lanes: list[Lane],
        accelerator: Accelerator,
        *,
        teacher: nn.Module | None,
        teacher_arch: Architecture | None,
        train: SequenceSet,
        heldout: SequenceSet,
        tokenizer: TokenizerInfo,
        checkpoints: Path,
        state_yaml: str,
        progress: bool = True,
        drop_failed_lanes: bool = False,
        signals: TeacherSignals | None = None,
    ):
        check_shared(lanes)
        self.lanes, self.acc = lanes, accelerator
        self.cfg = lanes[0].config  # data and step structure are shared (check_shared)
        if teacher is None and signals is None and any(lane.needs_teacher for lane in lanes):
            raise ValueError("Trainer: a lane needs the teacher but neither a teacher nor its signals were given")
        self.signals = signals  # stored teacher outputs (tadistill cache-teacher) replace teacher forwards
        # teacher None: teacher-free training (the LM loss only); no teacher forward ever runs.
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.teacher_arch = teacher_arch
        self.causal = lanes[0].student_arch.causal
        self.train_set, self.heldout, self.tok = train, heldout, tokenizer
        self.checkpoints, self.state_yaml = checkpoints, state_yaml
        self.progress, self.drop_failed_lanes = progress, drop_failed_lanes
        self.world = accelerator.num_processes
        self.order = BatchOrder(len(train), self.cfg.train.batch_size, seed=self.cfg.train.seed)
        # Input variants the teacher must see, and for which of them lanes need its logits.
        self.variants = sorted({lane.masked_inputs for lane in lanes})
        self.logit_variants = {lane.masked_inputs for lane in lanes if lane.distiller.needs_logits and lane.needs_teacher}
        self.teacher_head = any(lane.distiller.needs_causal_head and lane.needs_teacher for lane in lanes)
        self.teacher_request = merge_requests([lane.teacher_request for lane in lanes])
        if self.teacher is not None:
            # The teacher is never trained: under bf16 it is stored in bf16 too (half the memory, no casts in its
            # forward). fp16 weights are only used on GPUs, where fp16 kernels exist for every op.
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.train.precision)
            if dtype is torch.float16 and accelerator.device.type != "cuda":
                dtype = None
            if not placed_by_loading(self.teacher):  # a device map or quantized weights stay where loading put them
                self.teacher.to(accelerator.device, dtype=dtype)
            if self.cfg.train.compile:
                compile_forward(self.teacher, logits=bool(self.logit_variants))  # mixed: the base runs eager
        for lane in lanes:
            if self.cfg.train.compile:
                compile_forward(lane.student, logits=lane.distiller.needs_logits)
            # The schedule is not prepared: we step it once per optimizer step (a prepared scheduler would step
            # once per process), and it is checkpointed with the lane's own state (Lane.state_dict).
            lane.model, lane.optimizer = accelerator.prepare(lane.distiller, lane.optimizer)
        self.tokens_seen = 0
        self.captured: dict[str, Captured] = {}  # lane -> its student's capture, while the loop's context is open
        self.writers: dict[str, Trackers] = {}  # lane -> its trackers (train.report_to), main process only

    # ------------------------------------------------------------------------------------- batches

    def _batch(self, sequences: list[Tensor], prompt_lengths: list[int], *, masked: bool, seed: int):
        batch = make_batch(sequences, self.tok, mask=masked, probability=self.cfg.data.mlm_probability, seed=seed,
                           causal=self.causal, prompt_lengths=prompt_lengths)
        return {k: v.to(self.acc.device, non_blocking=True) for k, v in batch.items()}

    def _micro_batches(self, step: int) -> list[MicroBatch]:
        """Micro-batches of optimizer step ``step`` (1-based) for this process."""
        tc, acc = self.cfg.train, self.acc
        out = []
        for micro in range(tc.grad_accum):
            number = ((step - 1) * tc.grad_accum + micro) * self.world + acc.process_index
            indices = self.order.indices(number)
            sequences = [self.train_set[i] for i in indices]
            prompts = [self.train_set.prompt_length(i) for i in indices]
            variants = {masked: self._batch(sequences, prompts, masked=masked, seed=seed_for(tc.seed, "train", number))
                        for masked in self.variants}
            out.append(MicroBatch(number, sequences, prompts, variants, indices))
        return out

    def _lane_batch(self, lane: Lane, micro: MicroBatch, step: int) -> tuple[str | None, dict[str, Tensor]]:
        """The batch ``lane`` trains on for ``micro``, and the key its teacher outputs are shared under.

        Dataset continuations are shared by every lane ("clean" / "masked": one teacher forward each); a method
        may replace them (``MethodHooks.continuation``: sampled or replayed), and those are the lane's own (key
        None). The draws use generators seeded by (train.seed, batch number): equal in a study and alone, and on
        resume.
        """
        seed = self.cfg.train.seed

        def sample(who: str, **settings) -> list[Tensor]:
            model = self.acc.unwrap_model(lane.model).student if who == "student" else self.teacher
            generator = torch.Generator(self.acc.device).manual_seed(seed_for(seed, "sample", micro.number))
            prompts = [seq[:n] for seq, n in zip(micro.sequences, micro.prompt_lengths)]
            return sample_continuations(model, prompts, max_length=self.cfg.data.max_length, eos_id=self.tok.eos_id,
                                        pad_id=self.tok.pad_id, generator=generator, **settings)

        request = ContinuationRequest(
            micro.number, step, micro.sequences, micro.prompt_lengths, sample,
            lambda purpose: torch.Generator().manual_seed(seed_for(seed, purpose, micro.number)),
        )
        for method in lane.methods:
            continuation = method.continuation(request)
            if continuation is not None:
                batch = self._batch(continuation.sequences, continuation.prompt_lengths, masked=False, seed=0)
                batch["sampled_by"] = torch.tensor(SAMPLED_BY[continuation.source])
                return None, batch
        return _variant_key(lane.masked_inputs), micro.variants[lane.masked_inputs]

    def _teacher_outputs(self, batch: dict[str, Tensor], captured: Captured, masked: bool,
                         indices: tuple[str, list[int]] | None = None) -> ModelOutputs:
        """Teacher signals for one batch; tensors made under inference_mode are cloned (autograd may save them).

        With offline signals, ``indices`` = (split, sequence indices) selects the stored outputs instead.
        """
        if self.signals is not None:
            return self.signals.outputs(*indices, batch)
        if self.teacher is None:
            return ModelOutputs(Captured())
        with torch.inference_mode(), self.acc.autocast():
            if self.causal:
                parts = causal_lm_parts(self.teacher)
                hidden = parts.base(**_inputs(batch)).last_hidden_state  # (B, T, d_T); no (B, T, V) logits
            else:
                # A study of OD beside HS / MHA: the clean-text forward skips the MLM head that only the
                # masked-text lanes read (the vocabulary projection costs about as much as a 6x384 body).
                out = forward_module(self.teacher, logits=masked in self.logit_variants)(**_inputs(batch))
        if self.causal:
            if not self.teacher_head:
                return ModelOutputs(captured.clone())
            return ModelOutputs(captured.clone(), None, hidden.clone(), parts.output_layer)
        logits = out.logits.clone() if masked in self.logit_variants else None
        return ModelOutputs(captured.clone(), logits)

    def _active(self) -> list[Lane]:
        return [lane for lane in self.lanes if lane.failed is None]

    # ---------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, t_cap: Captured) -> dict[str, dict[str, float]]:
        """Held-out distillation loss per lane and term (fixed batches and masks: comparable across steps).

        Always on the dataset's continuations, also for on-policy lanes, so that every lane is measured on
        the same text.
        """
        tc, device = self.cfg.train, self.acc.device
        lanes = self._active()
        sums = {lane.name: torch.zeros(len(lane.terms), dtype=torch.float64, device=device) for lane in lanes}
        counts = {v: torch.zeros(len(NORMALIZERS), dtype=torch.float64, device=device) for v in self.variants}
        n = min(len(self.heldout), tc.eval_batches * tc.batch_size)
        for lane in lanes:
            lane.model.eval()
        for start in range(0, n, tc.batch_size):
            indices = range(start, min(start + tc.batch_size, n))
            seqs = [self.heldout[i] for i in indices]
            prompts = [self.heldout.prompt_length(i) for i in indices]
            for masked in self.variants:
                batch = self._batch(seqs, prompts, masked=masked, seed=seed_for(tc.seed, "eval", start))
                teacher = self._teacher_outputs(batch, t_cap, masked, ("heldout", list(indices)))
                counts[masked] += _counts([batch], device)
                for lane in lanes:
                    if lane.masked_inputs == masked:
                        with lane.own_random_stream(), self.acc.autocast():
                            sums[lane.name] += lane.model(_inputs(batch), batch, teacher,
                                                          self.captured[lane.name]).double()
        rows = {}
        for lane in lanes:
            lane.model.train()
            values = sums[lane.name] / counts[lane.masked_inputs][lane.normalizers].clamp_min(1)
            row = {f"eval/{t.kind}": float(v) for t, v in zip(lane.terms, values)}
            row["eval/loss"] = float((values * lane.weights.to(values.device)).sum())
            rows[lane.name] = row
        return rows

    # ---------------------------------------------------------------------------------------- loop

    def _lane_backward(self, lane: Lane, batch: dict[str, Tensor], teacher: ModelOutputs, scale: Tensor,
                       *, sync: bool, step: int, number: int) -> Tensor:
        """One micro-batch of one lane, in its own random stream: forward, backward; returns its (n_terms,) sums.

        A method may ask for several passes (``MethodHooks.passes``): each runs under its context, and the
        sums and gradients are their mean; gradients are synchronised after the last pass only.
        """
        acc = self.acc
        passes = next((p for m in lane.methods if (p := m.passes(step, number)) is not None), None) or [nullcontext]
        total = torch.zeros(len(lane.terms), dtype=torch.float64, device=acc.device)
        for k, setting in enumerate(passes):
            last = sync and k == len(passes) - 1
            with lane.own_random_stream(), nullcontext() if last else acc.no_sync(lane.model), setting():
                with acc.autocast():
                    sums = lane.model(_inputs(batch), batch, teacher, self.captured[lane.name])
                acc.backward((sums * (scale / len(passes)).to(sums.dtype)).sum())
            total += sums.detach().double() / len(passes)
        return total

    def _lane_update(self, lane: Lane, step: int, sums: Tensor, denominators: Tensor) -> dict | None:
        """Normalize the step's sums; stop on NaN / inf before touching the weights; else clip and step."""
        acc = self.acc
        values = acc.reduce(sums, reduction="sum") / denominators  # per term, normalized by global counts
        loss = float((values * lane.weights.to(values.device)).sum())
        if not math.isfinite(loss):
            lane.optimizer.zero_grad(set_to_none=True)
            parts = ", ".join(f"{t.kind}: {float(v):.4g}" for t, v in zip(lane.terms, values))
            lane.failed = f"loss is {loss} at step {step} ({parts})"
            return None
        for method in lane.methods:  # alternating schemes (AMMD): one player waits this step
            for param in method.held_parameters(step):
                param.grad = None
            method.before_update(step)  # gradient edits (WID: masked compactor entries decay to zero)
        tc = lane.config.train
        grad_norm = acc.clip_grad_norm_(lane.model.parameters(), tc.max_grad_norm) if tc.max_grad_norm else None
        lane.optimizer.step()
        lane.scheduler.step()
        lane.optimizer.zero_grad(set_to_none=True)
        row = {"step": step, "loss": loss, "lr": lane.scheduler.get_last_lr()[0]}
        row.update({f"loss/{t.kind}": float(v) for t, v in zip(lane.terms, values)})
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        row.update(lane.log_values())
        return row

    def _step(self, step: int, t_cap: Captured) -> tuple[dict[str, dict], float, list[Lane]]:
        """One optimizer step of every active lane: their log rows, the step's token count, the lanes that failed."""
        acc = self.acc
        micros = self._micro_batches(step)
        lanes = self._active()
        for lane in lanes:
            for method in lane.methods:  # schedules that move with the step (sparsity targets, mask growth)
                method.step_begins(step)
        # Every lane's batches first (sampling happens here), so each term can be divided by its global count
        # (tokens or targets) of the whole step before the first backward.
        plans = {lane.name: [self._lane_batch(lane, m, step) for m in micros] for lane in lanes}
        local = [_counts([b for _, b in plans[lane.name]], acc.device) for lane in lanes]
        local.append(_counts([m.variants[self.variants[0]] for m in micros], acc.device))  # data tokens (speed)
        counts = acc.reduce(torch.stack(local), reduction="sum")  # (lanes + 1, len(NORMALIZERS))
        denominators = {lane.name: counts[i][lane.normalizers].clamp_min(1) for i, lane in enumerate(lanes)}
        scales = {lane.name: lane.weights.to(acc.device) * self.world / denominators[lane.name] for lane in lanes}
        sums = {lane.name: torch.zeros(len(lane.terms), dtype=torch.float64, device=acc.device) for lane in lanes}
        rows, failed = {}, []
        # Micro-batch outer, lanes inner: the teacher's signals of one micro-batch are alive at a time, and
        # dataset batches share one teacher forward.
        for i in range(len(micros)):
            last = i == len(micros) - 1
            teachers: dict[str, ModelOutputs] = {}  # shared dataset variant -> the teacher's outputs
            for lane in lanes:
                key, batch = plans[lane.name][i]
                if not lane.needs_teacher:  # teacher-free lanes never trigger (nor wait for) a teacher forward
                    teacher = ModelOutputs(Captured())
                elif key in teachers:
                    teacher = teachers[key]
                else:
                    teacher = self._teacher_outputs(batch, t_cap, key == "masked", ("train", micros[i].indices))
                    if key is not None:  # dataset batches are shared; a lane's own continuations are not
                        teachers[key] = teacher
                sums[lane.name] += self._lane_backward(lane, batch, teacher, scales[lane.name], sync=last, step=step,
                                                       number=micros[i].number)
                del teacher
                if last:
                    # Each lane steps right after its last backward, not after every lane's: its gradients and
                    # AdamW moments are then still in cache, and only one lane's gradients exist at a time. In a
                    # 4-student study the updates ran after the other lanes' passes, and AdamW's ops were the
                    # largest difference between one study step and four solo steps in a profile (issue 17,
                    # benchmarks/shared_teacher.py). Same values: an update reads only its lane's state, and the
                    # teacher's outputs do not depend on any student.
                    row = self._lane_update(lane, step, sums[lane.name], denominators[lane.name])
                    if row is None:
                        failed.append(lane)
                    else:
                        rows[lane.name] = row
            del teachers
        return rows, float(counts[-1][0]), failed

    def run(self) -> LoopResult:
        tc, acc = self.cfg.train, self.acc
        start_step, ckpt = 0, None
        restored = restore_checkpoint(acc, self.checkpoints)  # the newest verified one; a damaged one is skipped
        if restored is not None:
            ckpt, start_step, extra = restored
            _set_rng_state(extra["rng"])
            self.tokens_seen = int(extra.get("tokens_seen", 0))
            for lane in self.lanes:
                lane.load_state_dict(extra["lanes"][lane.name])
        if acc.is_main_process:
            for lane in self.lanes:
                # Rows logged after the checkpoint (or by an attempt killed before any) are replayed exactly.
                lane.run.truncate_metrics(start_step if ckpt is not None else -1)
                self.writers[lane.name] = Trackers(lane.config.train.report_to, lane.run.root,
                                                   config=lane.config.model_dump(mode="json"))
        stop_at = min(tc.steps, tc.stop_at or tc.steps)
        result = LoopResult(start_step=start_step, final_step=start_step)
        last_good = ckpt

        with ExitStack() as stack:
            signals = stack.enter_context(StopSignals())
            for lane in self.lanes:
                self.captured[lane.name] = stack.enter_context(capture(lane.student, lane.student_arch, lane.request))
            t_cap = (stack.enter_context(capture(self.teacher, self.teacher_arch, self.teacher_request))
                     if self.teacher is not None else Captured())
            if start_step == 0:
                self._log_eval(0, t_cap, result)
            bar = tqdm(total=tc.steps, initial=start_step, disable=not (self.progress and acc.is_main_process),
                       desc="distill", unit="step", dynamic_ncols=True)
            tick, tokens_since = time.perf_counter(), 0.0
            for step in range(start_step + 1, stop_at + 1):
                rows, tokens, failed = self._step(step, t_cap)
                for lane in failed:
                    self._lane_failed(lane, step, last_good)
                result.final_step = step
                tokens_since += tokens
                self.tokens_seen += int(tokens)
                if step % tc.log_every == 0 or step == stop_at:
                    speed = tokens_since / max(time.perf_counter() - tick, 1e-9)
                    for name, row in rows.items():
                        self._log(self._lane(name), {**row, "tokens_per_s": speed})
                    bar.set_postfix(self._postfix(rows, speed), refresh=False)
                    tick, tokens_since = time.perf_counter(), 0.0
                bar.update(1)
                if not self._active():
                    break
                if tc.eval_every and step % tc.eval_every == 0 and step != tc.steps:
                    self._log_eval(step, t_cap, result)
                stop = step != stop_at and self._signalled(signals)
                if (tc.save_every and step % tc.save_every == 0) or step == stop_at or stop:
                    last_good = self._save(step)
                if stop:
                    result.interrupted = signals.received or signal.SIGTERM
                    break
            bar.close()
            if result.final_step == tc.steps and start_step < tc.steps and self._active():
                self._log_eval(tc.steps, t_cap, result)  # the periodic evaluation skips the last step
        for writer in self.writers.values():
            writer.close()
        result.stopped_early = result.final_step < tc.steps
        result.tokens_seen = self.tokens_seen
        if result.interrupted:
            name = signal.Signals(result.interrupted).name
            raise Interrupted(f"stopped by {name} after step {result.final_step}: checkpoint {last_good} written; "
                              "continue with --resume", result.interrupted)
        return result

    def _signalled(self, signals: StopSignals) -> bool:
        """Whether any process received SIGTERM / SIGINT (all processes must stop at the same step)."""
        flag = torch.tensor([1.0 if signals.received is not None else 0.0], device=self.acc.device)
        if self.world > 1:
            flag = self.acc.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    # ----------------------------------------------------------------------------------- bookkeeping

    def _lane(self, name: str) -> Lane:
        return next(lane for lane in self.lanes if lane.name == name)

    def _postfix(self, rows: dict[str, dict], speed: float) -> dict[str, str]:
        if len(self.lanes) == 1 and rows:
            (row,) = rows.values()
            parts = {"loss": f"{row['loss']:.4f}"}
            parts.update({k.split("/", 1)[1]: f"{v:.3f}" for k, v in row.items() if k.startswith("loss/")})
        else:
            parts = {"lanes": f"{len(self._active())}/{len(self.lanes)}"}
            parts.update({name: f"{row['loss']:.3f}" for name, row in list(rows.items())[:4]})
        parts["tok/s"] = f"{speed:.0f}"
        return parts

    def _lane_failed(self, lane: Lane, step: int, last_good: Path | None) -> None:
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
        if not self.drop_failed_lanes:
            raise TrainingError(
                f"{lane.failed}: training stopped and {where}; lower train.lr, raise train.warmup_steps or use "
                "train.precision=no"
            )
        self._log(lane, {"step": step, "failed": lane.failed})

    def _save(self, step: int) -> Path:
        extra = {"rng": _rng_state(), "tokens_seen": self.tokens_seen,
                 "lanes": {lane.name: lane.state_dict() for lane in self.lanes}}
        return save_checkpoint(self.acc, self.checkpoints, step, config_yaml=self.state_yaml,
                               keep=self.cfg.train.keep_checkpoints, extra=extra)

    def _log(self, lane: Lane, row: dict) -> None:
        if not self.acc.is_main_process:
            return
        lane.run.log(row)
        writer = self.writers.get(lane.name)
        if writer is not None:
            writer.log(row)  # the numbers of the row, at its step, to every tracker

    def _log_eval(self, step: int, t_cap: Captured, result: LoopResult) -> None:
        for name, values in self.evaluate(t_cap).items():
            row = {"step": step, **values}
            lane = self._lane(name)
            for method in lane.methods:  # e.g. DistiLLM: a rising held-out loss raises the student-output share
                row.update(method.after_evaluation(values))
            self._log(lane, row)
            result.evaluations.setdefault(name, []).append(row)
