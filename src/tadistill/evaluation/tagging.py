"""Token classification (NER-style BIO tags) by a linear probe on frozen features, or by fine-tuning.

Both return ``{metric: (mean, std)}`` over seeds on the task's eval split, like
:mod:`tadistill.evaluation.downstream`: entity F1, precision and recall and token accuracy, as
fractions (:func:`tadistill.evaluation.ner_metrics.entity_scores`).

Words to tokens. The words of a sentence are joined by single spaces and tokenized as one text; a
word is represented by its FIRST sub-word token, the choice of BERT's CoNLL-2003 experiments (Devlin
et al. 2019, section 5.3), found from the tokenizer's character offsets. Sentences longer than
``max_length`` tokens are truncated: a word beyond it has no token, and is predicted ``O`` (the gold
entities there still count, as misses). The same holds for a word that tokenizes to nothing.

- ``tagging_probe``: features are the frozen last hidden states at each word's first token, computed
  once and standardized with the train split's mean and std; per seed, a softmax-regression head over
  the tag set is trained exactly like the sequence probe's (:func:`downstream._train_head`: Adam,
  L2 on the weights, cosine decay, the seed drawing the init and the batch order). Each word is
  classified on its own: the probe has no transition model (no CRF), so it may emit ``I-X`` after
  ``O``, which the CoNLL rules read as a new entity.
- ``tagging_finetune``: per seed, ``AutoModelForTokenClassification`` (new linear head on the last
  hidden states), cross-entropy on the first token of each word (other tokens ignored), AdamW with
  linear warmup and decay, gradient clipping at 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tadistill.errors import ConfigError, DataError
from tadistill.evaluation.downstream import (
    _check_seeds,
    _device,
    _fit_length,
    _summarize,
    _train_head,
)
from tadistill.evaluation.ner_metrics import entity_scores
from tadistill.evaluation.token_encoding import (
    adamw_with_warmup,
    last_hidden_states,
    load_token_model,
    model_inputs,
    token_tokenizer,
)
from tadistill.evaluation.token_tasks import Sentence, TaggingData, load_tagging_task

IGNORE = -100  # label of the tokens that are not a word's first (F.cross_entropy's ignore_index)


def encode_words(tokenizer, sentences: Sequence[Sentence], max_length: int, device: torch.device
                 ) -> tuple[dict[str, Tensor], list[list[int | None]]]:
    """Tokenize sentences (words joined by spaces); return the model inputs (B, T) and, per sentence,
    the position of each word's first token (None for a word that was truncated or has no token)."""
    texts, starts = [], []
    for words, _ in sentences:
        offsets, position = [], 0
        for word in words:
            offsets.append(position)
            position += len(word) + 1
        texts.append(" ".join(words))
        starts.append(offsets)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_offsets_mapping=True,
                    return_special_tokens_mask=True, return_tensors="pt")
    firsts = []
    for b, (text, word_starts) in enumerate(zip(texts, starts)):
        owner = [-1] * len(text)  # character -> word index (-1: a separating space)
        for w, (start, word) in enumerate(zip(word_starts, sentences[b][0])):
            owner[start : start + len(word)] = [w] * len(word)
        first: list[int | None] = [None] * len(word_starts)
        special = enc["special_tokens_mask"][b].tolist()
        for t, (s, e) in enumerate(enc["offset_mapping"][b].tolist()):
            if special[t] or e <= s:
                continue  # [CLS], [SEP], padding
            while s < e and owner[s] < 0:
                s += 1  # a SentencePiece / BPE token may start with the space before its word
            if s < e and first[owner[s]] is None:
                first[owner[s]] = t
        firsts.append(first)
    return model_inputs(tokenizer, enc, device), firsts


