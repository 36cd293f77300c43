"""tadistill against trl's GKD trainer: on-policy generalized-JSD distillation of a tiny causal LM.

Issue 5, benchmark 2b: the same GKD run (Agarwal et al. 2024, algorithm 1 with lambda = 1: every batch's
continuations are sampled by the student, which is then trained on the generalized JSD(beta = 0.5) between
the teacher's and its own next-token distributions on those samples) trained by tadistill (recipe ``gkd``,
its real ``Trainer.run()`` built with the calls ``tadistill.distill`` makes) and by
``trl.experimental.gkd.GKDTrainer``. Target: tadistill at least 1.3x faster per token, at no more peak memory.

Equal in both arms: the teacher (tadistill's built-in GPT-2, 4 x 256, BPE vocabulary 4096, from its cache;
when it is not cached, training it takes ~10 minutes, so a random GPT-2 of that shape with a BPE tokenizer
trained here is used instead); the student's initial weights (the gkd recipe's student, 2 blocks copied from
the teacher's blocks 0 and 2, built once by tadistill and saved to a folder both load: tadistill through
``student.pretrained``); the prompts (the first 32 tokens of the sequences tadistill's batch order gives each
step; trl reads them in that order through a sequential sampler, and both arms check that they saw them);
at most ``max_new_tokens`` sampled tokens per prompt (default 96: prompt + continuation = data.max_length
128), temperature 1, top_p 1 (trl: top_k 0), stop after <|endoftext|>; beta 0.5; lambda 1; torch's AdamW
(trl: optim adamw_torch, not the fused default) with the recipe's lr 2e-4, betas, eps and weight decay,
clipping at 1.0, a cosine schedule after 1 warm-up step; batch size; steps; float32 on a CPU (bf16 autocast
on a GPU, the teacher stored in bf16 on both sides); no dropout (the teacher's config has none, so neither
has the student); no gradient checkpointing (trl's SFTConfig turns it on by default: switched off); no
evaluation, checkpoint, logger or progress bar on trl's side (tadistill's loop evaluates one held-out batch
before the first step and after the last and saves once at the end: outside the timed steps); logging every
10 steps on both sides; data-loader workers 0.

Not equal, by design of the tools: the random streams (the samples differ, and with them how many tokens
each step trains on); the loss computation (trl: full (B, T, V) logits of both models on the padded batch;
tadistill: the divergence chunk by chunk on the valid positions only, each chunk recomputed in the backward
pass); trl's loss is divided by the dataset batch's completion tokens, not the sampled ones.

* Time: every arm runs in a fresh Python process, tadistill, trl, trl, tadistill (quick: one of each), with
  one torch thread each on a CPU (``--threads``; on a shared 2-core machine two threads made every small op
  wait for a second core, steps 4 to 30 times slower and erratic whenever another job ran). A step is the
  wall clock from the end of one optimizer step to the end of the next (data, sampling, teacher and student
  forward, loss, backward, clipping, AdamW, schedule and the tool's own bookkeeping), over the steps after
  warm-up; tadistill: its ``Trainer._step`` is wrapped, trl: ``TrainerCallback.on_step_end``.
* Tokens: the non-padding tokens of the batch the student trains on (32-token prompt + the sampled
  continuation up to and including <|endoftext|>), counted the same way from the batch each tool builds
  (tadistill: ``Trainer._lane_batch``, trl: ``generate_on_policy_outputs``). Tokens per second pool all timed
  steps of an arm; sequences per second (samples end at different lengths) and CPU time per token come with it.
* Memory: CUDA: growth of ``torch.cuda.max_memory_allocated`` over the memory allocated before training,
  from the timing runs. CPU: one more process per arm, over the first warm-up + 4 steps, with glibc serving
  every allocation over 1 MiB by its own mmap (``--mmap-threshold``, as ``chunked_memory`` does: freed
  tensors leave the resident set at once, so the figure follows live tensors; this slows both tools, hence
  separate runs); the figure is the peak resident set (VmHWM, reset when the first step begins) at the end of
  the last step, minus the resident set before the training call. The timing runs' reading with glibc's own
  allocator is reported beside it. Models and data are loaded before the call in both arms.

Run alone: ``python benchmarks/peers_trl_gkd.py [--quick] [--steps 10 --batch-size 16 --max-new-tokens 96]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__:  # imported as benchmarks.peers_trl_gkd
    from .common import (
        Figure,
        Stopwatch,
        _machine_busy_seconds,
        cores_text,
        default_precision,
        median,
        pick_device,
        print_figures,
        single_lane_trainer,
        sync,
    )
else:  # run as a script, or imported by run.py with benchmarks/ on sys.path
    from common import (
        Figure,
        Stopwatch,
        _machine_busy_seconds,
        cores_text,
        default_precision,
        median,
        pick_device,
        print_figures,
        single_lane_trainer,
        sync,
    )

NAME = "peers_trl_gkd"
HOW = ("tadistill (recipe gkd, its Trainer.run()) and trl's GKDTrainer distil the same student from the same "
       "teacher on the same prompts, on-policy (lambda 1), generalized JSD beta 0.5; each arm in fresh processes, "
       "alternating, one torch thread on a CPU; time per trained token (prompt + sampled) after warm-up; peak "
       "memory growth over the training steps.")
TIME_TARGET = 1 / 1.3  # tadistill's time per token / trl's: at least 1.3x faster
MEMORY_TARGET = 1.0  # tadistill's peak-memory growth / trl's: equal or lower
MMAP_THRESHOLD = 1 << 20  # bytes: glibc serves larger allocations by mmap, returned to the OS when freed
SCRIPT = Path(__file__).resolve()
ARMS = ("tadistill", "trl")


# --------------------------------------------------------------------------------------- memory


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status: CPU memory needs Linux")


def _reset_peak_resident() -> None:
    """Reset VmHWM to the current resident set (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


class PeakMemory:
    """Peak memory of the training steps and of the whole training call, as growth over the memory in use
    before the call: CUDA allocator statistics, else the resident set (VmHWM, reset where a phase begins).

    ``begin()`` before the call, ``steps_begin()`` when the first step starts, ``steps_end()`` when the last
    step ends, ``end()`` after the call: the steps' peak leaves out what each tool does once before its first
    step and after its last (tadistill: one held-out evaluation on each side, a final checkpoint).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: list[int] = []

    def _reset(self) -> int:
        """Reset the high-water mark; memory in use now."""
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        _reset_peak_resident()
        return _status_bytes("VmRSS")

    def _peak(self) -> int:
        sync(self.device)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _status_bytes("VmHWM")

    def begin(self) -> None:
        self.before = self._reset()

    def steps_begin(self) -> None:
        self.peaks.append(self._peak())
        self.steps_before = self._reset()

    def steps_end(self) -> None:
        self.steps_peak = self._peak()
        self.peaks.append(self.steps_peak)
        self._reset()

    def end(self) -> None:
        self.peaks.append(self._peak())

    def to_dict(self) -> dict:
        return {"memory_before": self.before, "memory_steps_before": self.steps_before,
                "memory_peak": self.steps_peak, "memory_growth": self.steps_peak - self.before,
                "memory_call_peak": max(self.peaks), "memory_call_growth": max(self.peaks) - self.before}


# ------------------------------------------------------------------------------- shared set-up


def _random_teacher(folder: Path) -> Path:
    """A random GPT-2 of the built-in teacher's shape (4 x 256, 4 heads, 128 positions) and a BPE tokenizer
    (vocabulary 4096) trained on the built-in corpus's training texts, saved to ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tadistill.data.sources import load_texts
    from tadistill.data.tokenized import split_texts
    from tadistill.teachers.causal import TeacherSpec
    from tadistill.teachers.tokenizer import train_bpe_tokenizer

    spec = TeacherSpec()
    train_texts, _ = split_texts(load_texts("builtin"), spec.heldout_fraction, seed=spec.seed)
    tokenizer = train_bpe_tokenizer(train_texts, spec.vocab_size, model_max_length=spec.context)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=spec.context, n_embd=spec.hidden, n_layer=spec.layers,
                        n_head=spec.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos,
                        eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True)
    torch.manual_seed(spec.seed)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = eos
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pick_teacher(opts: argparse.Namespace, work: Path) -> tuple[str, str]:
    """The teacher's folder and how it was chosen: --teacher, else the cached built-in GPT-2, else a random one."""
    if opts.teacher:
        return opts.teacher, "given (--teacher)"
    if not opts.random_teacher:
        from tadistill.teachers.causal import TEACHER_FILE, default_teacher_dir

        cached = default_teacher_dir()
        if (cached / TEACHER_FILE).is_file():  # never train it here: that takes ~10 minutes
            return str(cached), "builtin-gpt2 (cached, trained on the built-in corpus)"
    return str(_random_teacher(work / "teacher")), "random GPT-2 4x256 (builtin-gpt2 not cached), BPE vocab 4096"


