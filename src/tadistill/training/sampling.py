"""Continuations sampled from a causal LM, for on-policy distillation (GKD, Agarwal et al. 2024, alg. 1).

Each micro-batch first draws where its continuations come from (``draw_source``): the dataset, the
student (on-policy, probability lambda) or the teacher (sequence-level KD, Kim & Rush 2016). Sampled
continuations replace the dataset's after each prompt; sampling takes no gradient. Both draws use
explicit ``torch.Generator`` objects seeded from (train.seed, batch number), so a resumed run and a
lane trained inside a study sample exactly what a solo run samples.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tadistill.config import OnPolicyConfig

SOURCES = ("dataset", "student", "teacher", "replay")  # replay: DistiLLM's buffer


def draw_source(cfg: OnPolicyConfig, generator: torch.Generator) -> str:
    """'student' with probability cfg.fraction, 'teacher' with cfg.teacher_fraction, else 'dataset'."""
    u = float(torch.rand((), generator=generator))
    if u < cfg.fraction:
        return "student"
    if u < cfg.fraction + cfg.teacher_fraction:
        return "teacher"
    return "dataset"


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """(B, V) logits with everything outside the nucleus set to -inf (Holtzman et al. 2020).

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``; the
    most likely token is always kept.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # Drop a token when the mass of the tokens strictly before it already reaches top_p.
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """(B, V) logits of the last position -> (B,) sampled token ids."""
    logits = top_p_filter(logits.float() / temperature, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    prompts: list[Tensor],
    *,
    max_length: int,
    max_new_tokens: int | None,
    temperature: float,
    top_p: float,
    eos_id: int | None,
    pad_id: int,
    generator: torch.Generator,
) -> list[Tensor]:
    """Sample a continuation of every prompt; return prompt + continuation per row, on the CPU.

    Args:
        model: a causal LM (``*ForCausalLM``); run in eval mode (no dropout), restored afterwards.
        prompts: 1-D token-id tensors of any lengths >= 1.
        max_length: no returned sequence is longer (the continuation is cut).
        max_new_tokens: tokens sampled per prompt at most; None fills up to ``max_length``.
        eos_id: generation of a row stops after it samples this token (kept: the student learns to stop);
            None samples the full length.
        generator: on the model's device; the only source of randomness.

    Prompts are left-padded into one batch with explicit position ids, so every row continues from its
    own last token; one forward per new token with the key-value cache.
    """
    device = next(model.parameters()).device
    lengths = torch.tensor([p.numel() for p in prompts])
    width = int(lengths.max())
    budget = max_length - int(lengths.min())
    steps = min(budget, max_new_tokens) if max_new_tokens else budget
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.numel():] = prompt
        attention[row, width - prompt.numel():] = 1
    ids, attention = ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp_min(0)  # (B, P): 0 at each row's first real token
    was_training = model.training
    model.eval()
    new: list[Tensor] = []
    try:
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1)
        last = positions[:, -1]
        for _ in range(max(steps, 0)):
            token = _next_token(out.logits[:, -1], temperature, top_p, generator)  # (B,)
            token = token.masked_fill(finished, pad_id)
            new.append(token)
            if eos_id is not None:
                finished |= token == eos_id
            if bool(finished.all()) or len(new) == steps:
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            last = last + 1
            out = model(input_ids=token[:, None], attention_mask=attention, position_ids=last[:, None],
                        past_key_values=out.past_key_values, use_cache=True)
    finally:
        model.train(was_training)
    sampled = torch.stack(new, dim=1).cpu() if new else torch.empty((len(prompts), 0), dtype=torch.long)
    sequences = []
    for row, prompt in enumerate(prompts):
        continuation = sampled[row, : max(max_length - prompt.numel(), 0)]
        if eos_id is not None:
            stop = (continuation == eos_id).nonzero()
            if stop.numel():
                continuation = continuation[: int(stop[0]) + 1]  # nothing after the end of the sample
        sequences.append(torch.cat([prompt.cpu().long(), continuation]))
    return sequences