def word_features(model: nn.Module, tokenizer, sentences: Sequence[Sentence], *, max_length: int,
                  batch_size: int) -> tuple[Tensor, list[list[int | None]]]:
    """(K, d) float32 frozen last hidden states at the words' first tokens, and per sentence the row of
    each word in them (None: the word has no token)."""
    device = next(model.parameters()).device
    rows: list[Tensor] = []
    where: list[list[int | None]] = []
    count = 0
    with last_hidden_states(model) as run:
        for start in range(0, len(sentences), batch_size):
            inputs, firsts = encode_words(tokenizer, sentences[start : start + batch_size], max_length, device)
            hidden = run(inputs)  # (B, T, d)
            for b, first in enumerate(firsts):
                kept = [t for t in first if t is not None]
                if kept:
                    rows.append(hidden[b, kept])  # (words kept, d)
                where.append([None if k is None else count + k for k in _running_index(first)])
                count += len(kept)
    d = getattr(model.config, "hidden_size", None) or 1
    features = torch.cat(rows) if rows else torch.zeros(0, d, device=device)
    # Cloned outside inference mode: inference tensors cannot be saved for the head's backward pass.
    return features.clone(), where


def _running_index(first: list[int | None]) -> list[int | None]:
    """[5, None, 7] -> [0, None, 1]: the index of each kept word among the kept words of its sentence."""
    out, k = [], 0
    for t in first:
        out.append(None if t is None else k)
        k += t is not None
    return out


def tagging_probe(model: nn.Module, tokenizer, data: TaggingData, *, seeds: Sequence[int] = (0, 1, 2),
                  max_length: int = 128, batch_size: int = 32, epochs: int = 20,
                  l2: float = 1e-3) -> dict[str, tuple[float, float]]:
    """Train a linear tag classifier on frozen first-token features, once per seed; score entity F1 on eval."""
    seeds = _check_seeds(seeds)
    if epochs < 1 or l2 < 0:
        raise ConfigError(f"probe epochs must be >= 1 and l2 >= 0, got epochs={epochs}, l2={l2}")
    _check_tagging(data)
    tokenizer = token_tokenizer(tokenizer)
    max_length = _fit_length(max_length, tokenizer, model.config)
    x_train, where_train = word_features(model, tokenizer, data.train, max_length=max_length, batch_size=batch_size)
    x_eval, where_eval = word_features(model, tokenizer, data.eval, max_length=max_length, batch_size=batch_size)
    if x_train.shape[0] == 0:
        raise DataError(f"task {data.spec.name!r}: no training word fits in max_length={max_length} tokens")
    ids = {tag: i for i, tag in enumerate(data.spec.tags)}
    y_train = torch.tensor([ids[tag] for (_, tags), where in zip(data.train, where_train)
                            for tag, row in zip(tags, where) if row is not None], device=x_train.device)
    # Standardize with train statistics only: (K, d) -> zero mean, unit variance per feature.
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
    x_train, x_eval = (x_train - mean) / std, (x_eval - mean) / std
    gold = [tags for _, tags in data.eval]
    runs = []
    for seed in seeds:
        head = _train_head(x_train, y_train, data.spec, seed=seed, epochs=epochs, l2=l2)
        predicted = head(x_eval).tolist() if x_eval.shape[0] else []
        runs.append(entity_scores(gold, _tags_of(predicted, where_eval, data.spec.tags)))
    return _summarize(runs, data.spec)


