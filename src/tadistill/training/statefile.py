"""State trees in one safetensors file, without pickle: the tensors as tensors, the rest as JSON.

A checkpoint holds state that is not model weights: optimizer moments, a scheduler's counters, random
generator states, a replay buffer. ``torch.save`` would pickle it, and loading a pickle runs whatever
code the file names, so a checkpoint folder someone else could write to would be a way in. Here a
tree of dicts, lists, tuples, str, int, float, bool, None and Tensors is split into its tensors
(stored by safetensors, which only ever reads numbers) and a JSON skeleton stored in the same file's
metadata, where each tensor is ``{"__tensor__": "<key>"}``. Tuples and dicts with non-string keys
(an optimizer's per-parameter state is keyed by int) are tagged so the tree comes back exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_META_KEY = "tadistill_tree"
_TAGS = ("__tensor__", "__tuple__", "__dict__")


class StateFileError(ValueError):
    """A state file is not what ``save_tree`` writes (damaged, or written by something else)."""


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        # A copy on the CPU: safetensors refuses views that share storage (and tied tensors would alias).
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {"__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")]
                             for k, v in value.items()]}
    raise TypeError(f"checkpoint state {where or '<root>'} is a {type(value).__name__}: only dicts, lists, tuples, "
                    "str, int, float, bool, None and tensors are saved")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in _TAGS:
        (tag, inner), = value.items()
        if tag == "__tensor__":
            if inner not in tensors:
                raise StateFileError(f"tensor {inner!r} is missing")
            return tensors[inner]
        if not isinstance(inner, list):
            raise StateFileError(f"{tag} holds no list")
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in inner)
        if not all(isinstance(p, list) and len(p) == 2 for p in inner):
            raise StateFileError("__dict__ holds no [key, value] pairs")
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in inner}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    try:
        hash(key)
    except TypeError:
        raise StateFileError("a dict key is not hashable") from None
    return key


def save_tree(tree: Any, path: Path) -> None:
    """Write ``tree`` to ``path`` (a .safetensors file); TypeError names the first value that cannot be saved."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors, "")
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(skeleton)})


def load_tree(path: Path) -> Any:
    """Read a tree written by ``save_tree`` (tensors on the CPU); StateFileError when it is not one."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            # Copies: safe_open's tensors map the file, which a later prune deletes (its space would stay in
            # use) and which anything truncating it would turn into a SIGBUS.
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a damaged header or body
        raise StateFileError(f"{path.name} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    if _META_KEY not in meta:
        raise StateFileError(f"{path.name} holds no state tree")
    try:
        skeleton = json.loads(meta[_META_KEY])
    except ValueError:
        raise StateFileError(f"{path.name}: its state tree is not JSON") from None
    return _decode(skeleton, tensors)