def tadistill_overrides(opts: argparse.Namespace, teacher: str, student: str | None) -> list[str]:
    """The gkd recipe's settings both arms are held to (see ``trl_arguments`` for trl's side)."""
    overrides = [
        f"teacher={teacher}", f"train.steps={opts.total_steps}", f"train.batch_size={opts.batch_size}",
        f"train.lr={opts.lr}", f"train.warmup_steps={opts.warmup_lr_steps}", "train.warmup_ratio=0.0",
        "train.schedule=cosine", f"train.precision='{opts.precision}'", "train.eval_every=0",
        "train.eval_batches=1", "train.save_every=0", f"train.log_every={opts.log_every}",
        f"train.seed={opts.seed}", "data.max_length=128", "data.prompt_tokens=32",
        "on_policy.fraction=1.0", "on_policy.temperature=1.0", "on_policy.top_p=1.0",
        f"on_policy.max_new_tokens={opts.max_new_tokens}",
    ]
    if student is not None:
        overrides.append(f"student.pretrained={student}")
    return overrides


def _shape(model) -> str:
    """'layers x width' of a model."""
    from tadistill.students.build import config_shape

    shape = config_shape(model.config)
    return f"{shape.layers}x{shape.hidden_size}"


def prepare(opts: argparse.Namespace, work: Path) -> dict:
    """Teacher, student and prompts that both arms use; written to ``work/spec.json``."""
    from transformers import set_seed

    from tadistill import resolve_config
    from tadistill.data.batches import BatchOrder
    from tadistill.data.prepare import prepare_corpus
    from tadistill.students.spec import build_student_from_spec
    from tadistill.training.setup import load_teacher

    teacher_dir, teacher_how = pick_teacher(opts, work)
    config = resolve_config("gkd", overrides=tadistill_overrides(opts, teacher_dir, None))
    tokenizer, teacher, _ = load_teacher([config])
    # The gkd recipe's student (half the teacher's depth, init from the teacher's every other block), built once
    # by tadistill, seeded as build_lane seeds it, and saved: both arms start from these weights.
    set_seed(config.train.seed)
    student = build_student_from_spec(config, teacher, tokenizer, head="causal-lm")
    student.generation_config.pad_token_id = tokenizer.pad_token_id
    student_dir = work / "student"
    student.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    # The prompts of each step, in the order tadistill's loop draws them (one process, no accumulation).
    splits = prepare_corpus(config.data, tokenizer, seed=config.train.seed,
                            max_positions=getattr(teacher.config, "max_position_embeddings", None))
    order = BatchOrder(len(splits.train), config.train.batch_size, seed=config.train.seed)
    rows = []
    for number in range(config.train.steps):
        for i in order.indices(number):
            n = splits.train.prompt_length(i)
            # trl divides its loss by the completion tokens of the *dataset* batch (num_items_in_batch), not of
            # the sampled one: a dataset completion of max_new_tokens tokens makes that the sampled count.
            ids = splits.train[i][: n + opts.max_new_tokens].tolist()
            rows.append({"input_ids": ids, "prompt_length": n})
    spec = {
        "teacher": teacher_dir, "teacher_how": teacher_how, "student": str(student_dir), "rows": rows,
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "teacher_shape": _shape(teacher), "student_shape": _shape(student), "vocab": len(tokenizer),
        "eos_id": tokenizer.eos_token_id, "options": dict(vars(opts)),
    }
    (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    return spec


# ------------------------------------------------------------------------------------ the arms


class Record:
    """What each arm reports: step-end times, tokens and sequences trained per step, sampling time, losses."""

    def __init__(self, device: torch.device):
        self.device = device
        self.step_ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.busy_ends: list[float | None] = []
        self.tokens: list = []  # per step: non-padding tokens of the trained batch (tensor sums, read at the end)
        self.sampled: list = []  # per step: distilled positions (the sampled tokens)
        self.sequences: list[int] = []
        self.sampling_s: list[float] = []  # per step: sampling + building the batch
        self.losses: list = []

    def step_end(self) -> None:
        sync(self.device)
        self.step_ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())  # this process, all threads
        self.busy_ends.append(_machine_busy_seconds())  # every process on the machine

    def batch(self, attention_mask: torch.Tensor, distilled: torch.Tensor, seconds: float) -> None:
        self.tokens.append(attention_mask.sum())
        self.sampled.append(distilled.sum())
        self.sequences.append(int(attention_mask.shape[0]))
        self.sampling_s.append(seconds)

    def to_dict(self) -> dict:
        return {"step_ends": self.step_ends, "cpu_ends": self.cpu_ends, "busy_ends": self.busy_ends,
                "tokens": [int(t) for t in self.tokens],
                "sampled": [int(t) for t in self.sampled], "sequences": self.sequences,
                "sampling_s": self.sampling_s, "losses": [float(x) for x in self.losses]}


