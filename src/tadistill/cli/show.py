"""Terminal output of the CLI: the end-of-run summary and ``inspect`` tables (rendered with rich)."""

from __future__ import annotations

import re

from rich.console import Console
from rich.table import Table

from tadistill.errors import ConfigError

_SPEC = re.compile(r"^(?P<model>.+?)@(?P<layers>\d+)x(?P<hidden>\d+)(?:x(?P<heads>\d+))?$")


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.2f}M"
    return str(value)


def print_summary(result) -> None:
    console = Console()
    s = result.summary
    if not s:  # a non-main process of a multi-process run: the main process reports
        return
    if result.student_dir is None:
        console.print(f"stopped after step {s.get('stopped_at')}: continue with --resume --out {result.run_dir}")
        return
    table = Table(title="tadistill run summary", show_header=True)
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    table.add_row("shape", s["teacher_shape"], s["student_shape"])
    table.add_row("parameters", _fmt(s["teacher_parameters"]), _fmt(s["student_parameters"]))
    table.add_row("held-out distillation loss (start -> end)", "",
                  f"{_fmt(s['heldout_loss_start'])} -> {_fmt(s['heldout_loss_end'])}")
    if "heldout_perplexity" in s:  # causal LMs: perplexity, not a sentence-embedding cosine
        table.add_row("held-out perplexity", "", _fmt(s["heldout_perplexity"]))
    else:
        table.add_row("cosine of mean-pooled embeddings (start -> end)", "",
                      f"{_fmt(s.get('embedding_cosine_start'))} -> {_fmt(s['embedding_cosine_end'])}")
    for key, score in (s.get("tasks") or {}).items():
        # {"stdlib-retrieval/acc@1": {"teacher": x, "start": y, "end": z}}: what training added, next to
        # what the teacher scores (issue 18); missing values print as n/a.
        table.add_row(f"{key} (start -> end)", _fmt(score.get("teacher")),
                      f"{_fmt(score.get('start'))} -> {_fmt(score.get('end'))}")
    console.print(table)
    console.print(f"student: {result.student_dir}  ({s['steps']} steps, {s['seconds']} s)")
    console.print(f"run:     {result.run_dir}  (metrics.jsonl, tensorboard/, checkpoints/, summary.json)")


def print_inspect(spec: str, *, seq_len: int = 128) -> None:
    """Shape, parameters and FLOPs/token of a model, or of a student spec MODEL@LxH[xA]."""
    from tadistill.evaluation.cost import summarize
    from tadistill.loading import load_model_config
    from tadistill.students.build import student_config

    match = _SPEC.match(spec)
    name = match["model"] if match else spec
    config = load_model_config(name, what="model")
    if match:
        config = student_config(
            config,
            num_layers=int(match["layers"]),
            hidden_size=int(match["hidden"]),
            num_heads=int(match["heads"]) if match["heads"] else None,
        )
    elif "@" in spec:
        raise ConfigError(f"bad spec {spec!r}: write MODEL@LAYERSxHIDDEN[xHEADS], e.g. builtin@3x384")
    info = summarize(config, seq_len=seq_len)
    table = Table(title=spec, show_header=False)
    for key, value in [
        ("family", info.family), ("layers", info.layers), ("hidden size", info.hidden_size),
        ("attention heads", info.heads), ("intermediate size", info.intermediate_size),
        ("vocabulary", info.vocab_size), ("parameters", f"{info.parameters:,}"),
        (f"FLOPs per token (seq {seq_len})", f"{info.flops_per_token:,}"),
    ]:
        table.add_row(key, str(value))
    Console().print(table)
