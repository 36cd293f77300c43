"""Llama-3-8B -> 1B distillation at 1/16 of the width, on this machine, with every issue-15 option on.

The README's "Scaling" plan (8 GPUs, Llama-3-8B teacher, Llama-3.2-1B-shaped student) cannot run here; this
runs the same shapes scaled down so that each piece is exercised end to end on a CPU:

- teacher: Llama-3-8B's config (32 blocks, GQA 4:1, SwiGLU, rope theta 500000, vocabulary 128,256) with the
  width, FFN width and head counts divided by 16 (hidden 256, 2 query heads and 1 key/value head of 128, FFN
  896): 94M parameters, random weights, saved in bf16 and loaded with ``teacher_dtype=bfloat16``;
- student: Llama-3.2-1B's shape divided by 16 likewise (16 blocks, hidden 128, 2 heads of 64, 1 key/value head,
  FFN 512, the same vocabulary): 37M parameters (its embeddings untied, as in the teacher's config it is built
  from; Llama-3.2-1B ties them), random init, ``student.gradient_checkpointing=true``;
- data: chat records (``messages``) rendered with a Llama-3-style chat template (only assistant turns distilled),
  on a word-level tokenizer padded to 128,256 entries so that the output layers have the real vocabulary;
- recipe ``kd`` (forward KL on the chunked logits), ``train.report_to`` = TensorBoard plus wandb / mlflow when
  installed, offline (WANDB_MODE=offline; mlflow's file store under the run).

Each configuration runs in its own process: checkpointing on and off, and the teacher in float32 for comparison.
Printed: parameters and weight bytes, the resident host memory after the set-up and its peak during the training
steps (sampled every 20 ms; the summary's held-out perplexity, which builds whole logits, is not run), the median
step time after the first, tokens/s, the losses (equal across the three: checkpointing is exact, and the teacher's
random weights were saved in bf16, so float32 loading changes nothing).

Run: ``python benchmarks/llm_scale_sim.py [--context 1024] [--steps 4] [--threads 1] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VOCAB = 128_256  # Llama 3
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def teacher_config():
    """Llama-3-8B (Meta's config.json) with the width divided by 16."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=4096 // 16, intermediate_size=14336 // 16, num_hidden_layers=32,
                       num_attention_heads=32 // 16, num_key_value_heads=1, head_dim=128, rope_theta=500000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=0, eos_token_id=4, pad_token_id=1)


STUDENT = {"num_layers": 16, "hidden_size": 2048 // 16, "num_heads": 32 // 16, "intermediate_size": 8192 // 16}


def build_teacher(folder: Path) -> None:
    """A random-weight teacher in bf16 and its tokenizer (word level, padded to Llama 3's vocabulary)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from tadistill.data.sources import load_texts

    words = sorted({w for t in load_texts("builtin") for w in re.findall(r"\w+|[^\w\s]", t)})
    words = [w for w in ["system", "user", "assistant", *words] if w not in SPECIALS]
    tokens = list(dict.fromkeys([*SPECIALS, "<unk>", *words]))[:VOCAB]
    tokens += [f"<reserved_{i}>" for i in range(VOCAB - len(tokens))]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|end_of_text|>", unk_token="<unk>",
                                  additional_special_tokens=SPECIALS[2:4])
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(teacher_config())
    model.to(torch.bfloat16).save_pretrained(folder)


def write_chats(path: Path, context: int, count: int) -> None:
    """Conversations of builtin-corpus paragraphs, about ``context`` words each: system, then user / assistant."""
    from tadistill.data.sources import load_texts

    texts = [t for t in load_texts("builtin") if len(t.split()) > 20]
    lines, i = [], 0
    for _ in range(count):
        messages, words = [{"role": "system", "content": "Answer from the Python documentation ."}], 10
        while words < context * 0.8:
            for role in ("user", "assistant"):
                text = texts[i % len(texts)]
                i += 1
                messages.append({"role": role, "content": text})
                words += len(re.findall(r"\w+|[^\w\s]", text)) + 5
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")


def _rss_gib() -> float:
    """This process's resident memory now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


class _PeakRSS:
    """The highest resident memory seen while the block runs, sampled every 20 ms by a thread."""

    def __enter__(self):
        self.peak, self._stop = _rss_gib(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_gib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_gib())


def child(args) -> dict:
    """One configuration in this process; returns its measurements."""
    import torch

    torch.set_num_threads(args.threads)
    from tadistill.measure.parameters import count_parameters
    from tadistill.resolve import resolve_config
    from tadistill.training.rundir import RunDir
    from tadistill.training.setup import Cell, RunSetup

    work = Path(args.work)
    trackers = ["tensorboard"]
    os.environ.setdefault("WANDB_MODE", "offline")
    for name in ("wandb", "mlflow"):
        if importlib.util.find_spec(name) is not None:
            trackers.append(name)
    sets = [
        f"teacher={work / 'teacher'}", f"teacher_dtype={args.teacher_dtype}",
        f"data.source={work / 'chat.jsonl'}", "data.prompt_field=messages", f"data.max_length={args.context}",
        f"data.cache_dir={work / 'cache'}", "data.heldout_fraction=0.1",
        *(f"student.{k}={v}" for k, v in STUDENT.items()), "student.init=random",
        f"student.gradient_checkpointing={str(args.checkpointing).lower()}",
        f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.eval_every=0",
        "train.eval_batches=1",
        "train.log_every=1", "train.save_every=0", f"train.report_to=[{', '.join(trackers)}]", "train.lr=3e-4",
    ]
    config = resolve_config("kd", overrides=sets)
    run = RunDir(work / f"run-{args.name}")
    run.check(config, resume=False, overwrite=True)
    began = time.perf_counter()
    setup = RunSetup([Cell("student", config, run)])  # teacher, student, optimizer, tokenized chat data
    run.prepare(config, resume=False, overwrite=True)
    after_setup = _rss_gib()
    peak = _PeakRSS()
    with peak:  # training steps only: not the set-up, not the summary's held-out perplexity
        result = setup.train(run.checkpoints, progress=False)
    wall = time.perf_counter() - began
    rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    tokens_per_step = result.tokens_seen / max(len(steps), 1)
    times = sorted(tokens_per_step / r["tokens_per_s"] for r in steps[1:]) or [float("nan")]  # first step: warm-up
    student = setup.lanes[0].student
    return {
        "name": args.name, "checkpointing": args.checkpointing, "teacher_dtype": args.teacher_dtype,
        "context": args.context, "batch_size": args.batch_size, "trackers": trackers,
        "teacher_parameters": count_parameters(setup.teacher), "student_parameters": count_parameters(student),
        "rss_after_setup_gib": after_setup, "peak_rss_training_gib": peak.peak,
        "median_step_s": times[len(times) // 2], "tokens_per_step": tokens_per_step,
        "losses": [round(r["loss"], 4) for r in steps], "wall_s": wall,
        "tensorboard_files": len(list(run.tensorboard.rglob("events*"))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024, help="tokens per sequence (the plan's is 4096)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than 1 crawls on a busy machine)")
    parser.add_argument("--work", help="folder for the teacher, data and runs (default: a temporary one)")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teacher-dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="tadistill-scale-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "teacher" / "config.json").is_file():
        build_teacher(work / "teacher")
    write_chats(work / "chat.jsonl", args.context, count=12 * args.batch_size * max(args.steps, 4))
    results = []
    for name, ckpt, dtype in (("bf16 teacher, checkpointing", True, "bfloat16"),
                              ("bf16 teacher, no checkpointing", False, "bfloat16"),
                              ("fp32 teacher, checkpointing", True, "float32")):
        cmd = [sys.executable, __file__, "--child", "--name", name.replace(" ", "_").replace(",", ""),
               "--work", str(work), "--context", str(args.context), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--teacher-dtype", dtype]
        if ckpt:
            cmd.append("--checkpointing")
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name}: failed")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["name"] = name
        results.append(row)
    first = results[0]
    print(f"teacher {first['teacher_parameters'] / 1e6:.1f}M parameters (Llama-3-8B / 16 in width), student "
          f"{first['student_parameters'] / 1e6:.1f}M (Llama-3.2-1B / 16); context {args.context}, batch "
          f"{args.batch_size}, {args.steps} steps, {args.threads} threads; trackers: {', '.join(first['trackers'])}")
    t, n = first["teacher_parameters"], first["student_parameters"]
    print(f"weights: teacher {t * 2 / 2**30:.2f} GiB in bf16 ({t * 4 / 2**30:.2f} in fp32); student fp32 weights + "
          f"gradients + AdamW moments {n * 16 / 2**30:.2f} GiB (16 bytes per parameter)")
    print("host memory (RSS, GiB): after the set-up (weights, optimizer, data), and the peak while training")
    print(f"{'configuration':32} {'set-up':>7} {'training peak':>14} {'step s':>7} {'tokens/s':>9}  losses")
    for r in results:
        print(f"{r['name']:32} {r['rss_after_setup_gib']:7.2f} {r['peak_rss_training_gib']:14.2f} "
              f"{r['median_step_s']:7.2f} {r['tokens_per_step'] / r['median_step_s']:9.0f}  {r['losses']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
