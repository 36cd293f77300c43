"""One-GPU runs with each shipped Accelerate config, each checked against the plain run (benchmarks/gpu_checks.py).

The same distillation (the built-in teacher's shape 6x384 -> 3x384, hidden-state MSE under the uniform mapping plus
MiniLMv2 relations, so that both ways of reaching model internals run under the wrapper: hidden states and hooks
on Q/K/V; 16 x 128 tokens, 20 steps, bf16) runs

* plainly: ``python -m tadistill distill`` (one process, no launcher);
* under ``accelerate launch --config_file configs/accelerate/X.yaml --num_processes 1`` for ddp.yaml, fsdp.yaml
  (student sharded; with one process every shard is whole, but the student runs wrapped in FSDP, with its flat
  parameters, mixed-precision policy and full-state-dict gathering on save) and deepspeed-zero2.yaml (skipped,
  with a note, when DeepSpeed is not installed).

A probe around tadistill's CLI records what Accelerate really did (distributed type, mixed precision, the classes
``prepare`` returned), so a config that silently fell back to plain data parallelism shows in the table.

Tolerances on the per-step losses, relative: DDP 1e-3 (one process: the same arithmetic, up to kernel choice);
FSDP and DeepSpeed 5e-2 (they run the student's parameters in bf16 (FSDP's mixed-precision policy, DeepSpeed's
bf16 mode) where the plain run keeps float32 weights under bf16 autocast; over 20 steps the difference stays within
a few bf16 roundings of the loss). The saved students must have the plain run's parameter names and shapes.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path

if __package__:
    from .gpu_common import ROOT, Budget, Row, last_error, python, run_child
else:
    from gpu_common import ROOT, Budget, Row, last_error, python, run_child

CONFIGS = {"ddp": 1e-3, "fsdp": 5e-2, "deepspeed-zero2": 5e-2}  # config name -> relative tolerance on losses
RUN = {
    "full": {"steps": 20, "batch_size": 16, "max_length": 128},
    "smoke": {"steps": 3, "batch_size": 4, "max_length": 32, "max_texts": 300},
}


def run_config(size: str) -> dict:
    """The distillation every run here trains: a config file's content (recipe hs, two objectives)."""
    r = RUN[size]
    data = {"max_length": r["max_length"], **({"max_texts": r["max_texts"]} if "max_texts" in r else {})}
    return {
        "recipe": "hs", "teacher": "builtin",
        "objectives": [{"kind": "hidden", "mapping": "uniform"}, {"kind": "minilmv2", "relation_heads": 12}],
        "student": {"num_layers": 3},
        "data": data,
        "train": {"steps": r["steps"], "batch_size": r["batch_size"], "precision": "bf16", "log_every": 1,
                  "eval_every": 0, "eval_batches": 1, "save_every": 0, "seed": 0},
    }


def probe(record: Path, argv: list[str]) -> int:
    """tadistill's CLI with ``Accelerator.prepare`` watched; what Accelerate did goes to ``record`` (main process)."""
    import accelerate

    seen: dict = {"prepared": []}
    real_prepare = accelerate.Accelerator.prepare

    def prepare(self, *objects, **kwargs):
        result = real_prepare(self, *objects, **kwargs)
        items = result if isinstance(result, tuple) else (result,)
        seen["prepared"].append([type(x).__name__ for x in items])
        seen.update(distributed_type=str(self.distributed_type), mixed_precision=str(self.mixed_precision),
                    num_processes=self.num_processes, device=str(self.device))
        return result

    accelerate.Accelerator.prepare = prepare
    from tadistill.cli.main import main

    code = main(argv)
    if accelerate.PartialState().is_main_process:
        record.write_text(json.dumps({**seen, "exit": code}), encoding="utf-8")
    return code


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _shapes(run: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(run / "student" / "model.safetensors"), framework="pt") as handle:
        return {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(size: str, work: Path, log: Path, budget: Budget, *, cpu: bool) -> list[Row]:
    import yaml

    config_file = work / "accelerate-run.yaml"
    config_file.write_text(yaml.safe_dump(run_config(size)), encoding="utf-8")
    cap = 90 if size == "full" else 150

    def launch(name: str, launcher: list[str]) -> tuple[Path, dict | None, str]:
        out, record = work / f"acc-{name}", work / f"acc-{name}.json"
        cmd = [*launcher, str(Path(__file__).resolve()), "probe", str(record), "--", "distill", "--config",
               str(config_file), "--out", str(out), "--no-progress"]
        child = run_child(cmd, log=log, timeout=budget.grant(cap))
        if child.returncode == 0 and record.is_file():
            return out, json.loads(record.read_text()), ""
        return out, None, "timed out" if child.returncode is None else last_error(child.tail)

    plain, plain_seen, error = launch("plain", python())
    if plain_seen is None:
        return [Row("accelerate", "plain run (the reference)", "failed", "", False, error)]
    reference, reference_shapes = _losses(plain), _shapes(plain)
    out = [Row("accelerate", "plain run (the reference)", f"final loss {reference[-1]:.4f}", "", None,
               f"{len(reference)} steps; {plain_seen.get('distributed_type')}, {plain_seen.get('device')}",
               extra={"losses": reference, "probe": plain_seen})]
    for name, tolerance in CONFIGS.items():
        check = f"configs/accelerate/{name}.yaml, 1 process, losses vs the plain run"
        target = f"<= {tolerance:g} relative"
        if name == "deepspeed-zero2" and (cpu or importlib.util.find_spec("deepspeed") is None):
            why = ("DeepSpeed needs a GPU (CPU smoke)" if cpu else
                   "DeepSpeed is not installed here: `bash benchmarks/gpu.sh --prepare` carries its wheel in .gpu/")
            out.append(Row("accelerate", check, "skipped", target, None, why))
            continue
        launcher = [*python(), "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / f"{name}.yaml"), "--num_processes", "1",
                    "--main_process_port", str(_free_port()), *(["--cpu"] if cpu else [])]
        run, seen, error = launch(name, launcher)
        if seen is None:
            out.append(Row("accelerate", check, "failed", target, False, error))
            continue
        losses = _losses(run)
        gaps = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference)]
        worst = max(gaps) if gaps else float("inf")
        same_student = _shapes(run) == reference_shapes
        met = len(losses) == len(reference) and worst <= tolerance and same_student
        details = (f"max rel. diff {worst:.1e} over {len(losses)} steps (step 1: {gaps[0]:.1e}); ran as "
                   f"{seen.get('distributed_type')} on {seen.get('device')}, mixed precision "
                   f"{seen.get('mixed_precision')}, "
                   f"student prepared as {seen['prepared'][0][0] if seen['prepared'] else '?'}; saved student "
                   f"{'has' if same_student else 'does NOT have'} the plain run's names and shapes")
        out.append(Row("accelerate", check, f"{worst:.1e}", target, met, details,
                       extra={"losses": losses, "rel_diffs": gaps, "probe": seen}))
    return out


if __name__ == "__main__":
    # Child: gpu_accelerate.py probe RECORD -- TADISTILL-ARGS...
    if len(sys.argv) < 4 or sys.argv[1] != "probe" or sys.argv[3] != "--":
        raise SystemExit("usage: gpu_accelerate.py probe RECORD -- TADISTILL-ARGS (started by gpu_checks.py)")
    raise SystemExit(probe(Path(sys.argv[2]), sys.argv[4:]))
