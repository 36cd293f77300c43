"""One evaluation suite for a teacher and its students: what a student kept and what it costs.

Each model becomes one flat row of numbers (``results.json`` / ``.csv`` / ``.md``):

- cost: ``params``, ``flops_per_token``, ``size_mb``, ``latency_b1_ms`` / ``latency_b32_ms`` and
  throughput, and ``speedup_b1`` / ``speedup_b32``. Each student is timed interleaved with the teacher
  (the speedup), and its latency is given in the time base of the teacher row's measurement
  (``latency.in_reference_time``), so teacher latency / student latency = speedup in every table; the
  raw interleaved medians are kept as ``latency_b<B>_interleaved_ms`` / ``latency_b<B>_teacher_interleaved_ms``;
- fidelity on held-out text (students): ``fidelity/<metric>``, or ``fidelity[<lang>]/<metric>`` per
  language of a multilingual study and ``fidelity/<metric>`` their unweighted mean (output KL, cosine and CKA of final and mapped hidden states,
  attention-relation KL, sentence-embedding cosine and nearest-neighbour overlap@10);
- intrinsic quality: ``intrinsic/mlm_perplexity`` (MLM heads) or ``intrinsic/perplexity`` (causal LMs);
- downstream: ``<task>/<metric>`` (mean over seeds) and ``<task>/<metric>_std``; cross-lingual transfer
  (``spec.crosslingual``): ``<task>[<lang>]/<metric>`` per language and ``<task>[others]/<metric>``;
- zero-shot (causal LMs, with lm-evaluation-harness installed): ``zero_shot/<task>/<metric>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tadistill.errors import ModelError
from tadistill.evaluation.cost import count_parameters, flops_per_token
from tadistill.evaluation.downstream import evaluate_task
from tadistill.evaluation.fidelity import fidelity_by_language, fidelity_row
from tadistill.evaluation.intrinsic import causal_perplexity, has_lm_head, masked_lm_perplexity
from tadistill.evaluation.latency import (
    compare_latency, flatten_latency, in_reference_time, measure_latency, reference_from_row, size_on_disk,
)
from tadistill.evaluation.zero_shot import zero_shot
from tadistill.loading import is_causal_lm, load_model_config, load_pretrained, load_tokenizer, resolve_model_path


def _load_with_head(name: str, *, trust_remote_code: bool, what: str):
    """The model with its LM head when it has one (for output KL and perplexity), else the base.

    Causal LMs load with their causal-LM head; encoders with their masked-LM head when they carry one.
    """
    if is_causal_lm(load_model_config(name, trust_remote_code=trust_remote_code, what=what)):
        return load_pretrained(name, head="causal-lm", trust_remote_code=trust_remote_code, what=what)
    try:
        return load_pretrained(name, head="mlm", trust_remote_code=trust_remote_code, what=what)
    except ModelError:
        return load_pretrained(name, head="base", trust_remote_code=trust_remote_code, what=what)


class EvaluationSuite:
    """Evaluate the teacher once, then any number of students against it with the same settings."""

    def __init__(self, *, teacher: str, texts: dict[str, list[str]], spec, max_length: int = 128,
                 trust_remote_code: bool = False):
        self.teacher_name, self.texts, self.spec, self.max_length = teacher, texts, spec, max_length
        self.trust_remote_code = trust_remote_code
        self.tokenizer = load_tokenizer(teacher, trust_remote_code=trust_remote_code)
        self.teacher = _load_with_head(teacher, trust_remote_code=trust_remote_code, what="teacher").eval()
        self._teacher_latency: dict[str, float] = {}  # the teacher row's medians, the students' time base

    # ------------------------------------------------------------------------------------ pieces

    def _cost(self, model, path: Path) -> dict[str, Any]:
        return {
            "params": count_parameters(model),
            "flops_per_token": flops_per_token(model.config, seq_len=self.max_length),
            "size_mb": round(size_on_disk(path) / 2**20, 2),
        }

    def _intrinsic(self, model) -> dict[str, float]:
        texts = [t for ts in self.texts.values() for t in ts]
        head = has_lm_head(model)
        if head == "mlm":
            return {"intrinsic/mlm_perplexity": masked_lm_perplexity(model, self.tokenizer, texts,
                                                           max_length=self.max_length)["mlm_perplexity"]}
        if head == "causal-lm":
            return {"intrinsic/perplexity": causal_perplexity(model, self.tokenizer, texts,
                                                    max_length=self.max_length)["perplexity"]}
        return {}

    def _tasks(self, path: Path) -> dict[str, float]:
        row: dict[str, float] = {}
        spec = self.spec
        for task in spec.tasks:
            result = evaluate_task(str(path), task, mode=spec.mode, seeds=tuple(spec.seeds),
                                   max_train=spec.max_train, max_eval=spec.max_eval, max_length=self.max_length)
            for metric, stats in result["metrics"].items():
                row[f"{task}/{metric}"] = stats["mean"]
                row[f"{task}/{metric}_std"] = stats["std"]
        return row

    def _crosslingual(self, path: Path) -> dict[str, float]:
        """``<task>[<lang>]/<metric>`` (and ``_std``) per language, ``<task>[others]/<metric>``: their mean
        over the languages other than the training one (evaluation/crosslingual.py)."""
        spec = self.spec.crosslingual
        if spec is None:
            return {}
        from tadistill.evaluation.crosslingual import crosslingual_transfer

        result = crosslingual_transfer(str(path), spec.task, train_language=spec.train_language,
                                       languages=spec.languages, mode=self.spec.mode, seeds=tuple(self.spec.seeds),
                                       max_train=self.spec.max_train, max_eval=self.spec.max_eval,
                                       max_length=self.max_length, trust_remote_code=self.trust_remote_code)
        row: dict[str, float] = {}
        for lang, scores in result["languages"].items():
            for metric, stats in scores["metrics"].items():
                row[f"{spec.task}[{lang}]/{metric}"] = stats["mean"]
                row[f"{spec.task}[{lang}]/{metric}_std"] = stats["std"]
        if result["mean_other"] is not None:
            row[f"{spec.task}[others]/{result['headline']}"] = result["mean_other"]
        return row

    def _latency_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": len(self.tokenizer), "seq_len": self.max_length}

    # ------------------------------------------------------------------------------------ public

    def evaluate_teacher(self) -> dict[str, Any]:
        path = Path(resolve_model_path(self.teacher_name))
        row: dict[str, Any] = {"model": "teacher", "path": self.teacher_name, **self._cost(self.teacher, path)}
        if self.spec.latency:
            row.update(flatten_latency(measure_latency(self.teacher, **self._latency_kwargs())))
            self._teacher_latency = reference_from_row(row)
        row.update(self._intrinsic(self.teacher))
        row.update(self._tasks(path))
        row.update(self._crosslingual(path))
        if self.spec.zero_shot_tasks and has_lm_head(self.teacher) == "causal-lm":
            row.update(zero_shot(str(path), self.spec.zero_shot_tasks))
        return row

    def evaluate_student(self, path: str | Path, *, name: str | None = None,
                         teacher_row: dict | None = None) -> dict[str, Any]:
        path = Path(path)
        student = _load_with_head(str(path), trust_remote_code=self.trust_remote_code, what="student").eval()
        row: dict[str, Any] = {"model": name or path.parent.name, "path": str(path), **self._cost(student, path)}
        # Per language of a multilingual study: fidelity[<lang>]/<metric>, and fidelity/<metric> their mean.
        row.update(fidelity_row(fidelity_by_language(self.teacher, student, self.tokenizer, self.texts,
                                                     max_length=self.max_length)))
        if self.spec.latency:
            both = compare_latency(self.teacher, student, **self._latency_kwargs())
            # One measurement for the whole table: the teacher row's latency is the reference, the student's
            # is that reference divided by the interleaved speedup (a study may evaluate its students in
            # later sessions, on a busier or idler machine, than its teacher row).
            reference = reference_from_row(teacher_row) if teacher_row is not None else self._teacher_latency
            row.update(flatten_latency(in_reference_time(both, reference)))
            row.update({f"speedup_b{k.removeprefix('batch_')}": v for k, v in both["speedup"].items()})
            for key in both["speedup"]:
                batch = key.removeprefix("batch_")
                row[f"latency_b{batch}_interleaved_ms"] = both["student"][key]["median_ms"]
                row[f"latency_b{batch}_teacher_interleaved_ms"] = both["teacher"][key]["median_ms"]
        row.update(self._intrinsic(student))
        row.update(self._tasks(path))
        row.update(self._crosslingual(path))
        if self.spec.zero_shot_tasks and has_lm_head(student) == "causal-lm":
            row.update(zero_shot(str(path), self.spec.zero_shot_tasks))
        return row
