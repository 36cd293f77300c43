"""Self-attention objectives: MiniLM attention KL, MiniLMv2 relations, TinyBERT score MSE.

See docs/methods.md, MiniLM (Wang et al. 2020: L_AT, L_VR), docs/methods.md, MiniLMv2 (Wang et al. 2021:
Q-Q, K-K, V-V relations) and docs/methods.md, TinyBERT (Jiao et al. 2020: L_attn). Every function returns
the SUM over valid query rows of a per-row term already averaged over heads; the loop divides by the
global count of valid tokens.

Errors: wrong shapes or option values raise ValueError (caller bugs). The user-facing checks of the same
conditions (equal head counts, relation heads that divide the widths) run once at set-up, where the
models are known, with a one-line ConfigError (``training/terms.py``).

Masking: a key is blocked when it is padding, or (``causal=True``, decoders) when it lies after the
query. Blocked keys get -inf (relation_kl: float32 min, see _key_bias) before a softmax. Padded query rows
are dropped from the sum; their logits are replaced by zeros first (relation_kl: their inputs) so that an
all-padded sequence cannot make NaN values or gradients.

Memory: scores and relations are (B, H, T, T) float32. The score functions (attention_kl,
attention_score_mse) make one float32 copy per model, fill it in place, keep the student's log-softmax for
backward and build the teacher side under no_grad; masks stay broadcast ((B, 1, 1, T) or (B, 1, T, T)
bool). relation_kl builds its relations from the (B, T, d) inputs and keeps two (T, T) tensors per head
for backward: the student's logits and the teacher's probabilities. At long sequences those (T, T)
tensors dominate: with ``chunk_size``, relation_kl, value_relation_kl and qk_attention_kl (MiniLM's
L_AT from the captured projections) go through ``objectives/chunked_relations.py`` instead, which only
ever holds ``chunk_size`` query rows of them (same value and gradients).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tadistill.capture.attention import attention_logits, split_heads
from tadistill.objectives.chunked_relations import check_chunk_size, chunked_row_kl
from tadistill.objectives.divergence import check_mask, kl_per_row


def _blocked_keys(mask: Tensor, causal: bool) -> Tensor:
    """bool (B, T) valid tokens -> (B, 1, 1, T) or, causal, (B, 1, T, T): True = key hidden from query."""
    blocked = ~mask[:, None, None, :]  # padded keys, (B, 1, 1, T)
    if causal:
        t = mask.shape[1]
        future = torch.ones(t, t, dtype=torch.bool, device=mask.device).triu_(1)  # (T, T): key j > query i
        blocked = blocked | future
    return blocked


def _mask_scores_(scores: Tensor, mask: Tensor, causal: bool) -> Tensor:
    """In place on a float32 (B, H, T, T) tensor we own: blocked keys -> -inf, padded query rows -> 0."""
    scores.masked_fill_(_blocked_keys(mask, causal), float("-inf"))
    # After the key fill: a padded row of an all-padded sequence would otherwise be all -inf.
    scores.masked_fill_(~mask[:, None, :, None], 0.0)
    return scores


def _check_scores(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, who: str) -> None:
    """Both (B, H, T, T) with one H, and a bool (B, T) mask."""
    if student_logits.dim() != 4 or teacher_logits.dim() != 4:
        raise ValueError(f"{who}: attention scores must be (B, H, T, T)")
    h_s, h_t = student_logits.shape[1], teacher_logits.shape[1]
    if h_s != h_t:
        # Maps are compared head by head; set-up refuses such models first (terms.require_equal_heads).
        raise ValueError(f"{who}: the student has {h_s} attention heads and the teacher {h_t}; they must be equal")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{who}: student {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    b, _, t, t2 = student_logits.shape
    if t != t2:
        raise ValueError(f"{who}: scores must be square over (query, key), got {tuple(student_logits.shape)}")
    check_mask(mask, b, t, who)


def _row_kl_sum(teacher_scores: Tensor, student_scores: Tensor, mask: Tensor) -> Tensor:
    """Masked (B, H, T, T) logits -> float32 scalar sum over valid (b, t) of mean_h KL(row_T || row_S)."""
    per_row = kl_per_row(teacher_scores, student_scores)  # (B, H, T)
    heads = per_row.shape[1]
    return per_row.masked_fill(~mask[:, None, :], 0.0).sum() / heads


def attention_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *, causal: bool = False) -> Tensor:
    """MiniLM self-attention distribution transfer L_AT (docs/methods.md, MiniLM).

    Args:
        student_logits: (B, H, T, T) pre-softmax scores Q K^T / sqrt(d_k) of the student's last block.
        teacher_logits: (B, H, T, T) same for the teacher (a constant); H must be equal.
        mask: bool (B, T), True = valid token.
        causal: also block keys after the query (decoders).

    Returns:
        float32 scalar: sum over valid query rows (b, t) of (1/H) sum_h KL(A_T[b,h,t,:] || A_S[b,h,t,:]),
        A = softmax over keys with blocked keys at -inf. Divided by the number of valid tokens this is
        MiniLM's 1/(A |x|) sum_a sum_t KL. All-padded batch -> 0.
    """
    _check_scores(student_logits, teacher_logits, mask, "attention_kl")
    with torch.no_grad():
        teacher = _mask_scores_(teacher_logits.detach().to(torch.float32, copy=True), mask, causal)
    student = _mask_scores_(student_logits.to(torch.float32, copy=True), mask, causal)
    return _row_kl_sum(teacher, student, mask)


def _key_bias(mask: Tensor, causal: bool, copies: int) -> Tensor:
    """bool (B, T) -> float32 additive key bias (B * copies, 1 or T, T): 0 = visible, float32 min = blocked.

    A finite minimum rather than -inf: exp(min - max) is exactly 0, so blocked keys get probability 0 as
    with -inf, yet a row whose keys are all blocked (an all-padded sequence) stays finite (uniform), and
    0 * bias is 0, not NaN. Such rows are padded queries, dropped from the sum.
    """
    blocked = _blocked_keys(mask, causal)  # (B, 1, 1 or T, T)
    bias = torch.zeros(blocked.shape, dtype=torch.float32, device=mask.device)
    bias.masked_fill_(blocked, torch.finfo(torch.float32).min)
    b, _, rows, t = blocked.shape
    return bias.expand(b, copies, rows, t).reshape(b * copies, rows, t)


def _relation_logits(x: Tensor, mask: Tensor, relation_heads: int, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T, d) -> (x_a, z): x_a (B * A_r, T, d_r) float32, z = x_a x_a^T / sqrt(d_r) + bias (B * A_r, T, T).

    Splits the concatenated heads into A_r relation heads of size d_r (docs/methods.md, MiniLMv2),
    upcast first so that the T x T products of bf16 activations are accurate (the (B, T, d) copy is small).
    Padded positions are zeroed, so that whatever they hold (even inf) cannot reach a valid row.
    baddbmm adds the key bias inside the matmul: no separate pass over the (T, T) scores.
    """
    b, t, d = x.shape
    d_r = d // relation_heads
    x = x.float().masked_fill(~mask[:, :, None], 0.0)
    x_a = x.reshape(b, t, relation_heads, d_r).transpose(1, 2).reshape(b * relation_heads, t, d_r)
    return x_a, torch.baddbmm(bias, x_a, x_a.transpose(1, 2), alpha=1.0 / math.sqrt(d_r))