def arm_tadistill(spec: dict, opts: argparse.Namespace, out: Path) -> dict:
    """tadistill's loop, built with the calls ``tadistill.distill`` makes (api._run), timed per step."""
    from tadistill import resolve_config

    config = resolve_config("gkd", overrides=tadistill_overrides(opts, spec["teacher"], spec["student"]))
    trainer, lane = single_lane_trainer(config, out)
    device = trainer.acc.device
    # The prompts tadistill draws are the ones trl is given (checked before anything is timed).
    rows = spec["rows"]
    for step in range(1, config.train.steps + 1):
        micro = trainer._micro_batches(step)[0]
        mine = [seq[:n].tolist() for seq, n in zip(micro.sequences, micro.prompt_lengths)]
        batch_rows = rows[(step - 1) * opts.batch_size: step * opts.batch_size]
        given = [r["input_ids"][: r["prompt_length"]] for r in batch_rows]
        if mine != given:
            raise RuntimeError(f"tadistill's prompts of step {step} differ from the benchmark's")
    record = Record(device)
    real_step, real_lane_batch = trainer._step, trainer._lane_batch

    def lane_batch(lane_, micro, step):
        sync(device)
        began = time.perf_counter()
        key, batch = real_lane_batch(lane_, micro, step)
        sync(device)
        record.batch(batch["attention_mask"], batch["labels"] != -100, time.perf_counter() - began)
        return key, batch

    memory = PeakMemory(device)
    last = config.train.steps

    def timed_step(step, t_cap):
        if step == 1:
            memory.steps_begin()
        result = real_step(step, t_cap)
        record.step_end()
        if step == last:
            memory.steps_end()
        rows_ = result[0]
        record.losses.append(rows_["student"]["loss"] if "student" in rows_ else float("nan"))
        return result

    trainer._lane_batch, trainer._step = lane_batch, timed_step  # instance attributes: run() calls them
    memory.begin()
    with Stopwatch() as sw:
        trainer.run()
    memory.end()
    return {**record.to_dict(), **memory.to_dict(), "elsewhere": sw.elsewhere, "wall_s": sw.wall,
            "device": str(device), "threads": torch.get_num_threads(), "sources": _continuation_counts(lane)}


