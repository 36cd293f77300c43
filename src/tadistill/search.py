"""``tadistill search RUN``: the best sub-network of a trained AutoDistil SuperLM under a budget, no retraining.

AutoDistil (Xu et al. 2022, sec. 3.3; docs/methods.md, AutoDistil) ranks the sub-networks of its SuperLM by
their distillation loss on held-out text and keeps the best one that meets a compute constraint. Here:

1. the run's config and SuperLM (``RUN/student``), the teacher, the sub-space (``methods/autodistil.py``);
2. every sub-network's cost from its config: forward FLOPs per token (``evaluation/cost.py``, at
   ``data.max_length`` tokens) relative to the teacher's, and its parameter count; those over ``--flops`` /
   ``--params`` are left out (none left: one line naming the cheapest); more than
   ``autodistil.max_candidates``: a seeded sample of that many (the smallest and the largest kept);
3. ``--latency-ms``: each remaining one extracted and timed at batch 1 against the teacher on this machine
   (``evaluation/latency.py``, interleaved); the slower ones are left out;
4. the held-out loss of each (the run's ``relation-mse`` on its kept heads, ``autodistil.search_batches``
   batches of the held-out split, the same batches for every candidate; the teacher runs once per batch), and
   for the top ones the loss of the same sub-network cut from the teacher itself, the SuperLM's start: what
   training the SuperLM added (house style 15);
5. the best one extracted (``structure.materialize``) into ``RUN/search/<name>/``, a plain Hugging Face
   checkpoint with the teacher's head, with ``search.json`` (the budget, the chosen one, the table);
   ``--distil`` then distils it further from the teacher (``RUN/search/<name>/distil``).

The table shows the top ones with their measured latency ratio to the teacher.
"""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from tadistill.capture.architectures import resolve_architecture
from tadistill.capture.hooks import capture
from tadistill.config import DistillConfig
from tadistill.data.batches import collate
from tadistill.data.prepare import prepare_corpus
from tadistill.errors import ConfigError, RunDirError
from tadistill.evaluation.cost import flops_per_token, parameters_from_config
from tadistill.evaluation.latency import compare_latency
from tadistill.fileio import atomic_write_text
from tadistill.loading import is_causal_lm, load_model_config, load_pretrained, load_tokenizer, resolve_model_path
from tadistill.methods.autodistil import OBJECTIVE, space_subnets
from tadistill.registry import OBJECTIVES
from tadistill.resolve import apply_override, build_config, recipe_dict
from tadistill.structure import apply_masks, materialize, resolve_layout
from tadistill.structure.subnets import Subnet, subnet_config, subnet_masks
from tadistill.training.loop import TokenizerInfo
from tadistill.training.pipeline import save_student
from tadistill.training.rundir import RunDir
from tadistill.training.terms import ModelOutputs

SEARCH_DIR = "search"
SEARCH_FILE = "search.json"


@dataclass(frozen=True)
class Budget:
    """The constraint: FLOPs per token at most ``flops`` x the teacher's; at most ``params`` parameters; at most
    ``latency_ms`` per forward at batch 1 on this machine. None: no bound on that measure."""

    flops: float | None = None
    params: int | None = None
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        if self.flops is None and self.params is None and self.latency_ms is None:
            raise ConfigError("give a budget: --flops RATIO (e.g. 0.5), --params N (e.g. 15M) or --latency-ms X")
        if self.flops is not None and not 0 < self.flops <= 1:
            raise ConfigError(f"--flops {self.flops:g} is a fraction of the teacher's FLOPs per token: give a value in "
                              "(0, 1], e.g. 0.5")
        if self.params is not None and self.params < 1:
            raise ConfigError(f"--params {self.params} must be a positive parameter count, e.g. 15M")
        if self.latency_ms is not None and not self.latency_ms > 0:
            raise ConfigError(f"--latency-ms {self.latency_ms:g} must be a positive number of milliseconds")