def _tags_of(predicted: list[int], where: list[list[int | None]], tags: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [tuple("O" if row is None else tags[predicted[row]] for row in rows) for rows in where]


def tagging_finetune(model_path: str, tokenizer, data: TaggingData, *, seeds: Sequence[int] = (0, 1, 2),
                     epochs: int = 3, lr: float = 5e-5, batch_size: int = 16, max_length: int = 128, device=None,
                     weight_decay: float = 0.01, warmup_ratio: float = 0.1,
                     trust_remote_code: bool = False) -> dict[str, tuple[float, float]]:
    """Fine-tune a fresh ``AutoModelForTokenClassification`` per seed; score entity F1 on eval."""
    from transformers import AutoModelForTokenClassification

    seeds = _check_seeds(seeds)
    if epochs < 1 or lr <= 0 or batch_size < 1 or not 0 <= warmup_ratio < 1:
        raise ConfigError(
            f"finetune needs epochs >= 1, lr > 0, batch_size >= 1 and 0 <= warmup_ratio < 1, got epochs={epochs}, "
            f"lr={lr}, batch_size={batch_size}, warmup_ratio={warmup_ratio}"
        )
    _check_tagging(data)
    device = _device(device)
    tokenizer = token_tokenizer(tokenizer)
    tags = data.spec.tags
    ids = {tag: i for i, tag in enumerate(tags)}
    gold = [t for _, t in data.eval]
    runs = []
    for seed in seeds:
        cuda = [device.index or 0] if device.type == "cuda" else []
        # Hugging Face draws the new head and dropout from the global RNG: seed it inside fork_rng.
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            model = load_token_model(
                model_path, AutoModelForTokenClassification, what="token classification",
                trust_remote_code=trust_remote_code, tokenizer=tokenizer, num_labels=len(tags),
                id2label=dict(enumerate(tags)), label2id=ids,
            ).to(device)
            length = _fit_length(max_length, tokenizer, model.config)
            total = epochs * math.ceil(len(data.train) / batch_size)
            optimizer, schedule = adamw_with_warmup(model, lr=lr, weight_decay=weight_decay, total_steps=total,
                                                    warmup_ratio=warmup_ratio)
            generator = torch.Generator().manual_seed(seed)
            model.train()
            for _ in range(epochs):
                for idx in torch.randperm(len(data.train), generator=generator).split(batch_size):
                    batch = [data.train[i] for i in idx.tolist()]
                    inputs, firsts = encode_words(tokenizer, batch, length, device)
                    labels = torch.full(inputs["input_ids"].shape, IGNORE, dtype=torch.long)
                    for b, ((_, sentence_tags), first) in enumerate(zip(batch, firsts)):
                        for tag, t in zip(sentence_tags, first):
                            if t is not None:
                                labels[b, t] = ids[tag]
                    logits = model(**inputs).logits.float()  # (B, T, num_tags)
                    loss = F.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten(), ignore_index=IGNORE)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    schedule.step()
            runs.append(entity_scores(gold, _predict_tags(model, tokenizer, data.eval, tags, batch_size, length)))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return _summarize(runs, data.spec)


@torch.inference_mode()
def _predict_tags(model: nn.Module, tokenizer, sentences: Sequence[Sentence], tags: tuple[str, ...],
                  batch_size: int, max_length: int) -> list[tuple[str, ...]]:
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(sentences), batch_size):
        inputs, firsts = encode_words(tokenizer, sentences[start : start + batch_size], max_length, device)
        best = model(**inputs).logits.argmax(-1).tolist()  # (B, T)
        out += [tuple("O" if t is None else tags[best[b][t]] for t in first) for b, first in enumerate(firsts)]
    return out


def _check_tagging(data: TaggingData) -> None:
    if not data.train or not data.eval:
        raise DataError(f"task {data.spec.name!r} has an empty train or eval split: give it more sentences")
    if all(tag == "O" for _, tags in data.train for tag in tags):
        raise DataError(f"task {data.spec.name!r} has no B- or I- tag in its train split: there is no entity to learn")


def evaluate_tagging(model_path: str, task: str, *, mode: str = "probe", seeds: Sequence[int] = (0, 1, 2),
                     **kw) -> dict:
    """Load the model, its tokenizer and the task; evaluate by probe or finetune (see evaluate_task)."""
    from tadistill.loading import load_pretrained, load_tokenizer

    seeds = _check_seeds(seeds)
    data = load_tagging_task(task, max_train=kw.pop("max_train", None), max_eval=kw.pop("max_eval", None),
                             seed=kw.pop("data_seed", 0))
    trust_remote_code = kw.pop("trust_remote_code", False)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    if mode == "probe":
        device = _device(kw.pop("device", None))
        model = load_pretrained(model_path, head="base", trust_remote_code=trust_remote_code, what="model")
        scores = tagging_probe(model.to(device), tokenizer, data, seeds=seeds, **kw)
    else:
        scores = tagging_finetune(model_path, tokenizer, data, seeds=seeds, trust_remote_code=trust_remote_code, **kw)
    return {
        "task": data.spec.name,
        "mode": mode,
        "metrics": {m: {"mean": mean, "std": std} for m, (mean, std) in scores.items()},
        "headline": data.spec.metrics[0],
        "seeds": list(seeds),
        "train_size": len(data.train),
        "eval_size": len(data.eval),
    }
