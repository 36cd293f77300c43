"""tadistill against TextBrewer for MiniLMv2 from an upper-middle block of a deep teacher: tokens per second.

MiniLMv2 distils BERT-large from block 21 of 24 (Wang et al. 2021, sec. 3): the teacher's blocks 22-24 and
its pooler feed no loss. tadistill cuts them for training (``training/setup.py`` ``blocks_read_only``); a
generic trainer such as TextBrewer runs the whole teacher. This benchmark measures what that is worth.

* **teacher**: a BERT built from a config, BERT-large's depth at a width a CPU can train on: 24 blocks x 256,
  4 heads, FFN 1024, the built-in teacher's tokenizer (30,522 tokens), random weights (seed 0), written to
  a temporary folder; each library loads its own copy (float32).
* **student**: what tadistill builds for recipe ``minilmv2`` with ``student.num_layers=6`` (6 x 256, random
  init), and for TextBrewer a copy with the same initial weights.
* **loss**: MiniLMv2's Q-Q, K-K, V-V relation KL between teacher block 21 and the student's last block,
  16 relation heads (d_r = 16, as MiniLMv2's 1,024-wide BERT-large with 64 heads), summed over the three
  relations and divided by the valid tokens. TextBrewer: ``GeneralDistiller`` with three
  ``intermediate_matches`` whose loss is the relation KL written from the paper's formula
  (``minimal_loop.relation_kl``, registered with ``textbrewer.presets.register_new``) on the Q / K / V
  outputs forward hooks keep (its adaptors return them as ``hidden`` features); no logits, so no KD loss.
* **batches, optimizer, schedule, dropout, precision**: as in ``peers_textbrewer`` (tadistill's batches of the
  built-in corpus, 8 x 128; AdamW with its groups, clipping, linear schedule; the lane's dropout stream;
  float32), so the two losses must agree at every step.

**Speed**: both loops in one process, steps alternating (TextBrewer on a thread held between steps, as in
``peers_textbrewer``); a step is start to start of the next; median after warm-up. The figure is tadistill's
step time over TextBrewer's (target <= 1/1.3: 1.3x the tokens per second).

**Bound**: cutting the teacher can save at most the time of what it cuts. TextBrewer's teacher forward is
timed inside its steps (hooks on the teacher); after the speed run, the whole teacher and the teacher cut at
block 21 (no pooler) run forward on a training batch, alternating (no_grad, as TextBrewer runs its teacher),
which gives the fraction f of a teacher forward the cut removes. The best ratio a trainer running blocks
1-21 could reach is (TextBrewer step - f x its teacher forward) / TextBrewer step, printed next to the ratio
(both terms measured under the same load as the ratio; only f comes from the separate timing).

Run alone: ``python benchmarks/peers_deep_teacher.py [--quick] [--batch-size 8 --seq-len 128 --steps 10]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

if __package__:  # imported as benchmarks.peers_deep_teacher
    from .common import (
        Figure,
        Stopwatch,
        cores_text,
        load_average,
        median,
        pick_device,
        print_figures,
        quiet_transformers,
        single_lane_trainer,
        sync,
        torch_threads,
    )
    from .minimal_loop import QKV, finish_times, interleave, relation_kl
    from .peers_textbrewer import (
        Lockstep,
        TextBrewerRun,
        Timing,
        inputs_of,
        on_device,
        student_copy,
    )
else:  # run as a script, or imported by run.py with benchmarks/ on sys.path
    from common import (
        Figure,
        Stopwatch,
        cores_text,
        load_average,
        median,
        pick_device,
        print_figures,
        quiet_transformers,
        single_lane_trainer,
        sync,
        torch_threads,
    )
    from minimal_loop import QKV, finish_times, interleave, relation_kl
    from peers_textbrewer import (
        Lockstep,
        TextBrewerRun,
        Timing,
        inputs_of,
        on_device,
        student_copy,
    )

NAME = "peers_deep_teacher"
HOW = ("A 24x256 BERT built from a config, MiniLMv2 from its block 21 into a 6x256 student: tadistill's Trainer.run() "
       "(teacher cut after block 21) and TextBrewer's GeneralDistiller.train() (whole teacher) on the same batches, "
       "weights, loss and AdamW, steps alternating in one process; median step after warm-up. Bound: whole vs cut "
       "teacher forward, alternating.")
SPEEDUP = 1.3
TARGET = 1 / SPEEDUP
LAYERS, WIDTH, HEADS, FFN = 24, 256, 4, 1024
TEACHER_BLOCK, STUDENT_LAYERS, RELATION_HEADS = 21, 6, 16
LOSS_NAME = "tadistill_bench_minilmv2_relation"


def build_teacher(folder: Path) -> Path:
    """A random 24 x 256 BERT (BERT-large's depth) with the built-in teacher's tokenizer, saved to ``folder``."""
    from transformers import BertConfig, BertModel

    from tadistill.loading import load_tokenizer

    tokenizer = load_tokenizer("builtin")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=512,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tadistill(teacher: Path, opts: argparse.Namespace, steps: int, out: str):
    """The config, Trainer and lane ``tadistill.distill`` would build (teacher cut as in a run)."""
    from tadistill import resolve_config

    config = resolve_config("minilmv2", overrides=[
        f"teacher={teacher}", f"student.num_layers={STUDENT_LAYERS}", f"train.steps={steps}",
        f"train.batch_size={opts.batch_size}", f"data.max_length={opts.seq_len}", "train.precision='no'",
        "train.eval_every=0", "train.eval_batches=1", "train.save_every=0",
        f"objectives.minilmv2.teacher_layer={TEACHER_BLOCK}", f"objectives.minilmv2.relation_heads={RELATION_HEADS}",
    ])
    trainer, lane = single_lane_trainer(config, out)
    if trainer.teacher_arch.num_layers != TEACHER_BLOCK:  # what this benchmark is about must be in effect
        raise RuntimeError(f"the teacher was not cut: it runs {trainer.teacher_arch.num_layers} blocks")
    return config, trainer, lane


def register_relation_loss() -> None:
    """TextBrewer's match loss for one relation: MiniLMv2's KL written from the paper, divided by valid tokens."""
    from textbrewer.presets import register_new

    def loss(feature_s: torch.Tensor, feature_t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        valid = mask.bool()
        return relation_kl(feature_s, feature_t, valid, RELATION_HEADS) / valid.sum().clamp_min(1)

    register_new("match_Loss", LOSS_NAME, loss)


def textbrewer_run(teacher_dir: Path, student, batches, config, *, steps: int, device, out_dir: str, before):
    """GeneralDistiller on the relation KL of teacher block 21 and the student's last block (Q, K, V)."""
    from tadistill.loading import load_pretrained

    register_relation_loss()
    teacher = load_pretrained(str(teacher_dir))  # the whole teacher, pooler included: what TextBrewer runs
    teacher.forward_seconds = []  # each forward TextBrewer runs, timed in its own steps (the bound's input)

    def started(module, args, kwargs):
        sync(device)
        module.forward_began = time.perf_counter()

    def ended(module, args, kwargs, output):
        sync(device)
        module.forward_seconds.append(time.perf_counter() - module.forward_began)

    teacher.register_forward_pre_hook(started, with_kwargs=True)
    teacher.register_forward_hook(ended, with_kwargs=True)
    t_qkv = QKV(teacher.encoder.layer[TEACHER_BLOCK - 1])
    s_qkv = QKV(student.encoder.layer[-1])

    def adaptor(qkv: QKV):
        def adapt(batch, outputs):
            return {"hidden": [qkv.out["query"], qkv.out["key"], qkv.out["value"]],
                    "inputs_mask": batch["attention_mask"]}
        return adapt

    matches = [{"layer_T": i, "layer_S": i, "feature": "hidden", "loss": LOSS_NAME, "weight": 1} for i in range(3)]
    return TextBrewerRun(teacher, student, batches, config.train, steps=steps, device=device, precision="no",
                         out_dir=out_dir, before=before, matches=matches, adaptors=(adaptor(t_qkv), adaptor(s_qkv)),
                         forward_args={})


def measure_speed(opts: argparse.Namespace, teacher_dir: Path) -> tuple[Timing, object]:
    """Both libraries' steps, alternating in this process; returns the timing and TextBrewer's run (its teacher)."""
    steps = opts.warmup + opts.steps + 1
    timing = Timing()
    with tempfile.TemporaryDirectory(prefix="tadistill-bench-") as out, on_device(pick_device(opts.device)):
        config, trainer, lane = build_tadistill(teacher_dir, opts, steps, out)
        device = trainer.acc.device
        timing.device = str(device)
        batches = [inputs_of(trainer._micro_batches(k)[0].variants[False]) for k in range(1, steps + 1)]
        timing.tokens = [int(b["attention_mask"].sum()) for b in batches]
        timing.positions = batches[0]["input_ids"].numel()
        student = student_copy(lane.student)
        lockstep = Lockstep(lambda before: textbrewer_run(teacher_dir, student, batches, config, steps=steps,
                                                          device=device, out_dir=str(Path(out) / "textbrewer"),
                                                          before=before))

        def textbrewer_step(step: int, rng: dict) -> None:
            if step == 1:
                lockstep.start_rng = rng  # TextBrewer's dropout stream: the lane's
            lockstep.one_step()

        interleave(trainer, lane, timing, textbrewer_step)
        try:
            lockstep.start()
            with Stopwatch() as sw:
                trainer.run()
            timing.elsewhere = sw.elsewhere
        finally:
            lockstep.stop()
            trainer.restore_teacher()
        lockstep._check()
        timing.textbrewer = lockstep.times
        timing.textbrewer_loss = lockstep.run.losses
        run = lockstep.run
        timing.teacher_forward = run.teacher.forward_seconds
    finish_times(timing)
    return timing, (run.teacher, batches[0], device)


def teacher_forward_saving(teacher: nn.Module, batch: dict, device: torch.device, repeats: int) -> dict:
    """Median forward time of the whole teacher and of blocks 1-21 without the pooler, alternating (no_grad)."""
    inputs = {k: v.to(device) for k, v in batch.items()}
    blocks, pooler = teacher.encoder.layer, teacher.pooler
    cut = nn.ModuleList(list(blocks)[:TEACHER_BLOCK])
    times: dict[str, list[float]] = {"whole": [], "cut": []}
    teacher.eval()
    try:
        for k in range(repeats + 1):  # the first round warms up
            for arm in (("whole", "cut") if k % 2 else ("cut", "whole")):
                teacher.encoder.layer, teacher.pooler = (blocks, pooler) if arm == "whole" else (cut, None)
                sync(device)
                began = time.perf_counter()
                with torch.no_grad():
                    teacher(**inputs)
                sync(device)
                if k:
                    times[arm].append(time.perf_counter() - began)
    finally:
        teacher.encoder.layer, teacher.pooler = blocks, pooler
    return {"whole_s": median(times["whole"]), "cut_s": median(times["cut"]), "times": times}


def figures(timing: Timing, saving: dict, opts: argparse.Namespace, load: list) -> list[Figure]:
    w = opts.warmup
    td, tb = timing.tadistill[w:-1], timing.textbrewer[w:]
    tokens = timing.tokens[w:w + len(td)]
    td_rate = median([k / t for k, t in zip(tokens, td)])
    tb_rate = median([k / t for k, t in zip(tokens, tb)])
    ratio = median(td) / median(tb)
    n = min(len(timing.tadistill_loss), len(timing.textbrewer_loss))
    gaps = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(timing.tadistill_loss[:n], timing.textbrewer_loss[:n])]
    worst = max(gaps) if gaps else float("nan")
    agree = worst <= 1e-4 and n == opts.warmup + opts.steps + 1
    fraction = 1 - saving["cut_s"] / saving["whole_s"]  # of a teacher forward, removed by the cut
    teacher_s = median(timing.teacher_forward[w:])  # TextBrewer's teacher forward inside its steps
    bound = (median(tb) - fraction * teacher_s) / median(tb)
    label = (f"MiniLMv2 from block {TEACHER_BLOCK} of a {LAYERS}x{WIDTH} BERT into {STUDENT_LAYERS}x{WIDTH}, "
             f"{opts.batch_size}x{opts.seq_len}")
    return [Figure(
        benchmark=NAME, what=f"step time, tadistill / TextBrewer GeneralDistiller: {label}", ratio=ratio,
        target=TARGET, target_text=f"<= 1/{SPEEDUP} ({TARGET:.3f})",
        details=(f"{td_rate:,.0f} vs {tb_rate:,.0f} tokens/s ({1 / ratio:.2f}x; target >= {SPEEDUP}x); median step "
                 f"{median(td) * 1e3:,.0f} vs {median(tb) * 1e3:,.0f} ms over {len(td)} steps after {w} warm-up, "
                 f"alternating; bound {bound:.3f} ({1 / bound:.2f}x): TextBrewer's teacher forward takes "
                 f"{teacher_s * 1e3:,.0f} ms of its step, and blocks 1-{TEACHER_BLOCK} without the pooler are "
                 f"{1 - fraction:.3f} of a whole forward ({saving['cut_s'] * 1e3:,.0f} vs "
                 f"{saving['whole_s'] * 1e3:,.0f} ms alone); losses "
                 f"{'agree' if agree else 'DISAGREE'} (step 1 {timing.tadistill_loss[0]:.4f} vs "
                 f"{timing.textbrewer_loss[0]:.4f}, at most {worst:.1e} rel. over {n} steps); other processes busy "
                 f"on {cores_text(timing.elsewhere)} cores; {opts.threads or torch.get_num_threads()} torch thread(s); load {load}"),
        extra={
            "batch_size": opts.batch_size, "seq_len": opts.seq_len, "device": timing.device, "warmup_steps": w,
            "measured_steps": len(td), "tokens_per_s_tadistill": td_rate, "tokens_per_s_textbrewer": tb_rate,
            "speedup": 1 / ratio, "best_possible_ratio": bound, "teacher_forward": saving,
            "cut_fraction": fraction, "textbrewer_teacher_forward_s": timing.teacher_forward,
            "tadistill_s": timing.tadistill, "textbrewer_s": timing.textbrewer,
            "tadistill_loss": timing.tadistill_loss, "textbrewer_loss": timing.textbrewer_loss,
            "loss_rel_diff_max": worst, "losses_agree": agree, "elsewhere_cores": timing.elsewhere,
            "load_average": load, "torch_threads": opts.threads or torch.get_num_threads(),
        },
    )]


def parse(argv: list[str] | None = None, *, quick: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=NAME, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2, quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10, quick 3)")
    p.add_argument("--repeats", type=int, default=5, help="rounds of the teacher-forward timing")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: see common.torch_threads; 0 leaves torch's setting)")
    opts = p.parse_args(argv)
    opts.quick = opts.quick or quick
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if opts.quick else 2)
    opts.steps = opts.steps if opts.steps is not None else (3 if opts.quick else 10)
    return opts


def run(argv: list[str] | None = None, *, quick: bool = False) -> list[Figure]:
    opts = parse(argv, quick=quick)
    load = [load_average()]
    with tempfile.TemporaryDirectory(prefix="tadistill-bench-teacher-") as tmp, torch_threads(opts.threads):
        teacher_dir = build_teacher(Path(tmp))
        timing, (teacher, batch, device) = measure_speed(opts, teacher_dir)
        saving = teacher_forward_saving(teacher, batch, device, opts.repeats)
    load.append(load_average())
    return figures(timing, saving, opts, load)


def main(argv: list[str] | None = None) -> int:
    quiet_transformers()
    return print_figures(run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