@dataclass
class Candidate:
    """One sub-network and what it costs and scores."""

    subnet: Subnet
    flops: int
    params: int
    flops_ratio: float
    loss: float | None = None
    loss_at_init: float | None = None  # the same sub-network cut from the teacher (the untrained SuperLM)
    latency_ms: float | None = None  # median at batch 1, this machine
    speedup: float | None = None  # teacher's median / this one's, timed interleaved

    def row(self) -> dict[str, Any]:
        out = {"name": self.subnet.name, **asdict(self.subnet)}
        out.update({k: v for k, v in asdict(self).items() if k != "subnet"})
        return out


@dataclass
class SearchResult:
    chosen: Candidate
    ranked: list[Candidate]  # every scored candidate, best first
    folder: Path  # RUN/search/<name>: the extracted checkpoint and search.json
    teacher: dict[str, Any]
    budget: Budget
    distilled: Any = None  # api.DistillResult of --distil
    dropped: dict[str, int] = field(default_factory=dict)


def parse_count(text: str) -> int:
    """'15M', '2.5e6', '800k', '1B' -> an integer count; ConfigError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbB]?)\s*", str(text))
    if not match:
        raise ConfigError(f"--params {text!r} is not a count: write e.g. 15M, 800k or 12000000")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[match.group(2).lower()]
    return int(round(float(match.group(1)) * scale))


def _head(name: str, trust_remote_code: bool) -> str:
    """The head a checkpoint has: 'causal-lm', 'mlm' or 'base' (the extracted model keeps it)."""
    model_config = load_model_config(name, trust_remote_code=trust_remote_code, what="student")
    if is_causal_lm(model_config):
        return "causal-lm"
    masked = any(a.endswith("ForMaskedLM") for a in getattr(model_config, "architectures", None) or [])
    return "mlm" if masked else "base"


def load_run(run_dir: str | Path) -> tuple[RunDir, DistillConfig]:
    """The run and its config; one line when it is no finished AutoDistil run."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise RunDirError(f"{run.root} is not a folder: give the --out of a 'tadistill distill autodistil' run")
    config = build_config(run.stored_config())
    if config.autodistil is None:
        raise ConfigError(f"{run.root} was not trained as an AutoDistil SuperLM (its config has no autodistil "
                          "section): search runs of recipe autodistil")
    if not (run.student / "config.json").is_file():
        raise RunDirError(f"{run.student} holds no trained SuperLM yet: finish the run first (tadistill distill "
                          f"autodistil --resume --out {run.root})")
    return run, config


