"""Zero-shot tasks for causal LMs through lm-evaluation-harness (the optional extra ``tadistill[lm-eval]``).

The harness is the field's standard for zero-shot evaluation (Gao et al., "A framework for few-shot
language model evaluation"); tadistill only hands it the student folder and flattens what it returns
into results-row keys ``zero_shot/<task>/<metric>``. The harness's tasks download their data from the
hub, so this works only where the hub (or its local cache) is reachable.
"""

from __future__ import annotations

from typing import Any

from tadistill.errors import ConfigError


def zero_shot(model_path: str, tasks: list[str], *, batch_size: int = 8, limit: int | None = None,
              device: str | None = None) -> dict[str, float]:
    """Run lm-evaluation-harness tasks on a causal LM folder; return ``{"zero_shot/<task>/<metric>": value}``."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(
            "zero-shot tasks need lm-evaluation-harness: pip install 'tadistill[lm-eval]' (or lm-eval)"
        ) from None
    model_args = f"pretrained={model_path}"
    kwargs: dict[str, Any] = {"model": "hf", "model_args": model_args, "tasks": list(tasks), "batch_size": batch_size}
    if limit is not None:
        kwargs["limit"] = limit
    if device is not None:
        kwargs["device"] = device
    results = lm_eval.simple_evaluate(**kwargs)
    row: dict[str, float] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for key, value in metrics.items():
            # The harness names metrics "acc,none", "acc_stderr,none", ...: keep the value, drop the filter.
            name = key.split(",", 1)[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "alias":
                row[f"zero_shot/{task}/{name}"] = float(value)
    return row