def _continuation_counts(lane) -> dict[str, int]:
    """Micro-batches per continuation source: the counts of the lane's sampling method (methods/on_policy.py)."""
    from tadistill.methods.on_policy import OnPolicySampling

    counts = [dict(m.counts) for m in lane.methods if isinstance(m, OnPolicySampling)]
    if len(counts) != 1:
        raise RuntimeError(f"expected one sampling method in the gkd lane, found {len(counts)}")
    return counts[0]


def trl_arguments(opts: argparse.Namespace, out: Path, device: torch.device):
    """trl's GKDConfig holding the same settings as ``tadistill_overrides`` (and the gkd recipe's defaults)."""
    from trl.experimental.gkd import GKDConfig

    from tadistill import resolve_config

    tc = resolve_config("gkd", overrides=tadistill_overrides(opts, "unused", None)).train
    return GKDConfig(
        output_dir=str(out), max_steps=tc.steps, per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=1, learning_rate=tc.lr, weight_decay=tc.weight_decay, adam_beta1=tc.adam_betas[0],
        adam_beta2=tc.adam_betas[1], adam_epsilon=tc.adam_eps, max_grad_norm=tc.max_grad_norm,
        lr_scheduler_type="cosine", warmup_steps=tc.warmup_steps, optim="adamw_torch", seed=tc.seed,
        bf16=opts.precision == "bf16", fp16=opts.precision == "fp16", use_cpu=device.type == "cpu",
        # GKD: always on-policy, generalized JSD(0.5), sampling at temperature 1 (trl: top_k 0, top_p 1).
        lmbda=1.0, beta=0.5, temperature=1.0, max_new_tokens=opts.max_new_tokens, seq_kd=False, max_length=128,
        # Nothing that is not the same math: no evaluation, checkpoints, loggers, progress bar, workers.
        eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=opts.log_every,
        dataloader_num_workers=0, dataloader_pin_memory=False,
        # trl's SFTConfig (GKDConfig's base) turns gradient checkpointing on by default: recomputing the student's
        # activations in the backward is not part of the method, tadistill does not do it.
        activation_checkpointing=False,
        train_sampling_strategy="sequential",  # the rows are already in tadistill's batch order
    )