class Searcher:
    """Steps 1-4 of the module docstring on one run; ``extract`` does step 5."""

    def __init__(self, run_dir: str | Path, *, seq_len: int | None = None, batches: int | None = None,
                 progress: bool = True):
        self.run, self.config = load_run(run_dir)
        cfg, remote = self.config, self.config.trust_remote_code
        self.progress = progress
        self.seq_len = seq_len or cfg.data.max_length
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(cfg.teacher, trust_remote_code=remote)
        self.head = _head(str(self.run.student), remote)
        self.superlm = load_pretrained(str(self.run.student), head=self.head, trust_remote_code=remote,
                                       what="student").float().eval()
        self.teacher = load_pretrained(cfg.teacher, head="base", trust_remote_code=remote).float().eval()
        self.layout = resolve_layout(self.superlm)
        self.base = self.superlm.base_model  # scored and timed without the head (the teacher's base model too)
        self.base_layout = resolve_layout(self.base)
        self.s_arch, self.t_arch = resolve_architecture(self.base), resolve_architecture(self.teacher)
        objective = cfg.objective(OBJECTIVE)
        if objective is None:
            raise ConfigError(f"{self.run.root} has no {OBJECTIVE} objective to rank sub-networks by")
        self.term = OBJECTIVES[OBJECTIVE].term(objective, self.s_arch, self.t_arch)
        self.subnets = space_subnets(cfg.autodistil, self.base_layout, self.term.relation_heads)
        self.teacher_flops = flops_per_token(self.teacher.config, seq_len=self.seq_len)
        self.teacher_params = parameters_from_config(self.teacher.config, head=self.head)
        self.batches = self._heldout(batches or cfg.autodistil.search_batches)
        self._teacher_out: list[ModelOutputs] | None = None  # the teacher's Q/K/V of each batch, computed once

    def _heldout(self, count: int) -> list[dict[str, torch.Tensor]]:
        """The first ``count`` batches of the held-out split (the run's data, split and seed)."""
        cfg = self.config
        splits = prepare_corpus(cfg.data, self.tokenizer, seed=cfg.train.seed,
                                max_positions=getattr(self.teacher.config, "max_position_embeddings", None))
        info, size = TokenizerInfo.of(self.tokenizer), cfg.train.batch_size
        n = min(len(splits.heldout), count * size)
        if n == 0:
            raise ConfigError("the run's held-out split is empty: the search needs held-out text")
        return [collate([splits.heldout[i] for i in range(s, min(s + size, n))], pad_id=info.pad_id,
                        special_ids=info.special_ids) for s in range(0, n, size)]

    def cost(self, subnet: Subnet) -> Candidate:
        config = subnet_config(self.superlm.config, subnet, self.layout)
        flops = flops_per_token(config, seq_len=self.seq_len)
        return Candidate(subnet, flops, parameters_from_config(config, head=self.head), flops / self.teacher_flops)

    def losses(self, candidates: list[Candidate], *, at_init: bool = False) -> None:
        """Each candidate's held-out relation-mse per valid token (the teacher runs once per batch).

        ``at_init``: the same sub-networks cut from the teacher itself, the SuperLM before training (its start
        when ``student.init: teacher``), into ``loss_at_init``: what training the SuperLM added.
        """
        self.base.to(self.device)
        self.teacher.to(self.device)
        if self._teacher_out is None:
            with torch.no_grad(), capture(self.teacher, self.t_arch, self.term.teacher_request) as t_cap:
                self._teacher_out = []
                for batch in self.batches:
                    self.teacher(**self._inputs(batch))
                    self._teacher_out.append(ModelOutputs(t_cap.clone()))
        tokens = sum(float(b["attention_mask"].sum()) for b in self.batches)
        model, arch = (self.teacher, self.t_arch) if at_init else (self.base, self.s_arch)
        layout = resolve_layout(model)
        what = "scoring sub-networks" + (" at init" if at_init else "")
        with torch.no_grad(), capture(model, arch, self.term.student_request) as s_cap:
            for cand in tqdm(candidates, desc=what, disable=not self.progress):
                total = 0.0
                with apply_masks(model, layout, subnet_masks(cand.subnet, layout)):
                    self.term.widths = cand.subnet.widths(layout)
                    for batch, teacher in zip(self.batches, self._teacher_out):
                        model(**self._inputs(batch))
                        total += float(self.term(ModelOutputs(s_cap), teacher, self._on_device(batch)))
                self.term.widths = None
                setattr(cand, "loss_at_init" if at_init else "loss", total / max(tokens, 1.0))

    @property
    def starts_as_teacher(self) -> bool:
        """Whether the SuperLM started as the teacher (so that the teacher's sub-networks are its start)."""
        sc, s, t = self.config.student, self.s_arch, self.t_arch
        return (sc.init == "teacher" and not sc.pretrained
                and (s.num_layers, s.hidden_size, s.num_heads) == (t.num_layers, t.hidden_size, t.num_heads))

    def latency(self, cand: Candidate, repeats: int) -> None:
        """Batch-1 latency of the extracted sub-network, interleaved with the teacher's, on this machine."""
        model = materialize(self.base, self.base_layout, subnet_masks(cand.subnet, self.base_layout)).eval()
        timed = compare_latency(self.teacher, model, vocab_size=len(self.tokenizer), batch_sizes=(1,),
                                seq_len=self.seq_len, repeats=repeats, warmup=2)
        cand.latency_ms = timed["student"]["batch_1"]["median_ms"]
        cand.speedup = timed["speedup"]["batch_1"]

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}


