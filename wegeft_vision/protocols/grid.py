"""Hyperparameter grids: training settings by dotted name, each with a list of values to try."""
from __future__ import annotations

import itertools
from typing import Mapping, Sequence

from ..errors import UserError
from .records import HParamValue

Grid = dict[str, list[HParamValue]]

# The paper's search grid (arXiv 2312.00700; the authors' savadikarc/gift
# scripts/visual_classification/vtab): lr x weight decay, 24 points.
PAPER_GRID: Grid = {
    "model.lr": [1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3],
    "model.weight_decay": [0.01, 1e-3, 1e-4, 0.0],
}

# The authors' grids for the VPT and BitFit baselines, per benchmark (savadikarc/gift
# scripts/visual_classification/{vtab,fgvc}/tune_*_{vpt,bitfit}.sh): the learning rate only,
# weight decay 0 (configs/methods/{vpt,vpt_shallow,bitfit}.yaml).
BASELINE_GRIDS: dict[str, Grid] = {
    "vtab": {"model.lr": [5e-4, 1e-3, 1.5e-3, 2.5e-3, 5e-3, 1e-2]},
    "fgvc": {"model.lr": [1e-3, 1.5e-3, 2e-3, 2.5e-3, 5e-3, 1e-2]},
}


def check_grid(grid: Mapping[str, Sequence[HParamValue]]) -> Grid:
    """Validate a grid: at least one parameter, and every parameter has distinct values."""
    if not grid:
        raise UserError("the search grid has no parameters; give e.g. "
                        "--grid '{model.lr: [1e-4, 1e-3]}', or --search false to skip the search")
    out: Grid = {}
    for name, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise UserError(f"grid parameter {name!r} needs a list of values, got {values!r}")
        if len(values) == 0:
            raise UserError(f"grid parameter {name!r} has no values")
        if len(set(map(repr, values))) != len(values):
            raise UserError(f"grid parameter {name!r} repeats a value: {list(values)!r}")
        out[name] = list(values)
    return out


def expand_grid(grid: Mapping[str, Sequence[HParamValue]]) -> list[dict[str, HParamValue]]:
    """Every combination of the grid's values, in the order given (last parameter fastest)."""
    grid = check_grid(grid)
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*grid.values())]
