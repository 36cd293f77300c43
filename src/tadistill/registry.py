"""The one explicit table of recipes and objectives (no import-time registration).

``OBJECTIVES`` maps an objective ``kind`` (the key used in configs) to its config class and the
term that computes it; ``RECIPES`` maps a recipe name to its YAML file and a one-line summary. A test
checks that these tables, the recipe files shipped in ``tadistill/recipes/`` and the CLI agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tadistill import config as C
from tadistill.training import terms as T
from tadistill.training.embedding_term import SentenceEmbeddingTerm


@dataclass(frozen=True)
class ObjectiveEntry:
    config: type
    term: type
    paper: str


OBJECTIVES: dict[str, ObjectiveEntry] = {
    "output-kl": ObjectiveEntry(C.OutputKL, T.OutputKLTerm, "Hinton et al. 2015; Sanh et al. 2019"),
    "mlm": ObjectiveEntry(C.MaskedLM, T.MaskedLMTerm, "Devlin et al. 2019"),
    "hidden": ObjectiveEntry(C.HiddenStates, T.HiddenStatesTerm, "Jiao et al. 2020; comparative study, sec. 1"),
    "minilmv2": ObjectiveEntry(C.MiniLMv2, T.MiniLMv2Term, "Wang et al. 2021 (MiniLMv2)"),
    "minilm": ObjectiveEntry(C.MiniLM, T.MiniLMTerm, "Wang et al. 2020 (MiniLM)"),
    "direct-qkv": ObjectiveEntry(C.DirectQKV, T.DirectQKVTerm, "comparative study, sec. 1 (DirectMiniLM)"),
    "attention-mse": ObjectiveEntry(C.AttentionScoreMSE, T.AttentionScoreTerm, "Jiao et al. 2020 (TinyBERT)"),
    "embedding": ObjectiveEntry(C.SentenceEmbedding, SentenceEmbeddingTerm, "Reimers & Gurevych 2020, eq. 1"),
    "logits": ObjectiveEntry(
        C.LogitDivergence, T.LogitDivergenceTerm, "Hinton et al. 2015; Agarwal et al. 2024 (GKD); Ko et al. 2024"
    ),
    "lm": ObjectiveEntry(C.CausalLM, T.CausalLMTerm, "Radford et al. 2019; teacher-free continued pretraining"),
    "moment-matching": ObjectiveEntry(C.MomentMatching, T.MomentMatchingTerm, "Jia 2024 (AMMD), reconstructed"),
}


@dataclass(frozen=True)
class RecipeEntry:
    file: str
    summary: str


RECIPES: dict[str, RecipeEntry] = {
    "od": RecipeEntry("od.yaml", "output distribution: KL of MLM distributions at temperature tau (+ MLM)"),
    "hs": RecipeEntry("hs.yaml", "hidden states: MSE with a learned projection under a layer mapping"),
    "minilmv2": RecipeEntry("minilmv2.yaml", "MiniLMv2: Q-Q / K-K / V-V relation KL, 48 relation heads"),
    "minilm": RecipeEntry("minilm.yaml", "MiniLM: last-layer attention + value relation KL (teacher assistant)"),
    "direct-minilm": RecipeEntry("direct-minilm.yaml", "DirectMiniLM: MSE of linearly projected Q/K/V"),
    "tinybert-general": RecipeEntry(
        "tinybert-general.yaml", "TinyBERT general stage: attention-score MSE + hidden MSE, embeddings included"
    ),
    "distilbert": RecipeEntry(
        "distilbert.yaml", "DistilBERT: 5 soft-target KL (tau 2) + 2 MLM + 1 cosine, every-other-layer init"
    ),
    "kd": RecipeEntry("kd.yaml", "causal LMs: forward KL of next-token distributions (word-level KD), chunked"),
    "gkd": RecipeEntry("gkd.yaml", "causal LMs: on-policy GKD, student samples (lambda 1), JSD(0.5)"),
    "ammd": RecipeEntry("ammd.yaml", "causal LMs: adversarial moment matching, Q head vs student (reconstruction)"),
    "teacher-free": RecipeEntry(
        "teacher-free.yaml", "causal LMs: truncate the teacher, continue pretraining with the LM loss only"
    ),
}


def recipe_path(name: str) -> Path:
    """Path of a shipped recipe file (inside the installed package)."""
    return Path(str(resources.files("tadistill") / "recipes" / RECIPES[name].file))
