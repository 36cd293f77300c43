"""The cells of a study: one student to train (a method x a shape), a replicate of one, or a shape's initialisation.

Names are folder names under ``cells/``: ``<method>_<shape>`` for a cell, ``<cell>@seed<N>`` for a replicate
trained with another training seed (``study.noise``), ``init_<shape>`` (or ``init-<method>_<shape>`` where a
shape's cells start from different weights) for a student at its initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

from tadistill.config import DistillConfig
from tadistill.errors import TadistillError

INIT = "init"  # the method label of initialisation rows


@dataclass
class Cell:
    name: str
    method: str
    shape: str
    config: DistillConfig | None
    error: str | None = None
    replicate_of: str | None = None  # the cell this one repeats with another training seed


def replicate_name(cell: str, seed: int) -> str:
    return f"{cell}@seed{seed}"


def replicate_cells(cells: list[Cell], noise) -> list[Cell]:
    """The replicates ``noise`` asks for: each named cell's config with ``train.seed`` set to each extra seed.

    Only the seed differs; it also draws the data order and the held-out split, which is why a replicate
    trains in a pass of its own (``training_passes``).
    """
    if noise is None:
        return []
    by_name = {c.name: c for c in cells}
    out = []
    for name in noise.cells:
        base = by_name[name]
        for seed in noise.seeds:
            if base.config is None:
                out.append(Cell(replicate_name(name, seed), base.method, base.shape, None, base.error, name))
                continue
            config = base.config.model_copy(deep=True)
            try:
                config.train.seed = seed  # validated on assignment
            except ValueError as exc:
                raise TadistillError(f"noise seed {seed}: {exc}") from None
            out.append(Cell(replicate_name(name, seed), base.method, base.shape, config, replicate_of=name))
    return out


def training_passes(cells: list[Cell], pending: list[str] | None = None) -> list[list[Cell]]:
    """Cells grouped into passes by ``train.seed`` (all lanes of one pass share the data order), in first-seen
    order; the group holding the cells of an interrupted pass (``pending``, from pass.json) first."""
    groups: dict[int, list[Cell]] = {}
    for cell in cells:
        if cell.config is not None:
            groups.setdefault(cell.config.train.seed, []).append(cell)
    passes = list(groups.values())
    if pending:
        passes.sort(key=lambda group: not any(c.name in pending for c in group))  # stable
    return passes