def arm_trl(spec: dict, opts: argparse.Namespace, out: Path) -> dict:
    """trl's GKDTrainer on the same teacher, student weights and prompts, timed per step by a callback."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDTrainer

    device = pick_device()
    args = trl_arguments(opts, out, device)
    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    # Under bf16 (fp16 on a GPU) tadistill stores the frozen teacher in that dtype; trl gets it that way too.
    teacher_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16 if device.type == "cuda" else torch.float32
                     }.get(opts.precision, torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=teacher_dtype)
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    # Pre-tokenized rows: trl's default collator (DataCollatorForChatML) takes input_ids with a completion_mask
    # marking the prompt / completion boundary; it reads "prompt" only when neither is given, so no chat
    # template is needed.
    data = Dataset.from_list([
        {"prompt": "", "input_ids": r["input_ids"],
         "completion_mask": [0] * r["prompt_length"] + [1] * (len(r["input_ids"]) - r["prompt_length"])}
        for r in spec["rows"]
    ])
    record = Record(device)
    memory = PeakMemory(device)

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                memory.steps_begin()

        def on_step_end(self, args, state, control, **kwargs):
            record.step_end()
            if state.global_step == state.max_steps:
                memory.steps_end()

    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                         processing_class=tokenizer, callbacks=[Steps()])
    real_generate, real_loss = trainer.generate_on_policy_outputs, trainer.compute_loss
    items: list = []
    prompts: list[tuple[torch.Tensor, torch.Tensor]] = []

    def generate(model, inputs, generation_config):
        prompts.append((inputs["prompts"].clone(), inputs["prompt_attention_mask"].clone()))  # checked afterwards
        sync(device)
        began = time.perf_counter()
        ids, attention_mask, labels = real_generate(model, inputs, generation_config)
        sync(device)
        record.batch(attention_mask, labels[:, 1:] != -100, time.perf_counter() - began)
        return ids, attention_mask, labels

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        result = real_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        record.losses.append((result[0] if return_outputs else result).detach())
        items.append(num_items_in_batch)
        return result

    # Instance attributes: GKDTrainer.training_step calls self.generate_on_policy_outputs, Trainer self.compute_loss.
    trainer.generate_on_policy_outputs, trainer.compute_loss = generate, compute_loss
    memory.begin()
    with Stopwatch() as sw:
        trainer.train()
    memory.end()
    bs = opts.batch_size
    for step, (ids, mask) in enumerate(prompts, start=1):
        given = [r["input_ids"][: r["prompt_length"]] for r in spec["rows"][(step - 1) * bs: step * bs]]
        if [row[m.bool()].tolist() for row, m in zip(ids, mask)] != given:  # trl pads prompts on the left
            raise RuntimeError(f"trl's prompts of step {step} differ from tadistill's")
    return {**record.to_dict(), **memory.to_dict(), "elsewhere": sw.elsewhere, "wall_s": sw.wall,
            "device": str(device), "threads": torch.get_num_threads(),
            "num_items_in_batch": [None if x is None else int(x) for x in items]}


# -------------------------------------------------------------------------------------- driver


def run_arm(arm: str, index: int, work: Path, opts: argparse.Namespace, *, mmap_threshold: int = 0,
            steps: int | None = None) -> dict:
    """One arm in a fresh Python process (glibc's MALLOC_MMAP_THRESHOLD_ set when given, ``steps`` optimizer
    steps in all when given: the schedule then ends there); its JSON result."""
    result = work / f"{index}-{arm}.json"
    log = work / f"{index}-{arm}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRL_EXPERIMENTAL_SILENCE="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    if opts.threads:
        env.update(OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))
    command = [sys.executable, str(SCRIPT), "--arm", arm, "--work", str(work), "--index", str(index)]
    if steps:
        command += ["--limit", str(steps)]
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"the {arm} arm failed (exit {done.returncode}):\n{tail}")
    return {**json.loads(result.read_text(encoding="utf-8")), "mmap_threshold": mmap_threshold}


def child(opts: argparse.Namespace) -> int:
    """``--arm NAME``: run one arm with the options and data of ``--work``/spec.json; write its result."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work = Path(opts.work)
    spec = json.loads((work / "spec.json").read_text(encoding="utf-8"))
    saved = argparse.Namespace(**spec["options"])
    if opts.limit:
        saved.total_steps = min(saved.total_steps, opts.limit)
    if saved.threads:
        torch.set_num_threads(saved.threads)
    out = work / f"{opts.index}-{opts.arm}-run"
    result = (arm_tadistill if opts.arm == "tadistill" else arm_trl)(spec, saved, out)
    (work / f"{opts.index}-{opts.arm}.json").write_text(json.dumps(result), encoding="utf-8")
    return 0


