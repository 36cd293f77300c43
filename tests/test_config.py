"""Config resolution: recipe -> file -> --set, typed validation, one-line errors with suggestions."""

from __future__ import annotations

import pytest
import yaml

from tadistill.config import DistillConfig
from tadistill.errors import ConfigError
from tadistill.resolve import apply_override, resolve_config


def test_overrides_are_typed_and_address_objectives_by_kind_or_position():
    cfg = resolve_config("tinybert-general", overrides=[
        "train.steps=7", "train.lr=3e-4", "student.init_layers=[0, 2]", "objectives.hidden.include_embeddings=false",
        "objectives.0.weight=2.5", "train.max_grad_norm=null",
    ])
    assert cfg.train.steps == 7 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.student.init_layers == [0, 2]
    assert cfg.objective("hidden").include_embeddings is False
    assert cfg.objectives[0].kind == "attention-mse" and cfg.objectives[0].weight == 2.5
    assert cfg.train.max_grad_norm is None


def test_config_file_merges_over_its_recipe(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"recipe": "minilmv2", "train": {"steps": 11}}))
    cfg = resolve_config(config_file=f, overrides=["train.batch_size=3"])
    assert cfg.recipe == "minilmv2" and cfg.train.steps == 11 and cfg.train.batch_size == 3
    assert cfg.train.lr == pytest.approx(6e-4)  # from the recipe
    assert cfg.objective("minilmv2").relation_heads == 48


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'lr'?)"),
        (["objectives.minilmv2.relation_head=4"], "did you mean 'relation_heads'?"),
        (["objectives.hiden.loss=mse"], "no objective 'hiden'"),
        (["train.schedule=cosin"], "train.schedule"),
        (["train.steps=-1"], "greater than or equal to 1"),
        (["data.heldout_fraction=1.5"], "data.heldout_fraction"),
        (["objectives.minilmv2.teacher_layer=last-9"], "teacher_layer"),
        (["steps"], "key=value"),
    ],
)
def test_bad_overrides_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        resolve_config("minilmv2", overrides=overrides)
    text = str(info.value)
    assert "\n" not in text and message in text


def test_unknown_objective_kind_is_named():
    with pytest.raises(ConfigError, match="unknown objective kind 'minilmv3'.*minilmv2"):
        resolve_config("minilmv2", overrides=["objectives=[{kind: minilmv3}]"])


def test_explicit_mapping_needs_layers_and_duplicate_kinds_are_refused():
    with pytest.raises(ConfigError, match="explicit"):
        resolve_config("hs", overrides=["objectives.hidden.mapping=explicit"])
    with pytest.raises(ConfigError, match="once"):
        resolve_config("hs", overrides=["objectives=[{kind: mlm}, {kind: mlm}]"])


def test_defaults_validate_without_a_recipe():
    cfg = DistillConfig(objectives=[{"kind": "hidden", "mapping": "last"}])
    assert cfg.teacher == "builtin" and cfg.objective("hidden").loss == "mse"


def test_apply_override_does_not_mutate_its_input():
    data = {"train": {"steps": 1}}
    out = apply_override(data, "train.steps=5")
    assert data["train"]["steps"] == 1 and out["train"]["steps"] == 5


def test_precision_no_survives_yaml():
    from tadistill.resolve import resolve_config

    assert resolve_config("hs", overrides=["train.precision=no"]).train.precision == "no"
