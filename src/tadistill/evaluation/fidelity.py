"""What the student kept: teacher-student agreement on held-out text.

* ``sentence_embeddings`` / ``embedding_cosine`` / ``TeacherEmbeddings``: mean-pooled last hidden
  states of each model and their mean cosine (equal widths), the quick check written into every run
  summary; they live in :mod:`tadistill.measure.embeddings` (training uses them too) and stay
  importable from here;
* ``fidelity``: the full comparison, from the output distributions (KL) through every mapped hidden
  layer (CKA, cosine) and the last blocks' self-attention relations (MiniLMv2 relation KL) to the
  sentence-embedding space (cosine, CKA, nearest-neighbour overlap);
* ``fidelity_by_language`` / ``fidelity_row`` / ``heldout_by_language``: the same measures on each
  language's held-out texts of a multilingual run, and their unweighted mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tadistill.capture.architectures import Architecture, resolve_architecture
from tadistill.capture.hooks import CaptureRequest, capture
from tadistill.errors import ConfigError
from tadistill.evaluation.metrics import linear_cka, mean_cosine, nn_overlap_at_k
from tadistill.measure.embeddings import TeacherEmbeddings, embedding_cosine, mean_pool, sentence_embeddings
from tadistill.measure.inference import evaluating, has_lm_head, lm_logits, model_device, text_batches
from tadistill.objectives.attention import relation_kl
from tadistill.objectives.divergence import kl_rows
from tadistill.training.terms import qkv_widths, require_relation_heads, user_layer_map

# TeacherEmbeddings, embedding_cosine, mean_pool and sentence_embeddings live in tadistill.measure.embeddings
# (training uses them too); they are re-exported here for users of this module.
__all__ = [
    "TeacherEmbeddings",
    "default_relation_heads",
    "embedding_cosine",
    "fidelity",
    "mean_pool",
    "sentence_embeddings",
]


# ----------------------------------------------------------------------------------------------------
# Teacher-student fidelity on held-out text: outputs, hidden states, attention relations, embeddings
# ----------------------------------------------------------------------------------------------------

MAX_CKA_TOKENS = 4096  # token rows kept for token-level CKA: its d x d products stay cheap
CKA_SEED = 0  # seeds the token subsample, so two students are scored on the same tokens
MAX_RELATION_HEADS = 48  # MiniLMv2's relation-head count for base-size teachers (docs/methods.md, MiniLMv2)


def default_relation_heads(*widths: int) -> int:
    """The largest common divisor of ``widths`` that is <= MAX_RELATION_HEADS (1 at worst)."""
    g = math.gcd(*widths)
    return max(a for a in range(1, min(g, MAX_RELATION_HEADS) + 1) if g % a == 0)


def _relation_heads(student: Architecture, teacher: Architecture, requested: int | None) -> int:
    """The user's count, checked as a run's minilmv2 objective is (the set-up's one-line error), or the default."""
    if requested is None:
        return default_relation_heads(*qkv_widths(student), *qkv_widths(teacher))
    require_relation_heads(requested, student, teacher, setting="relation_heads")
    return requested


@dataclass
class _PairStats:
    """Running statistics of one (student, teacher) hidden-state pair over all batches."""

    cosine_sum: float = 0.0  # sum over valid tokens of cos(h_S, h_T), equal widths only
    student_rows: list[Tensor] = field(default_factory=list)  # (n_b, d_S) subsampled tokens, float32 CPU
    teacher_rows: list[Tensor] = field(default_factory=list)  # (n_b, d_T)


@torch.inference_mode()
def fidelity(
    teacher: nn.Module,
    student: nn.Module,
    tokenizer,
    texts: list[str],
    *,
    max_length: int = 128,
    batch_size: int = 16,
    relation_heads: int | None = None,
    k: int = 10,
) -> dict[str, float]:
    """How closely ``student`` reproduces ``teacher`` on the same held-out texts (all python floats).

    Both models read the same token ids, so they must share ``tokenizer``'s vocabulary. Texts are
    encoded one per sequence and right-padded per batch (``intrinsic.text_batches``); "valid tokens"
    are the real (non-padding) tokens, special tokens included. Student hidden state i is
    compared with teacher hidden state floor(i L_T / L_S) (the "uniform" mapping of
    ``objectives.layer_maps``), plus 0 -> 0 (embeddings).

    Keys (S, T = hidden-state indices):
        output_kl: sum over valid tokens of KL(p_T || p_S) / their number, when both models carry the
            same kind of LM head with one vocabulary (masked LM: uncorrupted text, every position;
            causal LM: every next-token distribution). Absent otherwise.
        layer_cka/S-T: linear CKA of token-level hidden states over at most MAX_CKA_TOKENS valid
            tokens drawn with a generator seeded by CKA_SEED (the same tokens for every pair);
            layer_cka_mean: their mean; final_cka: the pair (L_S, L_T).
        layer_cosine/S-T, final_cosine: mean cosine over all valid tokens; equal widths only.
        relation_kl/qq, /kk, /vv: MiniLMv2 self-attention relation KL of the last blocks (Wang et al.
            2021, eq. 1-3; ``objectives.attention.relation_kl``), summed over valid query tokens and
            divided by their number; relation_kl: the sum of the three, MiniLMv2's loss. 0 =
            identical relations; lower is better. ``relation_heads`` defaults to the largest common
            divisor <= 48 of every Q/K/V width of both models. Keys are masked as the student's
            attention is (causal for decoders).
        embedding_cosine (equal widths only), embedding_cka: mean cosine and linear CKA of
            mean-pooled last hidden states (``mean_pool``), one row per text.
        nn_overlap@k: ``metrics.nn_overlap_at_k`` of those sentence embeddings; only when
            len(texts) > k.

    Raises:
        ConfigError: bad max_length / batch_size / relation_heads / k, or a student deeper than its
            teacher. DataError: no texts. ArchitectureError: a model whose internals do not resolve.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer (neighbours per text), got {k!r}: e.g. k=10")
    arch_t, arch_s = resolve_architecture(teacher), resolve_architecture(student)
    l_s, l_t = arch_s.num_layers, arch_t.num_layers
    # The last pair is (L_S, L_T). A student deeper than its teacher has no uniform mapping: the set-up's error.
    pairs = [(0, 0)] + [(s, ts[0]) for s, ts in user_layer_map("fidelity", "uniform", arch_s, arch_t)]
    heads = _relation_heads(arch_s, arch_t, relation_heads)
    same_width = arch_s.hidden_size == arch_t.hidden_size
    head_kind = has_lm_head(teacher)
    compare_outputs = head_kind is not None and head_kind == has_lm_head(student)
    device_t, device_s = model_device(teacher), model_device(student)

    batches = list(text_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size))
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    # One global draw over all valid tokens (in batch, row, position order): exact uniform subsample.
    generator = torch.Generator().manual_seed(CKA_SEED)
    chosen = torch.zeros(n_tokens, dtype=torch.bool)
    chosen[torch.randperm(n_tokens, generator=generator)[:MAX_CKA_TOKENS]] = True

    stats = {pair: _PairStats() for pair in pairs}
    relation_sums = {"qq": 0.0, "kk": 0.0, "vv": 0.0}
    output_kl_sum = 0.0
    embeddings_t: list[Tensor] = []
    embeddings_s: list[Tensor] = []
    request_t = CaptureRequest(hidden=tuple(t for _, t in pairs), qkv=(l_t,))
    request_s = CaptureRequest(hidden=tuple(s for s, _ in pairs), qkv=(l_s,))
    offset = 0
    with (
        evaluating(teacher), evaluating(student),
        capture(teacher, arch_t, request_t) as cap_t, capture(student, arch_s, request_s) as cap_s,
    ):
        for batch in batches:
            ids, attention = batch["input_ids"], batch["attention_mask"]  # (B, T) each, CPU
            out_t = teacher(input_ids=ids.to(device_t), attention_mask=attention.to(device_t))
            # Shallow copies: the student's forward clears cap_t too when student is teacher.
            hidden_t, qkv_t = dict(cap_t.hidden), (cap_t.query[l_t], cap_t.key[l_t], cap_t.value[l_t])
            out_s = student(input_ids=ids.to(device_s), attention_mask=attention.to(device_s))
            mask = attention.to(device_t).bool()  # (B, T) valid tokens
            n_b = int(mask.sum())
            keep = chosen[offset : offset + n_b]  # (n_b,) this batch's tokens in the CKA subsample
            offset += n_b

            if compare_outputs:
                logits_t, logits_s = lm_logits(out_t), lm_logits(out_s).to(device_t)  # (B, T, V) each
                if logits_t.shape == logits_s.shape:
                    # Gather the valid rows first, (n_b, V): no float32 copy of padded rows.
                    output_kl_sum += float(kl_rows(logits_t[mask], logits_s[mask]))
                else:
                    compare_outputs = False  # vocabularies differ: no common output space

            for (s, t), st in stats.items():
                h_s = cap_s.hidden[s].to(device_t).float()[mask]  # (n_b, d_S) valid tokens only
                h_t = hidden_t[t].float()[mask]  # (n_b, d_T)
                if same_width:
                    st.cosine_sum += float(F.cosine_similarity(h_s, h_t, dim=-1).double().sum())
                st.student_rows.append(h_s[keep.to(h_s.device)].cpu())
                st.teacher_rows.append(h_t[keep.to(h_t.device)].cpu())

            qkv_s = (cap_s.query[l_s], cap_s.key[l_s], cap_s.value[l_s])
            for name, x_s, x_t in zip(relation_sums, qkv_s, qkv_t):
                relation_sums[name] += float(
                    relation_kl(x_s.to(device_t), x_t, mask, relation_heads=heads, causal=arch_s.causal)
                )

            embeddings_t.append(mean_pool(hidden_t[l_t].float(), mask.long()).cpu())  # (B, d_T)
            embeddings_s.append(mean_pool(cap_s.hidden[l_s].to(device_t).float(), mask.long()).cpu())  # (B, d_S)

    result: dict[str, float] = {}
    if compare_outputs:
        result["output_kl"] = output_kl_sum / n_tokens
    final = stats[pairs[-1]]
    if same_width:
        result["final_cosine"] = final.cosine_sum / n_tokens
    ckas = {pair: linear_cka(torch.cat(st.student_rows), torch.cat(st.teacher_rows)) for pair, st in stats.items()}
    result["final_cka"] = ckas[pairs[-1]]
    for (s, t), value in ckas.items():
        result[f"layer_cka/{s}-{t}"] = value
    result["layer_cka_mean"] = sum(ckas.values()) / len(ckas)
    if same_width:
        for (s, t), st in stats.items():
            result[f"layer_cosine/{s}-{t}"] = st.cosine_sum / n_tokens
    for name, value in relation_sums.items():
        result[f"relation_kl/{name}"] = value / n_tokens
    result["relation_kl"] = sum(relation_sums.values()) / n_tokens
    emb_t, emb_s = torch.cat(embeddings_t), torch.cat(embeddings_s)  # (N, d_T), (N, d_S)
    if same_width:
        result["embedding_cosine"] = mean_cosine(emb_s, emb_t)
    result["embedding_cka"] = linear_cka(emb_s, emb_t)
    if len(texts) > k:
        result[f"nn_overlap@{k}"] = nn_overlap_at_k(emb_s, emb_t, k)
    return {key: float(value) for key, value in result.items()}


# ----------------------------------------------------------------------------------------------------
# Per language: the same measures on each language's held-out texts
# ----------------------------------------------------------------------------------------------------


def heldout_by_language(data_config, *, seed: int, limit: int) -> dict[str, list[str]]:
    """Held-out texts per language of ``data.source`` entries that carry a ``language``.

    Entries are names or ``{path, weight, language}`` (dicts or the config's entry objects); entries
    of one language are pooled, in order. Each source's held-out texts are those of the run's split
    (the split hashes each text with the run's seed, so a text is held out alone or in a mixture alike).
    Returns ``{}`` when no entry names a language (a monolingual run); ``limit`` caps each language.
    Raises DataError naming the language when one has no held-out text.
    """
    from tadistill.data.prepare import heldout_texts
    from tadistill.errors import DataError

    entries = data_config.source if isinstance(data_config.source, (list, tuple)) else [data_config.source]
    paths: dict[str, list[str]] = {}
    for entry in entries:
        path = entry.get("path") if isinstance(entry, dict) else getattr(entry, "path", entry)
        language = entry.get("language") if isinstance(entry, dict) else getattr(entry, "language", None)
        if language:
            paths.setdefault(str(language), []).append(str(path))
    out: dict[str, list[str]] = {}
    for language, sources in paths.items():
        texts = [t for source in sources for t in heldout_texts(source, data_config, seed=seed, limit=limit)]
        if not texts:
            raise DataError(f"language {language!r} has no held-out text (sources {sources}): give it a larger corpus")
        out[language] = texts[:limit]
    return out


def fidelity_by_language(teacher: nn.Module, student: nn.Module, tokenizer, texts: dict[str, list[str]],
                         **kwargs) -> dict[str, dict[str, float]]:
    """``fidelity`` on each language's texts: ``{language: {metric: value}}`` (``kwargs`` go to ``fidelity``).

    A multilingual student can keep its teacher on the languages that dominate the corpus and lose it
    on the rare ones; one pooled number hides that (the "curse of multilinguality", Conneau et al. 2020,
    sec. 5). The key ``""`` stands for a single unnamed corpus. Raises DataError naming the language
    whose list is empty, before any model runs.
    """
    from tadistill.errors import DataError

    if not texts:
        raise DataError("no held-out texts to measure fidelity on: give at least one language's texts")
    for language, items in texts.items():
        if not items:
            raise DataError(f"language {language!r} has no held-out text: give it a non-empty corpus")
    return {language: fidelity(teacher, student, tokenizer, items, **kwargs) for language, items in texts.items()}


def fidelity_row(per_language: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flat result keys: ``fidelity/<metric>`` for one unnamed corpus; per language ``fidelity[<lang>]/<metric>``
    and, with two languages or more, ``fidelity/<metric>`` = their unweighted mean (each language counts
    once, however large its corpus: the macro average of multilingual benchmarks), over the languages
    that have the metric. Non-finite values are left out.
    """
    row: dict[str, float] = {}
    for language, values in per_language.items():
        prefix = f"fidelity[{language}]/" if language else "fidelity/"
        row.update({prefix + k: float(v) for k, v in values.items() if math.isfinite(v)})
    named = [values for language, values in per_language.items() if language]
    if len(named) >= 2:
        metrics = dict.fromkeys(k for values in named for k in values)
        for metric in metrics:
            finite = [v[metric] for v in named if metric in v and math.isfinite(v[metric])]
            if finite:
                row[f"fidelity/{metric}"] = sum(finite) / len(finite)
    return row


def parse_language_sources(items: list[str] | str) -> dict[str, str]:
    """``["de=de.txt", "fr=fr.txt"]`` -> ``{"de": "de.txt", "fr": "fr.txt"}``; one plain corpus -> ``{"": corpus}``.

    Raises ConfigError (one line) for a mix of named and plain corpora, a language named twice, or
    more than one plain corpus.
    """
    import re

    items = [items] if isinstance(items, str) else list(items)
    named = [re.match(r"^([A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*)=(.+)$", item) for item in items]
    if all(m is None for m in named):
        if len(items) != 1:
            raise ConfigError(f"give one corpus, or LANG=CORPUS pairs (de=de.txt fr=fr.txt), got {items}")
        return {"": items[0]}
    if any(m is None for m in named):
        plain = items[[m is None for m in named].index(True)]
        raise ConfigError(f"{plain!r} names no language: write every corpus as LANG=CORPUS (e.g. de={plain})")
    out: dict[str, str] = {}
    for m in named:
        if m[1] in out:
            raise ConfigError(f"language {m[1]!r} is given twice: one corpus per language")
        out[m[1]] = m[2]
    return out