def _sample(candidates: list[Candidate], count: int, seed: int) -> list[Candidate]:
    """At most ``count`` candidates: all, or the smallest, the largest and a seeded sample of the rest."""
    if len(candidates) <= count:
        return candidates
    ends, middle = [candidates[0], candidates[-1]], candidates[1:-1]
    picks = torch.randperm(len(middle), generator=torch.Generator().manual_seed(seed))[:count - 2]
    return sorted([*ends, *(middle[i] for i in picks.tolist())], key=lambda c: c.flops)


def _over_budget(measure: str, budget: str, best: Candidate, what: str) -> ConfigError:
    return ConfigError(f"no sub-network of the sub-space meets {budget}: the {what} one, {best.subnet.name}, has "
                       f"{measure}; raise the budget, or train a SuperLM whose sub-space reaches lower "
                       "(autodistil.layers / hidden / ffn_ratio minimums)")


def run_search(run_dir: str | Path, budget: Budget, *, top: int = 10, name: str | None = None,
               seq_len: int | None = None, batches: int | None = None, latency_repeats: int = 10,
               overwrite: bool = False, progress: bool = True) -> SearchResult:
    """Rank, choose and extract (module docstring); returns the result without printing it."""
    began = time.perf_counter()
    searcher = Searcher(run_dir, seq_len=seq_len, batches=batches, progress=progress)
    candidates = sorted((searcher.cost(s) for s in searcher.subnets), key=lambda c: (c.flops, c.subnet))
    dropped = {}
    if budget.flops is not None:
        cheapest = candidates[0]
        kept = [c for c in candidates if c.flops_ratio <= budget.flops + 1e-12]
        if not kept:
            raise _over_budget(f"{cheapest.flops_ratio:.1%} of the teacher's FLOPs per token", f"--flops {budget.flops:g}",
                               cheapest, "cheapest")
        dropped["flops"], candidates = len(candidates) - len(kept), kept
    if budget.params is not None:
        fewest = min(candidates, key=lambda c: c.params)
        kept = [c for c in candidates if c.params <= budget.params]
        if not kept:
            raise _over_budget(f"{fewest.params:,} parameters", f"--params {budget.params:,}", fewest, "smallest")
        dropped["params"], candidates = len(candidates) - len(kept), kept
    count = len(candidates)
    candidates = _sample(candidates, searcher.config.autodistil.max_candidates, searcher.config.train.seed)
    dropped["not sampled"] = count - len(candidates)
    if budget.latency_ms is not None:
        for cand in tqdm(candidates, desc="timing sub-networks", disable=not progress):
            searcher.latency(cand, latency_repeats)
        fastest = min(candidates, key=lambda c: c.latency_ms)
        kept = [c for c in candidates if c.latency_ms <= budget.latency_ms]
        if not kept:
            raise _over_budget(f"{fastest.latency_ms:.2f} ms at batch 1 on this machine",
                               f"--latency-ms {budget.latency_ms:g}", fastest, "fastest")
        dropped["latency"], candidates = len(candidates) - len(kept), kept
    searcher.losses(candidates)
    ranked = sorted(candidates, key=lambda c: (c.loss, c.flops, c.subnet))
    if budget.latency_ms is None:
        for cand in ranked[:top]:
            searcher.latency(cand, latency_repeats)
    if searcher.starts_as_teacher:
        searcher.losses(ranked[:top], at_init=True)
    chosen = ranked[0]
    teacher = {"flops_per_token": searcher.teacher_flops, "parameters": searcher.teacher_params,
               "shape": f"{searcher.t_arch.num_layers}x{searcher.t_arch.hidden_size} ({searcher.t_arch.num_heads} "
                        "heads)"}
    folder = extract(searcher, chosen, name or chosen.subnet.name, overwrite=overwrite)
    result = SearchResult(chosen, ranked, folder, teacher, budget, dropped=dropped)
    report = {
        "run": str(searcher.run.root), "budget": asdict(budget), "seq_len": searcher.seq_len,
        "heldout_sequences": sum(len(b["input_ids"]) for b in searcher.batches),
        "teacher": teacher, "chosen": chosen.row(), "checkpoint": str(folder),
        "sub_space": len(searcher.subnets), "left_out": dropped, "ranked": [c.row() for c in ranked],
        "seconds": round(time.perf_counter() - began, 1),
    }
    atomic_write_text(folder / SEARCH_FILE, json.dumps(report, indent=2))
    return result


