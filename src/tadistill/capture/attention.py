"""Attention scores recomputed from captured Q and K (pure tensor math).

Attention maps are not requested from the model (``output_attentions`` would force the slow eager
kernel); they are recomputed from the Q and K projection outputs that ``tadistill.capture.capture``
keeps, as softmax(Q K^T / sqrt(d_k)) (Vaswani et al. 2017, eq. 1). This is exact for absolute-position
models (the BERT family, ViT, HuBERT, wav2vec2, GPT-2) and lets the model keep its fast SDPA / flash
kernels. For rotary models (Llama, Qwen2, Mistral) the projections are captured before the rotary
embedding, so these are the pre-rotary maps, not the ones the model attends with; relation objectives
on Q/K/V (MiniLMv2) do not need the model's own maps.

No masking happens here: the objectives mask padded keys (and future keys for decoders) themselves.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, H*dh) -> (B, H, T, dh), heads taken as consecutive slices of the last dim (HF layout)."""
    if x.ndim != 3:
        raise ValueError(f"expected (B, T, H*dh), got shape {tuple(x.shape)}")
    width = x.shape[-1]
    if width % num_heads:
        raise ValueError(f"last dim {width} is not divisible by num_heads={num_heads}")
    return x.unflatten(-1, (num_heads, width // num_heads)).transpose(1, 2)


def attention_logits(query: Tensor, key: Tensor, *, num_heads: int, num_kv_heads: int | None = None) -> Tensor:
    """Pre-softmax attention scores Q K^T / sqrt(dh), float32.

    query: (B, T, H*dh); key: (B, T, Hkv*dh) with Hkv = num_kv_heads (default H).
    Returns (B, H, T, T): [b, h, t, s] is the score of query position t for key position s.
    Grouped-query attention (Ainslie et al. 2023): query head h uses kv head h // (H / Hkv), i.e. each
    kv head is repeated H/Hkv times in a row, as Hugging Face's repeat_kv does.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    # Upcast before the matmul and keep autocast out: bf16 scores lose the precision the softmax and
    # the KL / MSE objectives need.
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = split_heads(query.float(), num_heads)  # (B, H, T, dh)
        k = split_heads(key.float(), num_kv_heads)  # (B, Hkv, T, dh)
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"query head_dim {q.shape[-1]} != key head_dim {k.shape[-1]}")
        if num_kv_heads != num_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # (B, H, T, dh)
        return torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
