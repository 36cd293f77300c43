"""Reaching model internals: resolve where they live, capture them with hooks, rebuild attention.

* ``resolve_architecture(model)`` -> ``Architecture`` (fails at setup when a name does not resolve);
* ``with capture(model, arch, CaptureRequest(hidden=..., qkv=...)) as captured:`` keeps the requested
  hidden states and Q/K/V projection outputs of every forward pass in ``captured``;
* ``attention_logits(q, k, num_heads=...)`` recomputes attention scores from the captured Q and K.
"""

from __future__ import annotations

from tadistill.capture.architectures import Architecture, get_module, resolve_architecture
from tadistill.capture.attention import attention_logits, split_heads
from tadistill.capture.hooks import Captured, CaptureRequest, capture

__all__ = [
    "Architecture",
    "CaptureRequest",
    "Captured",
    "attention_logits",
    "capture",
    "get_module",
    "resolve_architecture",
    "split_heads",
]
