"""The lm-evaluation-harness adapter: a clear error without the extra, and flattened results with it."""

from __future__ import annotations

import sys
import types

import pytest

from tadistill.errors import ConfigError
from tadistill.evaluation.zero_shot import zero_shot


def test_missing_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="pip install 'tadistill\\[lm-eval\\]'"):
        zero_shot("some/model", ["hellaswag"])


def test_results_are_flattened(monkeypatch):
    calls = {}

    def simple_evaluate(**kwargs):
        calls.update(kwargs)
        return {"results": {"hellaswag": {"alias": "hellaswag", "acc,none": 0.31, "acc_stderr,none": 0.01},
                            "piqa": {"acc_norm,none": 0.6}}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    row = zero_shot("runs/x/student", ["hellaswag", "piqa"], limit=5)
    assert row == {"zero_shot/hellaswag/acc": 0.31, "zero_shot/hellaswag/acc_stderr": 0.01,
                   "zero_shot/piqa/acc_norm": 0.6}
    assert calls["model"] == "hf" and calls["model_args"] == "pretrained=runs/x/student" and calls["limit"] == 5
