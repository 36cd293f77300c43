"""Distillation objectives: pure functions on explicit tensors.

Every loss returns the SUM over valid rows (tokens, query rows, masked positions) of its per-row term
as a float32 scalar; the training loop divides once by the global count of valid rows. Teacher tensors
are treated as constants. Masks are bool (B, T), True = valid token. Bad inputs raise ValueError; the
user-facing checks of the same conditions are the config's and the set-up's
(docs/methods.md, Conventions shared by every loss).

- divergence.py: kl_rows, the row-wise KL used by the others.
- output.py: soft_target_kl (OD / DistilBERT), mlm_cross_entropy.
- hidden.py: hidden_mse (HS, TinyBERT), hidden_cosine (DistilBERT).
- attention.py: attention_kl (MiniLM), relation_kl (MiniLMv2), value_relation_kl (MiniLM's value
  relation, per attention head under grouped-query attention), attention_score_mse (TinyBERT).
- layer_maps.py: layer_map and its STRATEGIES.
- logits.py: logit_divergence / token_divergence for causal LMs: forward / reverse KL, generalized
  JSD(beta) (GKD), skew forward / reverse KL (DistiLLM), total variation; top-k teacher, padded vocabularies.
- chunked.py: chunked_logit_divergence, the same sum without materialising the (B, T, V) student logits.
"""

from __future__ import annotations

from tadistill.objectives.attention import attention_kl, attention_score_mse, relation_kl, value_relation_kl
from tadistill.objectives.chunked import chunked_logit_divergence
from tadistill.objectives.divergence import kl_rows
from tadistill.objectives.hidden import hidden_cosine, hidden_mse
from tadistill.objectives.layer_maps import STRATEGIES, layer_map
from tadistill.objectives.logits import KINDS as DIVERGENCE_KINDS
from tadistill.objectives.logits import logit_divergence, token_divergence
from tadistill.objectives.output import mlm_cross_entropy, soft_target_kl

__all__ = [
    "DIVERGENCE_KINDS",
    "STRATEGIES",
    "chunked_logit_divergence",
    "attention_kl",
    "attention_score_mse",
    "hidden_cosine",
    "hidden_mse",
    "kl_rows",
    "layer_map",
    "logit_divergence",
    "mlm_cross_entropy",
    "relation_kl",
    "soft_target_kl",
    "token_divergence",
    "value_relation_kl",
]
