"""The demo's answer to "did the student learn?" (issue 18): its stdlib-retrieval score before and after training,
beside the teacher's.

A falling distillation loss does not show that a student got better at what users of a sentence encoder need;
the built-in retrieval task (a stdlib name and its parameters against the first sentence of its docstring, 1,000
candidates, pairs not in the training corpus) does. The untrained student is rebuilt from the run's config exactly
as training built it (same seed, same initialisation), so nothing extra is kept during training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tadistill.config import DistillConfig

SEEDS = (0, 1, 2)
METRICS = ("acc@1", "mrr")


def _scores(model, tokenizer, max_length: int) -> dict[str, float]:
    from tadistill.evaluation.retrieval import load_retrieval_pairs, retrieval_scores

    scores = retrieval_scores(model, tokenizer, load_retrieval_pairs("stdlib-retrieval"), seeds=SEEDS,
                              max_length=max_length)
    return {metric: scores[metric][0] for metric in METRICS}


def initial_student(config: DistillConfig, teacher, tokenizer):
    """The student ``config`` describes before its first step: ``build_lane``'s seed, then the same build."""
    from accelerate.utils import set_seed

    from tadistill.students.spec import build_student_from_spec

    set_seed(config.train.seed)
    return build_student_from_spec(config, teacher, tokenizer, head="base")


def task_scores(config: DistillConfig, student_dir: str | Path) -> dict[str, dict[str, float]]:
    """``{"stdlib-retrieval/<metric>": {"teacher", "start", "end"}}``: mean over evaluation seeds 0, 1, 2."""
    from tadistill.loading import load_pretrained, load_tokenizer

    threads = torch.get_num_threads()
    teacher = load_pretrained(config.teacher, head="base", what="teacher", trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(config.teacher, trust_remote_code=config.trust_remote_code)
    length = config.data.max_length
    rows = {"teacher": _scores(teacher, tokenizer, length),
            "start": _scores(initial_student(config, teacher, tokenizer), tokenizer, length),
            "end": _scores(load_pretrained(str(student_dir), head="base", what="student"), tokenizer, length)}
    torch.set_num_threads(threads)
    return {f"stdlib-retrieval/{metric}": {who: round(values[metric], 4) for who, values in rows.items()}
            for metric in METRICS}


def add_task_scores(result, config: DistillConfig) -> Any:
    """Score a finished demo run, store the scores in its summary.json (``tasks``) and return the result."""
    if not result.summary or result.student_dir is None:  # another process, or a run stopped early
        return result
    result.summary["tasks"] = task_scores(config, result.student_dir)
    path = Path(result.run_dir) / "summary.json"
    from tadistill.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(result.summary, indent=2))
    return result
