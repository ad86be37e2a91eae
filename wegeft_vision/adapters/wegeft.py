"""WeGeFT: the fine-tuning residual is generated from the pretrained weight, dW = W·phi·psi.

The layer computes the representation form y = W(x + phi(psi(x))) + b, a low-rank edit of the
layer's input, so training never builds dW; merging folds it into W' = W(I + phi·psi).
Savadikar et al., "WeGeFT: Weight-Generative Fine-Tuning", ICML 2025 (arXiv 2312.00700).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import UserTypeError
from .base import QKV_PARTS, register_method
from .kernels import EditSpec, wegeft_linear, wegeft_linear_plain
from .layer import AdaptedLinear, Edit, LowRankConfig, check_rank_fits, inject_linear


@register_method
@dataclass
class WeGeFTConfig(LowRankConfig):
    """WeGeFT: dW = W·phi·psi, applied as y = W(x + phi(psi(x))) + b.

    Initialised as the authors' vision code: psi = 0 and phi ~ U(+-1/sqrt(d_in)), so training
    starts at the pretrained model and only psi moves at step 1.

    Args:
        rank: generator rank r (psi: d_in -> r, phi: r -> d_in).
        alpha: None for no scaling (the paper's vision setting); a number scales by alpha/rank.
        targets: block projection kinds ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
            presets of them ("attn", "mlp", "all"), other layer-name suffixes or full-match
            regexes; see :mod:`wegeft_vision.adapters.targets` for each timm family.
        qkv_parts: None treats timm's fused qkv as one layer; e.g. ("q", "v") gives each named
            part its own generator, fed with its own rows of W, and leaves the others unchanged.
        shared: one generator per target kind for all blocks (the paper), else one per layer.
        recompute: rebuild each adapted layer's input in backward from what LayerNorm, GELU or
            attention saved anyway instead of storing a copy (activation memory near the frozen
            floor); a runtime choice: config equality, and so loading an adapter, ignores it.
    """

    method = "wegeft"
    rank: int = 16
    shared: bool = True
    recompute: bool = dataclasses.field(default=True, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.recompute, bool):
            raise UserTypeError(f"recompute must be True or False, got {self.recompute!r}")
        super().__post_init__()

    def inject(self, model: nn.Module) -> dict[str, nn.Module]:
        def make_edit(name: str, layer: nn.Linear, rows: slice) -> Edit:
            check_rank_fits(self.rank, name, layer)
            return WeGeFTGenerator(layer.in_features, self.rank, self.scale)

        return inject_linear(model, self.targets, self.qkv_parts,
                             lambda layer, edits: WeGeFTLinear(layer, edits, self.recompute),
                             make_edit, shared=self.shared)


class WeGeFTGenerator(Edit):
    """The generator (phi, psi), psi: d_in -> r, phi: r -> d_in; the layers apply it through
    :mod:`.kernels` (x -> x + scale·phi(psi(x))), so it holds parameters and merges.

    Initialised as the authors' vision code does (savadikarc/gift, gift/modeling_gift.py, which
    builds dW = out_proj(in_proj(W)) row by row): phi = in_proj.weight^T starts U(+-1/sqrt(d_in))
    (the default init of an ``nn.Linear(d_in, r)``, fan-in d_in) and psi = out_proj.weight^T starts
    at zero. So the model starts at its pretrained output and at step 1 only psi gets a gradient.
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

    ``fast``: compute it with the fast kernel of :mod:`.kernels` (the default), else with the
    plain autograd form, the reference the tests compare the kernel with. ``recompute``: rebuild
    this layer's input in backward from what its producer (LayerNorm, GELU, attention) saved
    anyway, instead of keeping a copy.
    """

    def __init__(self, base_layer: nn.Linear, edits: dict[Optional[str], Edit],
                 recompute: bool = True, fast: bool = True) -> None:
        super().__init__(base_layer, edits)
        self.recompute = recompute
        self.fast = fast

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

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = W(x + s·phi(psi(x))) + b, each edit on its rows of W: the same formula either way.
        weight, bias, edits = self.base_layer.weight, self.base_layer.bias, self.edit_specs()
        if not self.fast:
            return wegeft_linear_plain(x, weight, bias, edits)
        return wegeft_linear(x, weight, bias, edits, recompute=self.recompute)
