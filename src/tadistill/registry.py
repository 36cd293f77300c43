"""The one explicit table of objectives, methods and recipes (no import-time registration).

- ``OBJECTIVES`` maps an objective ``kind`` (the key used in configs) to its config class, the term that
  computes it, and its ``Traits``: which teachers it works with, which model outputs and heads it reads,
  whether it needs the teacher at all, whether stored teacher signals can serve it. Nothing else in
  tadistill keeps lists of kinds: the set-up, the lane and the loop ask these rows.
- ``METHODS`` lists the behaviours beyond loss terms (``training/hooks.py``): each row's ``build``
  returns the method's hooks when a config asks for the method, None otherwise.
- ``PRUNING`` lists the importance criteria of structured pruning (``prune.method``, a stage with
  ``action: prune``; ``training/prune.py``): each row's ``scores`` ranks the teacher's units
  (``tadistill/structure/``).
- ``RECIPES`` maps a recipe name to its YAML file and a one-line summary.

A test checks that these tables, the recipe files shipped in ``tadistill/recipes/`` and the CLI agree.
Adding a method: a new file (a term in ``training/terms.py``-style, and/or hooks in ``methods/``) and a
row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from tadistill import config as C
from tadistill.methods import ammd, autodistil, distillm, on_policy
from tadistill.methods import wid
from tadistill.methods import dphubert
from tadistill.structure import activations
from tadistill.training import terms as T
from tadistill.training.embedding_term import SentenceEmbeddingTerm
from tadistill.training.relation_mse_term import RelationMSETerm


def _clean_inputs(cfg: Any) -> bool:
    return False


@dataclass(frozen=True)
class Traits:
    """What an objective kind needs from the models and the data.

    teacher: the teachers it works with: "encoder" (masked LMs), "causal" (GPT-style) or "any".
    head: the output head both models must have and whose outputs it reads: "mlm" (masked-LM logits),
        "lm" (a causal LM's last hidden states and output layer, for the chunked losses) or None.
    needs_teacher: False when it reads only the student and the data (the teacher is then never run).
    offline: whether stored teacher signals (``tadistill cache-teacher``) can serve it.
    masked_inputs: cfg -> whether the models see BERT-masked text (else clean text).
    """

    teacher: Literal["encoder", "causal", "any"] = "any"
    head: Literal["mlm", "lm"] | None = None
    needs_teacher: bool = True
    offline: bool = True
    masked_inputs: Callable[[Any], bool] = _clean_inputs


@dataclass(frozen=True)
class ObjectiveEntry:
    config: type
    term: type
    paper: str
    traits: Traits = Traits()


OBJECTIVES: dict[str, ObjectiveEntry] = {
    "output-kl": ObjectiveEntry(C.OutputKL, T.OutputKLTerm, "Hinton et al. 2015; Sanh et al. 2019",
                                Traits(teacher="encoder", head="mlm", offline=False,
                                       masked_inputs=lambda cfg: cfg.positions == "masked")),
    "mlm": ObjectiveEntry(C.MaskedLM, T.MaskedLMTerm, "Devlin et al. 2019",
                          Traits(teacher="encoder", head="mlm", needs_teacher=False, offline=False,
                                 masked_inputs=lambda cfg: True)),
    "hidden": ObjectiveEntry(C.HiddenStates, T.HiddenStatesTerm, "Jiao et al. 2020; comparative study, sec. 1"),
    "minilmv2": ObjectiveEntry(C.MiniLMv2, T.MiniLMv2Term, "Wang et al. 2021 (MiniLMv2)"),
    "minilm": ObjectiveEntry(C.MiniLM, T.MiniLMTerm, "Wang et al. 2020 (MiniLM)"),
    "direct-qkv": ObjectiveEntry(C.DirectQKV, T.DirectQKVTerm, "comparative study, sec. 1 (DirectMiniLM)"),
    "attention-mse": ObjectiveEntry(C.AttentionScoreMSE, T.AttentionScoreTerm, "Jiao et al. 2020 (TinyBERT)"),
    "embedding": ObjectiveEntry(C.SentenceEmbedding, SentenceEmbeddingTerm, "Reimers & Gurevych 2020, eq. 1"),
    "logits": ObjectiveEntry(
        C.LogitDivergence, T.LogitDivergenceTerm, "Hinton et al. 2015; Agarwal et al. 2024 (GKD); Ko et al. 2024",
        Traits(teacher="causal", head="lm"),
    ),
    "lm": ObjectiveEntry(C.CausalLM, T.CausalLMTerm, "Radford et al. 2019; teacher-free continued pretraining",
                         Traits(teacher="causal", head="lm", needs_teacher=False)),
    "moment-matching": ObjectiveEntry(C.MomentMatching, T.MomentMatchingTerm, "Jia 2024 (AMMD), reconstructed",
                                      Traits(teacher="causal", head="lm", offline=False)),
    "relation-mse": ObjectiveEntry(C.RelationMSE, RelationMSETerm, "Xu et al. 2022 (AutoDistil), sec. 3.2",
                                   Traits(offline=False)),
}


def traits(kind: str) -> Traits:
    return OBJECTIVES[kind].traits


@dataclass(frozen=True)
class MethodEntry:
    build: Callable[..., Any]  # (config, parts) -> MethodHooks | None; parts: the lane's student and terms
    paper: str


METHODS: dict[str, MethodEntry] = {
    "on-policy": MethodEntry(on_policy.build, "Agarwal et al. 2024 (GKD), alg. 1; Kim & Rush 2016 (seq-KD)"),
    "distillm": MethodEntry(distillm.build, "Ko et al. 2024 (DistiLLM), sec. 3.2"),
    "ammd-alternate": MethodEntry(ammd.build, "Jia 2024 (AMMD), alternating updates"),
    "wid": MethodEntry(wid.build, "Wu et al. 2023 (WID), sec. 3: compactors, masks by norm, folding"),
    "dphubert": MethodEntry(dphubert.build, "Peng et al. 2023 (DPHuBERT); Louizos et al. 2018 (hard concrete)"),
    "autodistil": MethodEntry(autodistil.build, "Xu et al. 2022 (AutoDistil), sec. 3: the sandwich rule"),
}


@dataclass(frozen=True)
class PruningEntry:
    scores: Callable[..., Any]  # (model, layout, calibration batches) -> structure.Scores
    paper: str


PRUNING: dict[str, PruningEntry] = {
    "minitron": PruningEntry(
        activations.activation_scores, "Muralidharan et al. 2024 (Minitron), sec. 2.2; Sreenivas et al. 2024"
    ),
}


@dataclass(frozen=True)
class RecipeEntry:
    file: str
    summary: str


RECIPES: dict[str, RecipeEntry] = {
    "od": RecipeEntry("od.yaml", "output distribution: KL of MLM distributions at temperature tau (+ MLM)"),
    "hs": RecipeEntry("hs.yaml", "hidden states: MSE with a learned projection under a layer mapping"),
    "minilmv2": RecipeEntry("minilmv2.yaml", "MiniLMv2: Q-Q / K-K / V-V relation KL, 48 relation heads"),
    "sentence": RecipeEntry(
        "sentence.yaml", "sentence encoders: MiniLMv2 relations + cosine of pooled embeddings, importance init"
    ),
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
    "minitron": RecipeEntry(
        "minitron.yaml", "causal LMs: prune the teacher to the student's shape by activation importance, then KD"
    ),
    "pretrain": RecipeEntry(
        "pretrain.yaml", "causal LMs: a random init of the teacher's shape trained with the LM loss only (builtin-gpt2)"
    ),
    "dphubert": RecipeEntry(
        "dphubert.yaml", "the teacher with hard-concrete gates pruned to a sparsity target (L1 + cosine), then distilled"
    ),
    "wid": RecipeEntry(
        "wid.yaml", "weight-inherited: the teacher with compactors, masked to a narrower width by norm, folded (MLM)"
    ),
    "autodistil": RecipeEntry(
        "autodistil.yaml", "a weight-shared SuperLM (sandwich rule, relation MSE); then `tadistill search RUN --flops 0.5`"
    ),
}


def recipe_path(name: str) -> Path:
    """Path of a shipped recipe file (inside the installed package)."""
    return Path(str(resources.files("tadistill") / "recipes" / RECIPES[name].file))