def extract(searcher: Searcher, chosen: Candidate, name: str, *, overwrite: bool = False) -> Path:
    """Materialise ``chosen`` with the SuperLM's head and save it as a plain checkpoint in RUN/search/<name>."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"--name {name!r} must be a folder name (letters, digits, '-', '_', '.')")
    folder = searcher.run.root / SEARCH_DIR / name
    if folder.exists() and not overwrite:
        raise RunDirError(f"{folder} exists: pass --overwrite to replace it, or --name another")
    model = materialize(searcher.superlm.cpu(), searcher.layout, subnet_masks(chosen.subnet, searcher.layout))
    folder.parent.mkdir(parents=True, exist_ok=True)
    save_student(model, searcher.tokenizer, folder, teacher_dir=Path(resolve_model_path(searcher.config.teacher)))
    return folder


def distil_config(result: SearchResult, config: DistillConfig, *, recipe: str | None = None,
                  steps: int | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DistillConfig:
    """The run's config turned into a plain distillation of the extracted sub-network from the same teacher.

    Objectives: the run's (relation-mse), or ``recipe``'s; ``steps``: the run's when None; then ``overrides``.
    """
    data = copy.deepcopy(config.model_dump(mode="json"))
    data.update(autodistil=None, stages=[])
    data["student"] = {**data["student"], "pretrained": str(result.folder)}
    data["train"]["stop_at"] = None
    if recipe:
        data["objectives"] = recipe_dict(recipe)["objectives"]
        data["recipe"] = recipe
    if steps:
        data["train"]["steps"] = steps
    for assignment in overrides:
        data = apply_override(data, assignment)
    return build_config(data)


def search_table(result: SearchResult, *, top: int = 10) -> Table:
    """The top candidates, best first: parameters, FLOPs per token and batch-1 latency relative to the teacher (the
    speedup is timed interleaved with the teacher on this machine), the held-out loss, and the loss of the same
    sub-network cut from the teacher before training ("at init"); * marks the chosen one."""
    shown = min(top, len(result.ranked))
    table = Table(title=f"AutoDistil search: best {shown} of {len(result.ranked)} sub-networks within the budget",
                  caption="FLOPs: per token, / the teacher's; ms: batch 1, this machine; speed: the teacher's ms / its "
                  "ms, timed interleaved; loss: held-out relation-mse; init: the same cut from the untrained teacher")
    table.add_column("#", justify="right")
    table.add_column("sub-network", no_wrap=True)
    for column in ("params", "FLOPs", "ms", "speed", "loss", "init"):
        table.add_column(column, justify="right", no_wrap=True)
    t = result.teacher
    table.add_row("T", f"teacher {t['shape'].split(' ')[0]}", f"{t['parameters'] / 1e6:.2f}M", "1.000", "", "1.00x",
                  "", "")
    for i, c in enumerate(result.ranked[:top], 1):
        table.add_row(f"{i}{'*' if c is result.chosen else ''}", c.subnet.name, f"{c.params / 1e6:.2f}M",
                      f"{c.flops_ratio:.3f}", "n/a" if c.latency_ms is None else f"{c.latency_ms:.2f}",
                      "n/a" if c.speedup is None else f"{c.speedup:.2f}x", f"{c.loss:.4g}",
                      "n/a" if c.loss_at_init is None else f"{c.loss_at_init:.4g}")
    return table


def print_search(result: SearchResult, *, top: int = 10) -> None:
    console = Console()
    console.print(search_table(result, top=top))
    c = result.chosen
    init = "" if c.loss_at_init is None else f"; {c.loss_at_init:.4g} cut from the untrained teacher"
    console.print(f"chosen: {c.subnet.name}  ({c.params:,} parameters, {c.flops_ratio:.1%} of the teacher's FLOPs per "
                  f"token, held-out loss {c.loss:.4g}{init})")
    console.print(f"checkpoint: {result.folder}  ({SEARCH_FILE} beside it)")
