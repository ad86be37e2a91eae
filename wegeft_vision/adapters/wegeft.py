"""WeGeFT: the fine-tuning residual is generated from the pretrained weight, dW = W·phi·psi.

The layer computes the representation form y = W(x + phi(psi(x))) + b, a low-rank edit of the
layer's input, so training never builds dW; merging folds it into W' = W(I + phi·psi).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import QKV_PARTS
from .kernels import EditSpec, wegeft_linear, wegeft_linear_plain
from .layer import AdaptedLinear, Edit


class WeGeFTGenerator(Edit):
    """The generator (phi, psi), psi: d_in -> r, phi: r -> d_in; the layers apply it through
    :mod:`.kernels` (x -> x + scale·phi(psi(x))), so it holds parameters and merges.

    Initialised as the authors' vision code does (gift/gift/modeling_gift.py, which builds
    dW = out_proj(in_proj(W)) row by row): phi = in_proj.weight^T starts U(+-1/sqrt(d_in)) (the
    default init of an ``nn.Linear(d_in, r)``, fan-in d_in) and psi = out_proj.weight^T starts at
    zero. So the model starts at its pretrained output and at step 1 only psi gets a gradient.
    """

    def __init__(self, in_features: int, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.psi = nn.Linear(in_features, rank, bias=False)
        self.phi = nn.Linear(rank, in_features, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear(r, d_in) would draw phi with fan-in r; the authors' in_proj has fan-in d_in.
        bound = 1.0 / math.sqrt(self.phi.weight.shape[0])
        nn.init.uniform_(self.phi.weight, -bound, bound)
        nn.init.zeros_(self.psi.weight)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # (W·phi)·psi keeps the product d_out x r x d_in instead of building a d_in x d_in matrix.
        phi = self.phi.weight.to(weight.dtype)
        psi = self.psi.weight.to(weight.dtype)
        return (weight @ phi) @ psi * self.scale


class WeGeFTLinear(AdaptedLinear):
    """y = W(x + phi(psi(x))) + b, per q/k/v part when the edits are keyed by part.

    ``fast``: run the fast kernel of :mod:`.kernels` (the default), else the plain autograd form
    that the tests compare it with. ``recompute``: rebuild this layer's input in backward from
    what its producer (LayerNorm, GELU, attention) saved anyway, instead of keeping a copy.
    """

    fast: bool = True
    recompute: bool = True

    def edit_specs(self) -> list[EditSpec]:
        """The edits as the kernels take them, in q, k, v row order."""
        specs = []
        for part in (None, *QKV_PARTS):
            edit = self.edits.get(part)
            if edit is not None:
                rows = None if part is None else self.part_rows(part)
                specs.append(EditSpec(psi=edit.psi.weight, phi=edit.phi.weight, scale=edit.scale,
                                      rows=None if rows is None else (rows.start, rows.stop)))
        return specs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = W(x + s·phi(psi(x))) + b: one kernel call, the same formula in either form.
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if not self.fast:
            return wegeft_linear_plain(x, weight, bias, self.edit_specs())
        return wegeft_linear(x, weight, bias, self.edit_specs(), recompute=self.recompute)
