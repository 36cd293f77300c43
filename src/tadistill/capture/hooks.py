"""Capture hidden states and Q/K/V projections with forward hooks, inside a context manager.

Hidden-state indices follow Hugging Face's ``output_hidden_states``: index 0 is the input of block 0
(the embeddings output), index i (1 <= i <= L) is the output of block i, and index L is taken AFTER
``Architecture.final_norm`` when the model has one, so it always equals the model's
``last_hidden_state``. For GPT-2 and Llama-style models this is exactly ``hidden_states[L]``; ViT,
HuBERT and wav2vec2 with stable layer norm are the exceptions: Hugging Face returns their last block
output before the final norm as ``hidden_states[L]`` (``tie_last_hidden_states=False``), tadistill
returns the normed one.

Q/K/V are the raw projection outputs, shapes (B, T, H*dh) and (B, T, Hkv*dh): before heads are split,
before any rotary embedding and before the 1/sqrt(dh) scaling.

Only the hooks the request needs are registered, on submodules (so the model may be wrapped in DDP or
FSDP afterwards), and they stay registered for the whole ``with`` block: one registration serves a
whole training run. Each forward of the model clears the previous tensors first and checks afterwards
that every requested tensor was produced. Stored tensors are the module outputs themselves (no
detach, no copy), so a student's captures carry gradients; teacher captures made under
``torch.inference_mode`` must go through ``Captured.clone()`` before autograd code touches them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tadistill.capture.architectures import Architecture, get_module
from tadistill.errors import ArchitectureError, ConfigError


@dataclass(frozen=True)
class CaptureRequest:
    """Which internals to keep.

    hidden: hidden-state indices 0..L (0 = embeddings output, i = output of block i, L after the
        final norm). qkv: 1-based block indices whose Q, K and V projection outputs are kept.
    Indices are stored sorted and without duplicates.
    """

    hidden: tuple[int, ...] = ()
    qkv: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("hidden", "qkv"):
            values = tuple(getattr(self, name))
            if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise ConfigError(f"CaptureRequest.{name} must hold integer layer indices, got {values!r}")
            object.__setattr__(self, name, tuple(sorted(set(values))))

    def union(self, other: CaptureRequest) -> CaptureRequest:
        """One request that keeps everything either request keeps (several objectives, one model)."""
        return CaptureRequest(hidden=self.hidden + other.hidden, qkv=self.qkv + other.qkv)


@dataclass
class Captured:
    """Tensors captured in the latest forward pass, keyed by hidden-state index or 1-based block.

    hidden[i]: (B, T, d). query[i]: (B, T, num_heads * head_dim). key[i], value[i]:
    (B, T, num_kv_heads * head_dim). Dtype and device are those of the model.
    """

    hidden: dict[int, Tensor] = field(default_factory=dict)
    query: dict[int, Tensor] = field(default_factory=dict)
    key: dict[int, Tensor] = field(default_factory=dict)
    value: dict[int, Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        """Drop every stored tensor (the dicts are emptied in place)."""
        for store in (self.hidden, self.query, self.key, self.value):
            store.clear()

    def clone(self) -> Captured:
        """A new Captured holding ``.clone()`` of every tensor.

        Cloning outside ``torch.inference_mode`` turns inference tensors (teacher forward) into normal
        tensors that autograd code may use; it also protects them from the next forward's overwrite.
        """
        return Captured(
            hidden={i: t.clone() for i, t in self.hidden.items()},
            query={i: t.clone() for i, t in self.query.items()},
            key={i: t.clone() for i, t in self.key.items()},
            value={i: t.clone() for i, t in self.value.items()},
        )


@contextmanager
def capture(model: nn.Module, arch: Architecture, request: CaptureRequest) -> Iterator[Captured]:
    """Register the hooks ``request`` needs on ``model`` and yield the Captured they fill.

    ``arch`` must come from ``resolve_architecture(model)`` (or describe ``model`` by hand). Raises
    ConfigError at entry for an index out of range; every hook is removed on exit, exception or not.
    """
    _validate(type(model).__name__, arch, request)
    captured = Captured()
    handles: list[RemovableHandle] = []
    try:
        if request.hidden or request.qkv:
            blocks = get_module(model, arch.layers)
            if not isinstance(blocks, nn.ModuleList) or len(blocks) != arch.num_layers:
                raise ArchitectureError(
                    f"{type(model).__name__}.{arch.layers} does not hold {arch.num_layers} blocks: resolve "
                    "the architecture from this very model"
                )
            handles += _register_hidden(model, arch, blocks, request.hidden, captured)
            handles += _register_qkv(arch, blocks, request.qkv, captured)
            handles += _register_pass_bookends(model, request, captured)
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------------
# Validation and hook registration
# ----------------------------------------------------------------------------------------------------


def _validate(cls: str, arch: Architecture, request: CaptureRequest) -> None:
    n = arch.num_layers
    ranges = f"hidden-state indices 0..{n}, blocks 1..{n}"
    for i in request.hidden:
        if not 0 <= i <= n:
            raise ConfigError(f"layer {i} is out of range for {cls} with {n} layers ({ranges}): pick one in range")
    for i in request.qkv:
        if not 1 <= i <= n:
            raise ConfigError(
                f"layer {i} is out of range for the Q/K/V of {cls} with {n} layers ({ranges}; Q/K/V "
                "blocks are 1-based): pick one in range"
            )


def _block_hidden(output: Any, where: str) -> Tensor:
    """The hidden state in a block output: the tensor itself or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ArchitectureError(f"{where} returned {type(output).__name__}, not a tensor or tuple: not supported")


