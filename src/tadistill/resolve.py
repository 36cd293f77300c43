"""From (recipe, config file, --set overrides) to one validated DistillConfig.

Order: the recipe's YAML, then ``--config FILE`` (which may itself name a ``recipe:``), then each
``--set key=value`` left to right. Keys are dotted paths into the config schema; list entries of
``objectives`` are addressed by position or by kind (``objectives.minilmv2.relation_heads=24``).
Values are parsed as YAML (``3``, ``true``, ``[1, 2]``, ``null``). Mistakes become one-line
ConfigErrors that name the key and suggest the closest valid one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tadistill import config as C
from tadistill.errors import ConfigError, did_you_mean
from tadistill.registry import OBJECTIVES, RECIPES, recipe_path


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found: check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder: give the YAML file inside it") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text (a binary file?): give a YAML file") from None
    except OSError as exc:  # permission denied, a broken device ...
        raise ConfigError(f"{what} {path} cannot be read ({exc.strerror or exc}): check the file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}: fix the file") from None
    except RecursionError:  # deeply nested flow collections ([[[[...]]]]) exhaust the parser's stack
        raise ConfigError(f"{what} {path} is nested too deeply to be a config: fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of keys to values")
    return data


def recipe_dict(name: str) -> dict[str, Any]:
    """The raw dict of a shipped recipe."""
    if not isinstance(name, str):
        raise ConfigError(f"recipe must be a recipe name, got {name!r}: run 'tadistill recipes' to list them")
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}{did_you_mean(name, RECIPES)}: run 'tadistill recipes' to list them")
    data = _read_yaml(recipe_path(name), "recipe")
    data.setdefault("recipe", name)
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; lists and scalars in ``update`` replace those in ``base``."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _fields_of(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _objective_class(entry: dict[str, Any]) -> type[BaseModel] | None:
    kind = entry.get("kind") if isinstance(entry, dict) else None
    return OBJECTIVES[kind].config if kind in OBJECTIVES else None


def apply_override(data: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``key=value`` to the raw config dict, checking the key against the schema."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r} must look like key=value (e.g. train.steps=100)")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    data = copy.deepcopy(data)
    node: Any = data
    schema: type[BaseModel] | None = C.DistillConfig
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):  # objectives: address by position or by kind
            if part.isdigit() and int(part) < len(node):
                idx = int(part)
            else:
                kinds = [e.get("kind") for e in node if isinstance(e, dict)]
                if part not in kinds:
                    hint = did_you_mean(part, kinds) or f" (this config has {', '.join(map(str, kinds))})"
                    raise ConfigError(f"--set {key}: no objective {part!r}{hint}")
                idx = kinds.index(part)
            if last:
                node[idx] = value
                break
            if not isinstance(node[idx], dict):
                raise ConfigError(f"--set {key}: {where} is {node[idx]!r}, not an objective: set the whole entry")
            schema = _objective_class(node[idx])
            node = node[idx]
            continue
        if not isinstance(node, dict):
            parent = ".".join(parts[:i])
            raise ConfigError(f"--set {key}: {parent} is {node!r}, not a section: set {parent} itself or fix it first")
        if schema is not None and part not in schema.model_fields:
            raise ConfigError(f"unknown config key {where!r}{did_you_mean(part, _fields_of(schema))}")
        if last:
            node[part] = value
            break
        field = schema.model_fields[part] if schema is not None else None
        child = node.get(part)
        if child is None:
            child = [] if part == "objectives" else {}
            node[part] = child
        node = child
        nested = field.annotation if field is not None else None
        schema = nested if isinstance(nested, type) and issubclass(nested, BaseModel) else None
    return data


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown config key {loc!r}: remove it or check the spelling"
    if err["type"] == "union_tag_invalid":
        kind = err.get("input", {}).get("kind") if isinstance(err.get("input"), dict) else None
        return f"unknown objective kind {kind!r}{did_you_mean(str(kind), OBJECTIVES)} at {loc}"
    shown = err.get("input")
    got = f" (got {shown!r})" if shown is not None and not isinstance(shown, dict) else ""
    more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return f"config {loc}: {msg}{got}{more}"


def _suggest_unknown(data: dict[str, Any], schema: type[BaseModel], prefix: str = "") -> None:
    """Raise for the first unknown key with a did-you-mean (pydantic's message has no suggestion)."""
    for key, value in data.items():
        if key not in schema.model_fields:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{did_you_mean(str(key), _fields_of(schema))}")
        nested = schema.model_fields[key].annotation
        if isinstance(value, dict) and isinstance(nested, type) and issubclass(nested, BaseModel):
            _suggest_unknown(value, nested, f"{prefix}{key}.")
    for i, entry in enumerate(data.get("objectives") or []) if schema is C.DistillConfig else []:
        cls = _objective_class(entry)
        if cls is not None:
            _suggest_unknown(entry, cls, f"objectives.{i}.")


def build_config(data: dict[str, Any]) -> C.DistillConfig:
    """Validate a raw dict into a DistillConfig, with one-line errors."""
    _suggest_unknown(data, C.DistillConfig)
    try:
        return C.DistillConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def resolve_config(
    recipe: str | None = None, *, config_file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> C.DistillConfig:
    """Recipe, then config file, then overrides -> validated config."""
    _check_arguments(recipe, config_file, overrides)
    data: dict[str, Any] = {}
    file_data = _read_yaml(Path(config_file), "config file") if config_file else {}
    name = recipe or file_data.get("recipe")
    if name is None and not file_data:
        raise ConfigError("give a recipe name or --config FILE (run 'tadistill recipes' to list the recipes)")
    if name is not None:
        data = recipe_dict(name)
    data = _merge(data, file_data)
    if recipe:
        data["recipe"] = recipe
    for assignment in overrides:
        data = apply_override(data, assignment)
    return build_config(data)


def _check_arguments(recipe, config_file, overrides) -> None:
    """The Python API refuses, in one line, what the CLI's parser never passes (a bare string of overrides
    would be applied character by character)."""
    if recipe is not None and not isinstance(recipe, str):
        raise ConfigError(f"recipe must be a recipe name (a string), got {recipe!r}")
    if config_file is not None and not isinstance(config_file, (str, Path)):
        raise ConfigError(f"config_file must be a path, got {config_file!r}")
    if isinstance(overrides, (str, bytes)):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}: "
                          f"write overrides=[{overrides!r}]")
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got {overrides!r}")
