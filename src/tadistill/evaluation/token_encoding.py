"""What the token-level tasks share: a fast tokenizer, frozen last hidden states, the fine-tuning optimizer.

Token tasks need to know which tokens come from which word or character, for any tokenizer family
(WordPiece, byte-level BPE, SentencePiece): they read the character offsets that fast (Rust-backed)
tokenizers return, never the tokens' text. The probe reads the last hidden states through the same
capture hooks as :func:`tadistill.evaluation.downstream.encode_features`, so a decoder-only model and
an encoder give the same thing: the output of their last block.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from tadistill.capture.architectures import resolve_architecture
from tadistill.capture.hooks import CaptureRequest, capture
from tadistill.errors import ModelError
from tadistill.evaluation.downstream import _with_pad_token


def token_tokenizer(tokenizer):
    """The tokenizer, padding on the right (a copy when it was not), or ModelError when it is not a fast one."""
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"token-level tasks need a fast tokenizer (character offsets), and {type(tokenizer).__name__} "
                         "is not one: save the model with a tokenizer.json")
    tokenizer = _with_pad_token(tokenizer)
    if tokenizer.padding_side != "right":
        # Position 0 must be a real token: the no-answer position of extractive QA.
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.padding_side = "right"
    return tokenizer


def model_inputs(tokenizer, enc, device: torch.device) -> dict[str, Tensor]:
    """The tensors of ``enc`` that the tokenizer's model takes, on ``device``."""
    names = getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"]
    return {k: enc[k].to(device) for k in names if k in enc}


@contextmanager
def last_hidden_states(model: nn.Module) -> Iterator:
    """Yield ``run(inputs) -> (B, T, d)`` float32 last hidden states of the frozen model, in inference mode.

    Eval mode inside; the model's training mode is restored on exit.
    """
    arch = resolve_architecture(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), capture(model, arch, CaptureRequest(hidden=(arch.num_layers,))) as cap:

            def run(inputs: dict[str, Tensor]) -> Tensor:
                model(**inputs)
                return cap.hidden[arch.num_layers].float()

            yield run
    finally:
        model.train(was_training)


def adamw_with_warmup(model: nn.Module, *, lr: float, weight_decay: float, total_steps: int,
                      warmup_ratio: float) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay on matrices only) with linear warmup then linear decay to 0: the protocol of
    :func:`tadistill.evaluation.downstream.finetune` (BERT's GLUE and SQuAD fine-tuning, Devlin et al. 2019)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine(total_steps: int):
    """Cosine decay of the probe heads' learning rate over ``total_steps`` (as in downstream's probe)."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))


def load_token_model(model_path: str, auto_class, *, what: str, trust_remote_code: bool, tokenizer,
                     **kwargs) -> nn.Module:
    """``auto_class.from_pretrained`` in float32 with safetensors, or a one-line ModelError."""
    from tadistill.loading import resolve_model_path

    try:
        model = auto_class.from_pretrained(resolve_model_path(model_path), use_safetensors=True,
                                           trust_remote_code=trust_remote_code, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"model {model_path!r} could not be loaded for {what} ({reason}): pass a local folder with "
                         "safetensors weights, or use mode 'probe'") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model