def _register_hidden(
    model: nn.Module, arch: Architecture, blocks: nn.ModuleList, indices: tuple[int, ...], captured: Captured
) -> list[RemovableHandle]:
    handles = []
    cls = type(model).__name__
    for i in indices:
        if i == 0:
            # Block 0's input is the embeddings output; HF passes it positionally or as a keyword.
            handles.append(blocks[0].register_forward_pre_hook(_store_block_input(captured, cls), with_kwargs=True))
        elif i == arch.num_layers and arch.final_norm is not None:
            norm = get_module(model, arch.final_norm)
            handles.append(norm.register_forward_hook(_store_output(captured.hidden, i, f"{cls}.{arch.final_norm}")))
        else:
            where = f"{cls} block {i}"
            handles.append(blocks[i - 1].register_forward_hook(_store_output(captured.hidden, i, where)))
    return handles


def _register_qkv(
    arch: Architecture, blocks: nn.ModuleList, layers: tuple[int, ...], captured: Captured
) -> list[RemovableHandle]:
    handles = []
    for i in layers:
        block = blocks[i - 1]
        if arch.fused_qkv is not None:
            sizes = (arch.num_heads * arch.head_dim, *(2 * [arch.num_kv_heads * arch.head_dim]))
            handles.append(get_module(block, arch.fused_qkv).register_forward_hook(_store_fused(captured, i, sizes)))
            continue
        for path, store in ((arch.query, captured.query), (arch.key, captured.key), (arch.value, captured.value)):
            assert path is not None  # guaranteed by Architecture.__post_init__
            handles.append(get_module(block, path).register_forward_hook(_store_output(store, i, path)))
    return handles


def _register_pass_bookends(model: nn.Module, request: CaptureRequest, captured: Captured) -> list[RemovableHandle]:
    """Clear before each forward of ``model``; after it, check that nothing requested is missing.

    Without the check, a block skipped by LayerDrop (HuBERT / wav2vec2 in training mode) would leave
    the previous batch's tensor in place and the loss would silently use stale activations.
    """

    def before(module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.clear()

    def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        missing = [f"hidden state {i}" for i in request.hidden if i not in captured.hidden]
        missing += [f"Q/K/V of block {i}" for i in request.qkv if i not in captured.value]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)} of {type(model).__name__} not produced by this forward pass (a block "
                "was skipped, e.g. by LayerDrop): set layerdrop=0.0 in the model config"
            )

    return [model.register_forward_pre_hook(before), model.register_forward_hook(after)]


# ----------------------------------------------------------------------------------------------------
# Hook factories (closures bind the index now, not at call time)
# ----------------------------------------------------------------------------------------------------


def _recomputing() -> bool:
    """Whether this forward is activation checkpointing's recomputation inside backward: the loss already read
    the first forward's tensors, so storing again would only keep a block's graph alive until the next batch."""
    if torch.compiler.is_compiling():  # traced into a compiled forward: dynamo cannot read the autograd engine
        return False
    task = getattr(torch._C, "_current_graph_task_id", None)  # private: -1 outside a backward pass
    return task is not None and task() != -1


def _store_block_input(captured: Captured, cls: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if _recomputing():
            return
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, Tensor):
            raise ArchitectureError(
                f"{cls} block 0 got no hidden states (positional argument 0 or hidden_states=): not supported"
            )
        captured.hidden[0] = hidden  # (B, T, d)

    return hook


def _store_output(store: dict[int, Tensor], index: int, where: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not _recomputing():
            store[index] = _block_hidden(output, where)  # (B, T, width)

    return hook


def _store_fused(captured: Captured, index: int, sizes: tuple[int, ...]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if _recomputing():
            return
        # GPT-2's c_attn output is [q | k | v] along the last dim: (B, T, H*dh + 2*Hkv*dh).
        q, k, v = output.split(list(sizes), dim=-1)
        captured.query[index], captured.key[index], captured.value[index] = q, k, v

    return hook