def _intervals(ends: list, warmup: int) -> list:
    """Per timed step: end of step k - end of step k - 1, for steps warmup + 1 .. last."""
    return [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]


def summarize(results: list[dict], warmup: int) -> dict:
    """Pool the timed steps of an arm's runs: wall and CPU time, tokens, sequences, sampling time, load."""
    seconds, cpu, others, steps = [], [], [], []
    tokens = sampled = sequences = 0
    sampling = []
    for r in results:
        wall = _intervals(r["step_ends"], warmup)
        own = _intervals(r["cpu_ends"], warmup)
        seconds += wall
        cpu += own
        steps.append(wall)
        if None not in r["busy_ends"]:  # CPU cores other processes kept busy during each step
            others += [max(0.0, b - c) / w for b, c, w in zip(_intervals(r["busy_ends"], warmup), own, wall)]
        tokens += sum(r["tokens"][warmup:])
        sampled += sum(r["sampled"][warmup:])
        sequences += sum(r["sequences"][warmup:])
        sampling += r["sampling_s"][warmup:]
    total = sum(seconds)
    return {
        "seconds": total, "cpu_seconds": sum(cpu), "steps": len(seconds), "step_s": steps,
        "median_step_s": median(seconds), "tokens": tokens, "sampled": sampled, "sequences": sequences,
        "tokens_per_s": tokens / total, "sampled_per_s": sampled / total, "sequences_per_s": sequences / total,
        "tokens_per_cpu_s": tokens / sum(cpu), "median_sampling_s": median(sampling),
        "sampling_share": sum(sampling) / total,
        "elsewhere_per_step": others, "elsewhere": sum(o * w for o, w in zip(others, seconds)) / total if others
        else None,
        "first_loss": [r["losses"][0] for r in results], "losses": [r["losses"] for r in results],
    }


def memory_summary(results: list[dict]) -> dict:
    """The largest peak-memory growth of an arm's runs (over the steps, and over the whole training call)."""
    return {"growth": max(r["memory_growth"] for r in results), "peak": max(r["memory_peak"] for r in results),
            "call_growth": max(r["memory_call_growth"] for r in results),
            "growths": [r["memory_growth"] for r in results]}


