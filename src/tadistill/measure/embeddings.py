"""Sentence embeddings of a model and the teacher-student cosine between them.

``sentence_embeddings`` mean-pools the last hidden states (sentence-transformers' pooling);
``embedding_cosine`` is the quick check written into every run summary (equal widths only);
``TeacherEmbeddings`` computes the teacher's side once per run or study. The full comparison
(``evaluation.fidelity``) reuses ``mean_pool``.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tadistill.capture.architectures import resolve_architecture
from tadistill.capture.hooks import CaptureRequest, capture
from tadistill.measure.inference import evaluating


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T, d), (B, T) -> (B, d): average of the valid tokens (sentence-transformers' mean pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


@torch.inference_mode()
def sentence_embeddings(
    model: nn.Module, tokenizer, texts: list[str], *, max_length: int = 128, batch_size: int = 32
) -> Tensor:
    """(N, d) float32 mean-pooled last hidden states (works for base and head models alike), in text order.

    Texts are batched in order of their token count, so that a batch pads its texts to a similar length:
    held-out paragraphs run from a few tokens to ``max_length``, and batches in text order spent most of
    their compute on padding (2.5x the time on the built-in corpus, CPU). Batching changes an embedding
    by float rounding only.
    """
    arch = resolve_architecture(model)
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)  # stable: ties keep the text order
    out = []
    with evaluating(model), capture(model, arch, CaptureRequest(hidden=(arch.num_layers,))) as cap:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                [texts[i] for i in order[start : start + batch_size]], padding=True, truncation=True,
                max_length=max_length, return_tensors="pt",
            )
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            model(**enc)
            out.append(mean_pool(cap.hidden[arch.num_layers].float(), enc["attention_mask"]).cpu())
    embeddings = torch.cat(out)  # (N, d) in length order
    return embeddings[torch.tensor(order).argsort()]  # back to text order


def embedding_cosine(
    teacher: nn.Module, student: nn.Module, tokenizer, texts: list[str], *,
    teacher_embeddings: Tensor | None = None, **kwargs,
) -> float | None:
    """Mean cosine similarity of teacher and student sentence embeddings of the same texts.

    Defined only when both have the same width (otherwise there is no common space; None): the widths
    are compared first, so a mismatch runs neither model. ``teacher_embeddings``: the teacher's
    ``sentence_embeddings(teacher, tokenizer, texts, **kwargs)`` computed beforehand (the teacher is then
    not run; see ``TeacherEmbeddings``). ``kwargs``: ``sentence_embeddings``' max_length / batch_size.
    """
    if teacher_embeddings is None:
        width = resolve_architecture(teacher).hidden_size
    else:
        width = teacher_embeddings.shape[-1]
    if width != resolve_architecture(student).hidden_size:
        return None
    if teacher_embeddings is None:
        teacher_embeddings = sentence_embeddings(teacher, tokenizer, texts, **kwargs)
    a, b = teacher_embeddings, sentence_embeddings(student, tokenizer, texts, **kwargs)
    if a.shape[-1] != b.shape[-1]:  # last hidden states of another width than the config's hidden_size
        return None
    return float(F.cosine_similarity(a, b, dim=-1).mean())


class TeacherEmbeddings:
    """A teacher's sentence embeddings of fixed texts, computed on first use and then reused.

    A run (or a study's lanes) compares every student with the same teacher on the same held-out texts,
    before and after training: the teacher's side is computed once. Entries are keyed by the
    ``sentence_embeddings`` keywords and the teacher's parameter device and dtype: the trainer moves
    the teacher onto the accelerator (and to bf16 under bf16 precision), after which its embeddings
    are computed afresh, once, so every cosine equals what ``embedding_cosine`` alone gives. The
    teacher is not held (it is passed per call), so dropping it frees its memory.
    """

    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.tokenizer = tokenizer
        self.texts = list(texts)
        self._entries: dict[tuple, tuple[weakref.ref, Tensor]] = {}

    def get(self, teacher: nn.Module, **kwargs) -> Tensor:
        """(N, d) float32: ``sentence_embeddings(teacher, tokenizer, texts, **kwargs)``, cached."""
        p = next(teacher.parameters())
        key = (id(teacher), str(p.device), p.dtype, tuple(sorted(kwargs.items())))
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is teacher:
            return hit[1]
        embeddings = sentence_embeddings(teacher, self.tokenizer, self.texts, **kwargs)
        self._entries[key] = (weakref.ref(teacher), embeddings)
        return embeddings

    def cosine(self, teacher: nn.Module, student: nn.Module, **kwargs) -> float | None:
        """``embedding_cosine(teacher, student, tokenizer, texts, **kwargs)`` with the teacher's side cached."""
        if resolve_architecture(teacher).hidden_size != resolve_architecture(student).hidden_size:
            return None  # no common space: the teacher is not run either
        return embedding_cosine(teacher, student, self.tokenizer, self.texts,
                                teacher_embeddings=self.get(teacher, **kwargs), **kwargs)
