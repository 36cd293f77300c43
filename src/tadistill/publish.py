"""Publishing a finished run's student to the Hugging Face hub (``tadistill push RUN --repo-id ID``).

Only when the user asks, and only a run that finished: its ``summary.json`` and ``student/`` exist and the
summary's step count is the config's ``train.steps`` (a run stopped by ``train.stop_at``, a signal or a NaN
has written neither). The student folder is uploaded as it is (safetensors weights, config, tokenizer), in one
commit with a model card (``README.md``) written from the summary unless the folder has its own. The token is
huggingface_hub's (``HF_TOKEN`` or ``huggingface-cli login``); nothing here stores it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tadistill.errors import ConfigError, RunDirError
from tadistill.outdir import MARKER


def finished_student(run: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(student folder, summary, resolved config) of a finished run; RunDirError (one line) otherwise."""
    root = Path(run)
    if not (root / MARKER).is_file():
        raise RunDirError(f"{root} is not a tadistill run directory (no {MARKER}): give the --out folder of a run")
    summary_path, student = root / "summary.json", root / "student"
    config = _read_yaml(root / "config.yaml")
    steps = (config.get("train") or {}).get("steps")
    if not summary_path.is_file() or not (student / "config.json").is_file():
        raise RunDirError(f"run {root} has not finished (no summary.json or student/): finish it with tadistill "
                          "distill --resume before publishing it")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{summary_path} cannot be read ({type(exc).__name__}): the run looks damaged") from None
    done = summary.get("steps")
    if config.get("stages"):
        done = steps = None  # a chained run's summary is its last stage's; that stage wrote it when it finished
    if done is not None and steps is not None and done < steps:
        raise RunDirError(f"run {root} stopped at step {done} of {steps}: finish it with tadistill distill --resume "
                          "before publishing it")
    return student, summary, config


def model_card(summary: dict[str, Any], config: dict[str, Any], repo_id: str) -> str:
    """A short README.md: what the student is, how it was distilled, what it kept (from summary.json)."""
    teacher = config.get("teacher", "?")
    recipe = config.get("recipe") or "custom config"
    base = f"base_model: {teacher}\n" if isinstance(teacher, str) and teacher.count("/") == 1 and \
        not Path(teacher).exists() else ""
    rows = [f"| {k} | {v} |" for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    table = "\n".join(["| summary.json | value |", "|---|---|", *rows]) if rows else ""
    return (f"---\nlibrary_name: transformers\n{base}tags:\n- distillation\n- tadistill\n---\n\n"
            f"# {repo_id.split('/')[-1]}\n\n"
            f"A student distilled from `{teacher}` with tadistill (recipe `{recipe}`, "
            f"{(config.get('train') or {}).get('steps', '?')} steps). It loads with transformers' "
            "`AutoModel.from_pretrained` like any checkpoint.\n\n" + (table + "\n" if table else ""))


def push_student(run: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                 revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload the student of finished run ``run`` to hub repository ``repo_id`` (created if needed); its URL."""
    student, summary, config = finished_student(run)
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
    except ImportError:  # a dependency of transformers: only a broken installation lacks it
        raise ConfigError("publishing needs huggingface_hub: pip install huggingface_hub") from None
    files = sorted(p for p in student.rglob("*") if p.is_file())
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(student).as_posix(), path_or_fileobj=str(p))
                  for p in files]
    if not (student / "README.md").is_file():
        card = model_card(summary, config, repo_id).encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=commit_message or f"Upload student of {Path(run).name}",
                          repo_type="model", revision=revision)
    except Exception as exc:  # noqa: BLE001 - auth, network, a name the hub refuses: one line, the hub's reason
        lines = [line for line in str(exc).splitlines() if line.strip()]
        reason = lines[0][:200] if lines else type(exc).__name__
        raise ConfigError(f"could not push to {repo_id!r} ({reason}): check the id and your token (HF_TOKEN or "
                          "huggingface-cli login)") from None
    return str(url)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}