def measure(opts: argparse.Namespace) -> tuple[dict, dict[str, dict[str, list[dict]]]]:
    """Timing runs (glibc's own allocator), arms alternating; on a CPU then one memory run per arm."""
    runs = [("time", "tadistill"), ("time", "trl")]
    if not opts.quick:
        runs += [("time", "trl"), ("time", "tadistill")]
    if opts.device_type == "cpu" and opts.mmap_threshold:
        runs += [("memory", "tadistill"), ("memory", "trl")]
    results: dict[str, dict[str, list[dict]]] = {"time": {arm: [] for arm in ARMS}, "memory": {arm: [] for arm in ARMS}}
    with tempfile.TemporaryDirectory(prefix="tadistill-peers-gkd-") as tmp:
        work = Path(opts.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        spec = prepare(opts, work)
        spec["prepare_s"] = time.perf_counter() - began
        for index, (role, arm) in enumerate(runs):
            began = time.perf_counter()
            memory = role == "memory"
            results[role][arm].append(run_arm(arm, index, work, opts, mmap_threshold=opts.mmap_threshold if memory
                                              else 0, steps=opts.memory_steps if memory else None))
            results[role][arm][-1]["process_s"] = time.perf_counter() - began
    if not results["memory"]["tadistill"]:  # CUDA (allocator statistics), or --mmap-threshold 0: the timing runs'
        results["memory"] = results["time"]
    spec.pop("rows")
    spec["runs"] = [f"{role}:{arm}" for role, arm in runs]
    return spec, results


def figures(spec: dict, results: dict[str, dict[str, list[dict]]], opts: argparse.Namespace) -> list[Figure]:
    timing = results["time"]
    ta, tr = summarize(timing["tadistill"], opts.warmup), summarize(timing["trl"], opts.warmup)
    # trl divides the step's JSD sum by the completion tokens of the dataset batch (num_items_in_batch), which
    # exceed the sampled ones when samples end at <|endoftext|>: per sampled token, as tadistill reports it.
    tr["first_loss_per_sampled"] = [r["losses"][0] * r["num_items_in_batch"][0] / max(r["sampled"][0], 1)
                                    if r["num_items_in_batch"][0] is not None else r["losses"][0]
                                    for r in timing["trl"]]
    time_ratio = tr["tokens_per_s"] / ta["tokens_per_s"]  # time per token, tadistill / trl
    cpu_ratio = tr["tokens_per_cpu_s"] / ta["tokens_per_cpu_s"]  # CPU time per token
    ma, mr = memory_summary(results["memory"]["tadistill"]), memory_summary(results["memory"]["trl"])
    memory_ratio = ma["growth"] / mr["growth"]
    mib = 1 / (1 << 20)
    shape = (f"teacher {spec['teacher_shape']} ({spec['teacher_how']}), student {spec['student_shape']}, vocab "
             f"{spec['vocab']}, batch {opts.batch_size} x (32-token prompt + up to {opts.max_new_tokens} sampled)")
    threads = f"{opts.threads} torch thread{'s' if opts.threads != 1 else ''}" if opts.threads else "torch's threads"
    time_details = (
        f"{ta['tokens_per_s']:.0f} vs {tr['tokens_per_s']:.0f} tokens/s (prompt + sampled), "
        f"{ta['sequences_per_s']:.2f} vs {tr['sequences_per_s']:.2f} sequences/s; median step "
        f"{ta['median_step_s'] * 1e3:.0f} ms vs {tr['median_step_s'] * 1e3:.0f} ms, of which sampling "
        f"{ta['median_sampling_s'] * 1e3:.0f} ms vs {tr['median_sampling_s'] * 1e3:.0f} ms; {ta['steps']} vs "
        f"{tr['steps']} steps after {opts.warmup} warm-up ({len(timing['tadistill'])} process(es) per arm, "
        f"{threads}); {shape}; step-1 JSD per sampled token "
        f"{', '.join(f'{x:.3f}' for x in ta['first_loss'])} vs "
        f"{', '.join(f'{x:.3f}' for x in tr['first_loss_per_sampled'])} (different samples; trl reports "
        f"{', '.join(f'{x:.3f}' for x in tr['first_loss'])}: divided by the dataset's completion tokens); "
        f"CPU time per token {cpu_ratio:.3f}x; other processes busy on {cores_text(ta['elsewhere'])} vs "
        f"{cores_text(tr['elsewhere'])} cores meanwhile"
    )
    if opts.device_type == "cuda":
        how = "allocated (torch.cuda.max_memory_allocated)"
    elif results["memory"] is results["time"]:
        how = "resident (VmHWM), glibc's own allocator"
    else:
        how = f"resident (VmHWM), glibc mmap threshold {opts.mmap_threshold >> 10} KiB"
    memory_details = (
        f"{ma['growth'] * mib:.0f} MiB vs {mr['growth'] * mib:.0f} MiB peak growth over the training steps "
        f"(peak {ma['peak'] * mib:.0f} vs {mr['peak'] * mib:.0f} MiB {how}); whole training call, with "
        f"tadistill's held-out evaluations and final checkpoint: {ma['call_growth'] * mib:.0f} vs "
        f"{mr['call_growth'] * mib:.0f} MiB"
    )
    extra_memory = {"tadistill": ma, "trl": mr, "unit": "bytes", "measure": how}
    if results["memory"] is not results["time"]:  # the resident set as a user sees it, from the timing runs
        da, dr = memory_summary(timing["tadistill"]), memory_summary(timing["trl"])
        extra_memory.update(default_allocator_tadistill=da, default_allocator_trl=dr)
        memory_details += (f"; with glibc's own allocator (the timing runs) {da['growth'] * mib:.0f} vs "
                           f"{dr['growth'] * mib:.0f} MiB ({da['growth'] / dr['growth']:.3f}x)")
    memory_details += f"; {shape}"
    extra = {"spec": spec, "tadistill": ta, "trl": tr, "raw": results["time"], "precision": opts.precision,
             "cpu_time_ratio": cpu_ratio, "sequences_time_ratio": tr["sequences_per_s"] / ta["sequences_per_s"],
             "runs": spec["runs"], "warmup_steps": opts.warmup, "threads": opts.threads}
    if results["memory"] is not results["time"]:
        extra_memory["raw"] = results["memory"]
    return [
        Figure(benchmark=NAME, what="time per trained token, tadistill / trl GKDTrainer (on-policy JSD, lambda 1)",
               ratio=time_ratio, target=TIME_TARGET, target_text="<= 0.769 (1.3x)", details=time_details,
               extra=extra),
        Figure(benchmark=NAME, what="peak memory growth while training, tadistill / trl GKDTrainer",
               ratio=memory_ratio, target=MEMORY_TARGET, target_text="<= 1.0", details=memory_details,
               extra=extra_memory),
    ]


def parse(argv: list[str] | None = None, *, quick: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=NAME, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps, one timing process per arm (a smoke run)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per step (default 16, quick 8)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="sampled tokens per prompt at most (default 96)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2, quick 1; at least 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (default 10, quick 4)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (the gkd recipe's)")
    p.add_argument("--log-every", type=int, default=10, help="log interval of both tools (tadistill's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", default=None, help="a causal-LM folder (default: the cached builtin-gpt2)")
    p.add_argument("--random-teacher", action="store_true", help="a random GPT-2 4x256 even if builtin-gpt2 is cached")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default=None,
                   help="tadistill's train.precision, trl's bf16 / fp16 (default: bf16 on CUDA, else no)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of each arm's process (default 1 on a CPU, see the module's docstring; "
                        "0: torch's default)")
    p.add_argument("--mmap-threshold", type=int, default=MMAP_THRESHOLD,
                   help="glibc's MALLOC_MMAP_THRESHOLD_ in the arms' processes (default 1 MiB; 0: glibc's own)")
    p.add_argument("--keep", default=None, help="work in this folder and keep it (models, prompts, logs, results)")
    # A run of one arm, started by the benchmark itself.
    p.add_argument("--arm", choices=ARMS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.quick = opts.quick or quick
    opts.batch_size = opts.batch_size or (8 if opts.quick else 16)
    opts.warmup = max(1, opts.warmup if opts.warmup is not None else (1 if opts.quick else 2))
    opts.steps = opts.steps if opts.steps is not None else (4 if opts.quick else 10)
    opts.total_steps = opts.warmup + opts.steps
    # Memory runs (CPU): the first steps only, their schedule ending there (peak memory does not depend on the
    # learning rate; the samples after the first step do, a little).
    opts.memory_steps = min(opts.total_steps, opts.warmup + 4)
    opts.warmup_lr_steps = 1  # lr warm-up steps (both tools; tadistill's 2% of a short run would round to 0)
    opts.device_type = pick_device().type  # both tools take CUDA when there is one (as they do by default)
    if opts.threads is None:
        opts.threads = 1 if opts.device_type == "cpu" else 0
    if opts.precision is None:
        opts.precision = default_precision(pick_device())
    if opts.max_new_tokens < 1 or opts.max_new_tokens > 96:
        p.error("--max-new-tokens must be within 1..96 (32-token prompts, 128 positions)")
    return opts


def run(argv: list[str] | None = None, *, quick: bool = False) -> list[Figure]:
    opts = parse(argv, quick=quick)
    spec, results = measure(opts)
    return figures(spec, results, opts)


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if opts.arm:
        return child(opts)
    return print_figures(run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