MIN_RELATION_HEAD_SIZE = 8  # d_r of MiniLMv2's 384-wide students with 48 relation heads (Wang et al. 2021)


def suggest_relation_heads(*widths: int, count: int = 3) -> list[int]:
    """The ``count`` largest relation-head counts A_r that divide every width, largest first.

    Counts that leave the narrowest width relation heads of fewer than MIN_RELATION_HEAD_SIZE dimensions
    are skipped when any other count exists: 64 heads on a 64-wide student divide it, but give d_r = 1,
    a relation of scalar products that carries next to nothing. 1 always divides, so the list is never empty.
    """
    g = math.gcd(*widths)
    divisors = [a for a in range(g, 0, -1) if g % a == 0]  # every common divisor, largest first
    wide = [a for a in divisors if min(widths) // a >= MIN_RELATION_HEAD_SIZE]
    return (wide or divisors)[:count]


def relation_kl(
    student_x: Tensor,
    teacher_x: Tensor,
    mask: Tensor,
    *,
    relation_heads: int,
    causal: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """MiniLMv2 self-attention relation transfer for one of Q, K or V (docs/methods.md, MiniLMv2).

    Also MiniLM's value relation L_VR (docs/methods.md, MiniLM) with ``relation_heads`` = the attention head count.

    Args:
        student_x: (B, T, d_S) concatenated per-head queries, keys or values of the student.
        teacher_x: (B, T, d_T) the same projection of the teacher (a constant). Widths may differ.
        mask: bool (B, T), True = valid token.
        relation_heads: A_r; must divide d_S and d_T. Each model uses its own d_r = d / A_r.
        causal: also block keys after the query (decoders).
        chunk_size: None = the whole (B A_r, T, T) relations at once; an integer below T = that many query
            rows at a time, recomputed in backward (``chunked_row_kl``): same value and gradients, peak memory
            O(chunk_size x T) instead of O(T x T).

    Returns:
        float32 scalar: sum over valid query rows (b, t) of (1/A_r) sum_a KL(R_T[b,a,t,:] || R_S[b,a,t,:]),
        R = softmax(x_a x_a^T / sqrt(d_r)) with blocked keys at -inf. Divided by the number of valid
        tokens this is MiniLMv2's 1/(A_r |x|) sum_a sum_t KL. All-padded batch -> 0.
    """
    if student_x.dim() != 3 or teacher_x.dim() != 3 or student_x.shape[:2] != teacher_x.shape[:2]:
        raise ValueError(
            f"relation_kl: expected (B, T, d) inputs with one (B, T), got {tuple(student_x.shape)} and "
            f"{tuple(teacher_x.shape)}"
        )
    d_s, d_t = student_x.shape[-1], teacher_x.shape[-1]
    # Each model's width is cut into A_r equal heads: set-up gives the user's error with suggestions
    # (terms.require_relation_heads); this guard keeps the reshape below from mixing heads.
    if (isinstance(relation_heads, bool) or not isinstance(relation_heads, int) or relation_heads < 1
            or d_s % relation_heads or d_t % relation_heads):
        raise ValueError(
            f"relation_kl: relation_heads={relation_heads!r} must be a positive integer dividing the student width "
            f"{d_s} and the teacher width {d_t}, such as {suggest_relation_heads(d_s, d_t)[0]}"
        )
    check_mask(mask, student_x.shape[0], student_x.shape[1], "relation_kl")
    check_chunk_size(chunk_size)
    # float32 throughout, also inside a bf16 / fp16 autocast region (which would run the matmuls in half
    # precision): the KL below is a difference of O(log T) terms and needs their digits.
    with torch.autocast(student_x.device.type, enabled=False):
        if chunk_size is not None and chunk_size < student_x.shape[1]:
            with torch.no_grad():
                t_query, t_key = _scaled_heads(teacher_x.detach(), mask, relation_heads)
            s_query, s_key = _scaled_heads(student_x, mask, relation_heads)
            return chunked_row_kl(s_query, s_key, t_query, t_key, mask, causal=causal, chunk_size=chunk_size)
        return _relation_kl_float32(student_x, teacher_x, mask, relation_heads, causal)


def _scaled_heads(x: Tensor, mask: Tensor, relation_heads: int) -> tuple[Tensor, Tensor]:
    """(B, T, d) -> float32 (x_a / sqrt(d_r), x_a), each (B * A_r, T, d_r): query and key of the relation
    x_a x_a^T / sqrt(d_r), padded positions zeroed (as _relation_logits does)."""
    b, t, d = x.shape
    d_r = d // relation_heads
    x = x.float().masked_fill(~mask[:, :, None], 0.0)
    x_a = x.reshape(b, t, relation_heads, d_r).transpose(1, 2).reshape(b * relation_heads, t, d_r)
    return x_a * (1.0 / math.sqrt(d_r)), x_a


def _relation_kl_float32(student_x: Tensor, teacher_x: Tensor, mask: Tensor, relation_heads: int,
                         causal: bool) -> Tensor:
    b, t, _ = student_x.shape
    bias = _key_bias(mask, causal, relation_heads)
    # Per row, with z = relation logits, p = softmax(z_T), lse = logsumexp:
    #   KL(p || softmax(z_S)) = sum_j p_j log p_j - sum_j p_j z_S,j + lse(z_S)
    # and, since z_S,ij = x_i . x_j / sqrt(d_r), the middle term is x_i . (P x)_i / sqrt(d_r): a (T, T) x
    # (T, d_r) matmul instead of a log-softmax, a difference and a product over (T, T). Same value and
    # gradient as kl_per_row (tested); about 40% less time, and autograd keeps only z_S and p.
    with torch.no_grad():
        _, log_p = _relation_logits(teacher_x.detach(), mask, relation_heads, bias)
        log_p.sub_(torch.logsumexp(log_p, dim=-1, keepdim=True))
        p = log_p.exp()
        neg_entropy = torch.linalg.vecdot(p, log_p)  # (B * A_r, T); 0 * log p = 0 on blocked keys
        del log_p
    x_a, z_s = _relation_logits(student_x, mask, relation_heads, bias)
    cross = torch.linalg.vecdot(torch.bmm(p, x_a), x_a) * (1.0 / math.sqrt(x_a.shape[-1]))
    per_row = (neg_entropy - cross + torch.logsumexp(z_s, dim=-1)).view(b, relation_heads, t)
    return per_row.masked_fill(~mask[:, None, :], 0.0).sum() / relation_heads


def value_relation_kl(
    student_v: Tensor,
    teacher_v: Tensor,
    mask: Tensor,
    *,
    num_heads: int,
    student_kv_heads: int,
    teacher_kv_heads: int,
    causal: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """MiniLM's value relation L_VR (Wang et al. 2020, eq. 3-4), one relation per attention head.

    MiniLM compares VR_a = softmax(V_a V_a^T / sqrt(d_k)) head by head, V_a the values attention head a
    reads. Under grouped-query attention (Ainslie et al. 2023) query head a reads key/value head
    a // (H / H_kv), so when the two models group their heads differently the value heads do not pair one
    to one: teacher value head g_T(a) is compared with student value head g_S(a) for every query head a.
    With equal key/value head counts the groups coincide and this is ``relation_kl`` with A_r = H_kv (the
    mean over the H query heads repeats each pair H / H_kv times: the same value).

    Args:
        student_v: (B, T, H_kv,S d_S) concatenated value heads of the student.
        teacher_v: (B, T, H_kv,T d_T) the teacher's (a constant).
        mask: bool (B, T), True = valid token.
        num_heads: H, the query-head count, equal in both models (the attention maps need it).
        student_kv_heads, teacher_kv_heads: H_kv of each model; each must divide H.
        causal: also block keys after the query (decoders).
        chunk_size: query rows at a time, as in ``relation_kl`` (None: all at once).

    Returns:
        float32 scalar: sum over valid query rows of (1/H) sum_a KL(VR_T[g_T(a)] || VR_S[g_S(a)]).
    """
    for who, kv, x in (("student", student_kv_heads, student_v), ("teacher", teacher_kv_heads, teacher_v)):
        if num_heads % kv or x.shape[-1] % kv:
            raise ValueError(f"value_relation_kl: {who} has {kv} key/value heads, which must divide H={num_heads} "
                             f"and its value width {x.shape[-1]}")
    if student_kv_heads == teacher_kv_heads:
        return relation_kl(student_v, teacher_v, mask, relation_heads=student_kv_heads, causal=causal,
                           chunk_size=chunk_size)

    def per_query_head(x: Tensor, kv: int) -> Tensor:
        # (B, T, H_kv d) -> (B, T, H d): value head g is repeated for each of the H / H_kv query heads reading it.
        return x.unflatten(-1, (kv, -1)).repeat_interleave(num_heads // kv, dim=-2).flatten(-2)

    return relation_kl(
        per_query_head(student_v, student_kv_heads), per_query_head(teacher_v.detach(), teacher_kv_heads), mask,
        relation_heads=num_heads, causal=causal, chunk_size=chunk_size,
    )


def qk_attention_kl(
    student_q: Tensor,
    student_k: Tensor,
    teacher_q: Tensor,
    teacher_k: Tensor,
    mask: Tensor,
    *,
    num_heads: int,
    student_kv_heads: int,
    teacher_kv_heads: int,
    causal: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """MiniLM's L_AT (docs/methods.md, MiniLM) from the captured query and key projections of both models.

    ``attention_kl(attention_logits(student), attention_logits(teacher))`` when ``chunk_size`` is None or
    covers every query row; otherwise ``chunk_size`` query rows at a time (``chunked_row_kl``), so that
    neither model's (B, H, T, T) scores ever exist whole. Same value and gradients.

    Args:
        student_q: (B, T, H d_h,S); student_k: (B, T, H_kv,S d_h,S) (Hugging Face head layout).
        teacher_q, teacher_k: the teacher's, (B, T, H d_h,T) and (B, T, H_kv,T d_h,T); constants.
        mask: bool (B, T), True = valid token.
        num_heads: H, equal in both models (maps are compared head by head).
        student_kv_heads, teacher_kv_heads: H_kv of each model (grouped-query attention: query head h reads
            key head h // (H / H_kv), as ``attention_logits`` does).
        causal: also block keys after the query (decoders).
        chunk_size: query rows at a time; None = all.

    Returns:
        float32 scalar: the SUM ``attention_kl`` returns.
    """
    check_chunk_size(chunk_size)
    t = student_q.shape[1]
    if chunk_size is None or chunk_size >= t:
        scores_s = attention_logits(student_q, student_k, num_heads=num_heads, num_kv_heads=student_kv_heads)
        scores_t = attention_logits(teacher_q, teacher_k, num_heads=num_heads, num_kv_heads=teacher_kv_heads)
        return attention_kl(scores_s, scores_t, mask, causal=causal)
    check_mask(mask, student_q.shape[0], t, "qk_attention_kl")
    with torch.autocast(student_q.device.type, enabled=False):
        with torch.no_grad():
            t_query, t_key = _attention_heads(teacher_q.detach(), teacher_k.detach(), mask, num_heads,
                                              teacher_kv_heads)
        s_query, s_key = _attention_heads(student_q, student_k, mask, num_heads, student_kv_heads)
        return chunked_row_kl(s_query, s_key, t_query, t_key, mask, causal=causal, chunk_size=chunk_size)


def _attention_heads(q: Tensor, k: Tensor, mask: Tensor, num_heads: int, kv_heads: int) -> tuple[Tensor, Tensor]:
    """(B, T, H d_h), (B, T, H_kv d_h) -> float32 (q_h / sqrt(d_h), k_h), each (B * H, T, d_h), key heads
    repeated for grouped-query attention, padded positions zeroed (their scores are masked anyway)."""
    if num_heads % kv_heads:
        raise ValueError(f"qk_attention_kl: num_heads={num_heads} is not a multiple of num_kv_heads={kv_heads}")
    keep = mask[:, :, None]
    q_h = split_heads(q.float().masked_fill(~keep, 0.0), num_heads)  # (B, H, T, d_h)
    k_h = split_heads(k.float().masked_fill(~keep, 0.0), kv_heads)  # (B, H_kv, T, d_h)
    if q_h.shape[-1] != k_h.shape[-1]:
        raise ValueError(f"qk_attention_kl: query head_dim {q_h.shape[-1]} != key head_dim {k_h.shape[-1]}")
    if kv_heads != num_heads:
        k_h = k_h.repeat_interleave(num_heads // kv_heads, dim=1)  # (B, H, T, d_h)
    b, h, t, d_h = q_h.shape
    return (q_h * (1.0 / math.sqrt(d_h))).reshape(b * h, t, d_h), k_h.reshape(b * h, t, d_h)


def attention_score_mse(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *, causal: bool = False
) -> Tensor:
    """TinyBERT general-distillation attention loss L_attn (docs/methods.md, TinyBERT) on pre-softmax scores.

    Args:
        student_logits: (B, H, T, T) pre-softmax scores; -inf or very negative at masked keys is fine.
        teacher_logits: (B, H, T, T), a constant; H must be equal.
        mask: bool (B, T), True = valid token.
        causal: also treat keys after the query as masked (decoders).

    Returns:
        float32 scalar: sum over valid query rows (b, t) of
        (1 / (H n_t)) sum_h sum_{visible keys j} (S[b,h,t,j] - T[b,h,t,j])^2, n_t = number of keys
        visible from t. Masked entries are set to 0 in both models, as TinyBERT does (it replaces
        scores <= -100 by 0). Unlike TinyBERT's MSELoss over the whole (B, H, T, T) tensor, the zeros are
        not counted in the mean: padding does not dilute the loss. All-padded batch -> 0.
    """
    _check_scores(student_logits, teacher_logits, mask, "attention_score_mse")
    hidden = _blocked_keys(mask, causal) | ~mask[:, None, :, None]  # (B, 1, T, T)
    with torch.no_grad():
        teacher = teacher_logits.detach().float().masked_fill(hidden, 0.0)
    # masked_fill before subtracting: -inf - -inf would be NaN, and NaN * 0 stays NaN.
    diff = student_logits.float().masked_fill(hidden, 0.0) - teacher  # (B, H, T, T)
    per_row = diff.square().sum(dim=-1).mean(dim=1)  # (B, T): mean over heads of sum over keys
    visible = (~hidden).sum(dim=-1).squeeze(1)  # (B, T) keys visible from each query (0 for padding)
    return (per_row / visible.clamp_min(1)).sum()
