"""Extractive question answering: start / end span heads on the encoder, by probe (default) or fine-tuning.

Both return ``{metric: (mean, std)}`` over seeds: SQuAD's F1 and exact match as fractions
(:mod:`tadistill.evaluation.qa_metrics`).

Inputs (BERT's SQuAD set-up, Devlin et al. 2019, section 4.2). The question and its context are
encoded as the tokenizer's text pair, at most ``max_length`` tokens; a longer context is cut into
windows that overlap by ``max_length // 4`` tokens, each with the whole question (a question is cut to
half of ``max_length`` first). A span head scores each token as the answer's start and as its end
(two logits per token); training minimizes the mean of the two cross-entropies over the window's
positions, padding excluded. A window that does not contain the whole answer, and every window of a
no-answer question, is trained to point both at position 0 (``[CLS]`` for BERT-like models), the
"no answer" position of SQuAD 2.0 (BERT's section 4.3).

Prediction per question: over all its windows, the best span ``(i, j)`` of context tokens with
``i <= j < i + max_answer_tokens`` (30) by ``start_i + end_j``; its text is the context between the
tokens' character offsets. For SQuAD 2.0-style tasks (some question has no answer) the answer is
"" when the no-answer score ``start_0 + end_0``, taken at its lowest over the windows, beats the best
span (threshold 0, as in BERT's run_squad).

- ``qa_probe`` (the default mode, sized for CPUs): the model stays frozen; its last hidden states on
  the training windows are computed once (kept as float16, standardized with the train split's
  statistics) and two linear heads, start and end, are trained per seed with Adam, an L2 penalty,
  cosine decay, the seed drawing the init and the batch order. What the frozen states say about
  where an answer is, not what fine-tuning can make of them. Memory: windows x max_length x hidden
  x 2 bytes (3,000 windows of 128 tokens at width 384: 300 MB).
- ``qa_finetune``: per seed, ``AutoModelForQuestionAnswering`` (a new linear start/end head on the
  last hidden states) and the whole model trained with AdamW, linear warmup and decay, clipping at 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tadistill.errors import ConfigError, DataError
from tadistill.evaluation.downstream import (
    PROBE_LR,
    PROBE_MIN_STEPS,
    _check_seeds,
    _device,
    _fit_length,
    _single_thread_on_cpu,
    _summarize,
)
from tadistill.evaluation.qa_metrics import squad_scores
from tadistill.evaluation.qa_tasks import QAData, QAExample, load_qa_task
from tadistill.evaluation.token_encoding import (
    adamw_with_warmup,
    cosine,
    last_hidden_states,
    load_token_model,
    model_inputs,
    token_tokenizer,
)

MAX_ANSWER_TOKENS = 30
QA_PROBE_BATCH = 32  # windows per step of the probe heads


@dataclass
class Windows:
    """The tokenized windows of a list of questions, all padded to one length T.

    inputs: model inputs (W, T). example: (W,) index of each window's question. offsets: (W, T, 2)
    character offsets into the context. context: (W, T) bool, the context's tokens. start / end:
    (W,) training targets (0: no answer in this window).
    """

    inputs: dict[str, Tensor]
    example: Tensor
    offsets: Tensor
    context: Tensor
    start: Tensor
    end: Tensor

    def __len__(self) -> int:
        return self.example.numel()

    def batch(self, idx: Tensor, device: torch.device) -> dict[str, Tensor]:
        return {k: v[idx].to(device) for k, v in self.inputs.items()}


def make_windows(tokenizer, examples: Sequence[QAExample], max_length: int) -> Windows:
    """Tokenize questions with their contexts into overlapping windows and find each window's targets."""
    if max_length < 16:
        raise ConfigError(f"max_length={max_length} is too short for question answering: use at least 16 (e.g. 384)")
    questions = _clip_questions(tokenizer, [e.question for e in examples], max_length // 2)
    try:
        enc = tokenizer(questions, [e.context for e in examples], truncation="only_second", max_length=max_length,
                        stride=max_length // 4, return_overflowing_tokens=True, return_offsets_mapping=True,
                        padding="max_length", return_tensors="pt")
    except Exception as exc:  # noqa: BLE001 -- the Rust tokenizer raises plain Exceptions on impossible truncation
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise ConfigError(f"questions and contexts cannot be cut into windows of max_length={max_length} ({reason}): "
                          "raise max_length") from None
    example = enc["overflow_to_sample_mapping"]
    offsets = enc["offset_mapping"]
    context = torch.tensor([[s == 1 for s in enc.sequence_ids(w)] for w in range(len(example))])
    start = torch.zeros(len(example), dtype=torch.long)
    end = torch.zeros(len(example), dtype=torch.long)
    for w, i in enumerate(example.tolist()):
        ex = examples[i]
        if not ex.answers:
            continue
        first_char, last_char = ex.starts[0], ex.starts[0] + len(ex.answers[0])
        positions = context[w].nonzero().flatten().tolist()
        if not positions:
            continue
        spans = offsets[w].tolist()
        if spans[positions[0]][0] > first_char or spans[positions[-1]][1] < last_char:
            continue  # the answer is not wholly inside this window: "no answer" here
        start[w] = next(t for t in positions if spans[t][1] > first_char)
        end[w] = next(t for t in reversed(positions) if spans[t][0] < last_char)
    return Windows(model_inputs(tokenizer, enc, torch.device("cpu")), example, offsets, context, start, end)


def _clip_questions(tokenizer, questions: list[str], max_tokens: int) -> list[str]:
    """Questions cut to their first ``max_tokens`` tokens (at a token's end in the text)."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for question, spans in zip(questions, enc["offset_mapping"]):
        out.append(question if len(spans) <= max_tokens else question[: spans[max_tokens - 1][1]])
    return out


def decode(examples: Sequence[QAExample], windows: Windows, start_logits: Tensor, end_logits: Tensor, *,
           allow_no_answer: bool, max_answer_tokens: int = MAX_ANSWER_TOKENS) -> list[str]:
    """The answer string of each question from its windows' (W, T) start and end logits (see the docstring)."""
    start_logits, end_logits = start_logits.float().cpu(), end_logits.float().cpu()
    length = start_logits.shape[1]
    # (T, T) allowed (i, j): j >= i and j - i < max_answer_tokens.
    band = torch.ones(length, length, dtype=torch.bool).triu() & ~torch.ones(length, length, dtype=torch.bool).triu(
        max_answer_tokens)
    best: list[tuple[float, str]] = [(-math.inf, "")] * len(examples)
    null = [math.inf] * len(examples)
    for w, i in enumerate(windows.example.tolist()):
        s, e, ctx = start_logits[w], end_logits[w], windows.context[w]
        null[i] = min(null[i], float(s[0] + e[0]))
        scores = (s.masked_fill(~ctx, -math.inf)[:, None] + e.masked_fill(~ctx, -math.inf)[None, :])  # (T, T)
        scores = scores.masked_fill(~band, -math.inf)
        flat = int(scores.argmax())
        score = float(scores.flatten()[flat])
        if score > best[i][0]:
            a, b = divmod(flat, length)
            first, last = int(windows.offsets[w, a, 0]), int(windows.offsets[w, b, 1])
            best[i] = (score, examples[i].context[first:last])
    answers = []
    for (score, text), null_score in zip(best, null):
        answers.append("" if allow_no_answer and null_score > score else text)
    return answers


def _span_loss(start_logits: Tensor, end_logits: Tensor, mask: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Mean of the start and end cross-entropies over each window's non-padding positions.

    start_logits / end_logits: (B, T); mask: (B, T) bool attention mask; start / end: (B,) targets.
    """
    start_logits = start_logits.float().masked_fill(~mask, -1e4)
    end_logits = end_logits.float().masked_fill(~mask, -1e4)
    return 0.5 * (F.cross_entropy(start_logits, start) + F.cross_entropy(end_logits, end))


# ----------------------------------------------------------------------------------------------------
# Probe: two linear heads on frozen states
# ----------------------------------------------------------------------------------------------------


def qa_probe(model: nn.Module, tokenizer, data: QAData, *, seeds: Sequence[int] = (0, 1, 2), max_length: int = 384,
             batch_size: int = 32, epochs: int = 20, l2: float = 1e-3) -> dict[str, tuple[float, float]]:
    """Train start / end linear heads on frozen last hidden states, once per seed; score EM / F1 on eval.

    ``batch_size`` is the encoding batch size (windows); the heads train on 32 windows a step for
    ``max(epochs, enough for 500 steps)`` epochs.
    """
    seeds = _check_seeds(seeds)
    if epochs < 1 or l2 < 0:
        raise ConfigError(f"probe epochs must be >= 1 and l2 >= 0, got epochs={epochs}, l2={l2}")
    _check_qa(data)
    tokenizer = token_tokenizer(tokenizer)
    max_length = _fit_length(max_length, tokenizer, model.config)
    device = next(model.parameters()).device
    train = make_windows(tokenizer, data.train, max_length)
    features, mean, std = _frozen_states(model, train, batch_size, device)  # (W, T, d) float16, (d,), (d,)
    heads = [_train_span_head(features, mean, std, train, seed=seed, epochs=epochs, l2=l2) for seed in seeds]
    evaluation = make_windows(tokenizer, data.eval, max_length)
    logits = [[] for _ in seeds]
    with last_hidden_states(model) as run:
        for idx in torch.arange(len(evaluation)).split(batch_size):
            hidden = (run(evaluation.batch(idx, device)) - mean) / std  # (B, T, d)
            for k, (weight, bias) in enumerate(heads):
                logits[k].append(F.linear(hidden, weight, bias).cpu())  # (B, T, 2)
    runs = []
    for per_seed in logits:
        both = torch.cat(per_seed)  # (W, T, 2)
        predicted = decode(data.eval, evaluation, both[..., 0], both[..., 1], allow_no_answer=data.spec.allow_no_answer)
        runs.append(squad_scores(predicted, [e.answers for e in data.eval]))
    return _summarize(runs, data.spec)


def _frozen_states(model: nn.Module, windows: Windows, batch_size: int, device: torch.device
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(W, T, d) float16 last hidden states of the windows, and the (d,) mean and std of the
    non-padding positions (float32), on ``device``."""
    out = []
    total = count = squares = None
    with last_hidden_states(model) as run:
        for idx in torch.arange(len(windows)).split(batch_size):
            inputs = windows.batch(idx, device)
            hidden = run(inputs)  # (B, T, d)
            valid = hidden[inputs["attention_mask"].bool()].double()  # (positions, d)
            total = valid.sum(0) if total is None else total + valid.sum(0)
            squares = valid.square().sum(0) if squares is None else squares + valid.square().sum(0)
            count = valid.shape[0] if count is None else count + valid.shape[0]
            out.append(hidden.half())
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    # Cloned outside inference mode: inference tensors cannot be saved for the heads' backward pass.
    return torch.cat(out).clone(), mean.float().clone(), std.float().clone()


def _train_span_head(features: Tensor, mean: Tensor, std: Tensor, windows: Windows, *, seed: int, epochs: int,
                     l2: float) -> tuple[Tensor, Tensor]:
    """Fit (2, d) weights and (2,) biases of the start / end heads on standardized frozen states."""
    n, _, d = features.shape
    device = features.device
    generator = torch.Generator().manual_seed(seed)  # CPU generator: the same draws on every device
    steps_per_epoch = math.ceil(n / QA_PROBE_BATCH)
    epochs = max(epochs, math.ceil(PROBE_MIN_STEPS / steps_per_epoch))
    mask = windows.inputs["attention_mask"].bool().to(device)
    start, end = windows.start.to(device), windows.end.to(device)
    with torch.inference_mode(False), torch.enable_grad(), _single_thread_on_cpu(device):
        weight = (0.01 * torch.randn(2, d, generator=generator)).to(device).requires_grad_()
        bias = torch.zeros(2, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=PROBE_LR)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(epochs * steps_per_epoch))
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(device)
            for idx in order.split(QA_PROBE_BATCH):
                x = (features[idx].float() - mean) / std  # (b, T, d)
                logits = F.linear(x, weight, bias)  # (b, T, 2)
                loss = _span_loss(logits[..., 0], logits[..., 1], mask[idx], start[idx], end[idx])
                loss = loss + 0.5 * l2 * weight.square().sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return weight.detach(), bias.detach()


# ----------------------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------------------


def qa_finetune(model_path: str, tokenizer, data: QAData, *, seeds: Sequence[int] = (0, 1, 2), epochs: int = 2,
                lr: float = 5e-5, batch_size: int = 16, max_length: int = 384, device=None,
                weight_decay: float = 0.01, warmup_ratio: float = 0.1,
                trust_remote_code: bool = False) -> dict[str, tuple[float, float]]:
    """Fine-tune a fresh ``AutoModelForQuestionAnswering`` per seed; score EM / F1 on eval."""
    from transformers import AutoModelForQuestionAnswering

    seeds = _check_seeds(seeds)
    if epochs < 1 or lr <= 0 or batch_size < 1 or not 0 <= warmup_ratio < 1:
        raise ConfigError(
            f"finetune needs epochs >= 1, lr > 0, batch_size >= 1 and 0 <= warmup_ratio < 1, got epochs={epochs}, "
            f"lr={lr}, batch_size={batch_size}, warmup_ratio={warmup_ratio}"
        )
    _check_qa(data)
    device = _device(device)
    tokenizer = token_tokenizer(tokenizer)
    runs = []
    for seed in seeds:
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the new head and dropout come from the global RNG
            torch.manual_seed(seed)
            model = load_token_model(model_path, AutoModelForQuestionAnswering, what="question answering",
                                     trust_remote_code=trust_remote_code, tokenizer=tokenizer).to(device)
            length = _fit_length(max_length, tokenizer, model.config)
            train = make_windows(tokenizer, data.train, length)
            total = epochs * math.ceil(len(train) / batch_size)
            optimizer, schedule = adamw_with_warmup(model, lr=lr, weight_decay=weight_decay, total_steps=total,
                                                    warmup_ratio=warmup_ratio)
            generator = torch.Generator().manual_seed(seed)
            model.train()
            for _ in range(epochs):
                for idx in torch.randperm(len(train), generator=generator).split(batch_size):
                    inputs = train.batch(idx, device)
                    out = model(**inputs)
                    loss = _span_loss(out.start_logits, out.end_logits, inputs["attention_mask"].bool(),
                                      train.start[idx].to(device), train.end[idx].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    schedule.step()
            evaluation = make_windows(tokenizer, data.eval, length)
            start_logits, end_logits = _predict_spans(model, evaluation, batch_size, device)
            predicted = decode(data.eval, evaluation, start_logits, end_logits,
                               allow_no_answer=data.spec.allow_no_answer)
            runs.append(squad_scores(predicted, [e.answers for e in data.eval]))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return _summarize(runs, data.spec)


@torch.inference_mode()
def _predict_spans(model: nn.Module, windows: Windows, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    model.eval()
    starts, ends = [], []
    for idx in torch.arange(len(windows)).split(batch_size):
        out = model(**windows.batch(idx, device))
        starts.append(out.start_logits.float().cpu())  # (B, T)
        ends.append(out.end_logits.float().cpu())
    return torch.cat(starts), torch.cat(ends)


def _check_qa(data: QAData) -> None:
    if not data.train or not data.eval:
        raise DataError(f"task {data.spec.name!r} has an empty train or eval split: give it more questions")


def evaluate_qa(model_path: str, task: str, *, mode: str = "probe", seeds: Sequence[int] = (0, 1, 2), **kw) -> dict:
    """Load the model, its tokenizer and the task; evaluate by probe (default) or finetune (see evaluate_task)."""
    from tadistill.loading import load_pretrained, load_tokenizer

    seeds = _check_seeds(seeds)
    data = load_qa_task(task, max_train=kw.pop("max_train", None), max_eval=kw.pop("max_eval", None),
                        seed=kw.pop("data_seed", 0))
    trust_remote_code = kw.pop("trust_remote_code", False)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    if mode == "probe":
        device = _device(kw.pop("device", None))
        model = load_pretrained(model_path, head="base", trust_remote_code=trust_remote_code, what="model")
        scores = qa_probe(model.to(device), tokenizer, data, seeds=seeds, **kw)
    else:
        scores = qa_finetune(model_path, tokenizer, data, seeds=seeds, trust_remote_code=trust_remote_code, **kw)
    return {
        "task": data.spec.name,
        "mode": mode,
        "metrics": {m: {"mean": mean, "std": std} for m, (mean, std) in scores.items()},
        "headline": data.spec.metrics[0],
        "seeds": list(seeds),
        "train_size": len(data.train),
        "eval_size": len(data.eval),
    }
