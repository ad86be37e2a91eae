"""The frozen linear layer with edits attached, and how linear methods put it into a model.

WeGeFT, LoRA, DoRA and VeRA all edit ``nn.Linear`` layers (or one q/k/v row block of a fused
qkv): an :class:`Edit` says what the edited weight is, an :class:`AdaptedLinear` applies edits
and merges them, :func:`inject_linear` finds the target layers and shares edits between them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError
from .base import QKV_PARTS, AdapterConfig, AdapterLayer, check_rank, qkv_rows
from .targets import (Targets, check_parts, expand_targets, find_target_layers, is_fused_qkv,
                      kinds, replace_module)


@dataclass
class LowRankConfig(AdapterConfig):
    """The settings every rank-r linear method has (WeGeFT, LoRA, DoRA), checked once.

    Args:
        rank: r of the method's factors.
        alpha: None for a scale of 1; a number scales the edit by alpha/rank.
        targets: block projection kinds ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
            presets of them ("attn", "mlp", "all"), other layer-name suffixes or full-match
            regexes; see :mod:`wegeft_vision.adapters.targets` for each timm family.
        qkv_parts: None treats timm's fused qkv as one layer; e.g. ("q", "v") edits only those
            parts' rows of W, each with its own factors.
    """

    rank: int = 8
    alpha: Optional[float] = None
    targets: Targets = ("attn.proj",)
    qkv_parts: Optional[Sequence[str]] = None

    def __post_init__(self) -> None:
        check_rank(self.rank, self.alpha)
        self.targets = expand_targets(self.targets)
        self.qkv_parts = check_parts(self.qkv_parts)

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


class Edit(nn.Module):
    """A trainable edit of one linear layer (or of one q/k/v row block of it)."""

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """dW for the frozen ``weight`` rows this edit applies to, in ``weight``'s dtype."""
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The edited weight W' for these rows (W + dW unless the method says otherwise)."""
        return weight + self.delta_weight(weight)


class AdaptedLinear(AdapterLayer):
    """A frozen ``nn.Linear`` (kept as ``base_layer``) plus edits of its whole weight or of its
    q/k/v row blocks.

    ``edits`` maps ``None`` (the whole layer) or a part name ("q", "k", "v") to an :class:`Edit`.
    The edits are registered once on the model's adapter container; this layer only refers to
    them, so a generator shared by twelve blocks is one set of parameters, saved once.
    Subclasses implement :meth:`adapted_forward`; merged, the layer is its base layer.
    """

    def __init__(self, base_layer: nn.Linear, edits: Mapping[Optional[str], Edit]) -> None:
        super().__init__(base_layer)
        self.edits: dict[Optional[str], Edit] = dict(edits)  # a dict: deliberately not registered
        self._saved_weight: Optional[torch.Tensor] = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W', differentiable in the edits (the base weight once merged).

        For code that reads ``.weight`` instead of calling the layer: it then trains and merges
        the same model as the layer's own forward, at the cost of building W' every step. (timm's
        EVA, BEiT and Swin-V2 attention would; :func:`.targets.replace_module` switches them to
        calling the layer.)
        """
        weight = self.base_layer.weight
        return weight if self.merged else self.merged_weight(weight)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def part_rows(self, part: Optional[str]) -> slice:
        """The rows of W that ``part`` owns in a fused qkv layer (all rows for ``None``)."""
        return qkv_rows(self.base_layer.out_features, part)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W' for the whole frozen ``weight`` (unchanged on rows no edit owns), in its dtype."""
        whole = self.edits.get(None)
        if whole is not None:
            return whole.merged_weight(weight)
        blocks = []
        for part in QKV_PARTS:
            rows = weight[self.part_rows(part)]
            edit = self.edits.get(part)
            blocks.append(rows if edit is None else edit.merged_weight(rows))
        return torch.cat(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            self.check_not_training()
            return self.base_layer(x)
        return self.adapted_forward(x)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W' computed in float64; the original W is kept for :meth:`unmerge`."""
        weight = self.base_layer.weight
        merged = self.merged_weight(weight.detach().to(torch.float64))
        if not torch.isfinite(merged).all():
            raise UserError("merging produced non-finite weights; the adapter has diverged")
        self._saved_weight = weight.detach().clone()
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        # dW depends on W: restore the saved copy, never subtract.
        self.base_layer.weight.copy_(self._saved_weight)
        self._saved_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        parts = ", ".join("all" if p is None else p for p in self.edits)
        return f"edits=({parts})" + (", merged" if self.merged else "")


# make_edit(layer name, layer, rows) -> the edit for those rows of the layer.
MakeEdit = Callable[[str, nn.Linear, slice], Edit]
MakeLayer = Callable[[nn.Linear, dict[Optional[str], Edit]], AdaptedLinear]


def inject_linear(model: nn.Module, targets: tuple[str, ...], qkv_parts: Optional[Sequence[str]],
                  make_layer: MakeLayer, make_edit: MakeEdit, shared: bool = False
                  ) -> dict[str, Edit]:
    """Replace each target layer by ``make_layer(layer, edits)``; returns the edits by key.

    ``qkv_parts``: edit only these row blocks of fused qkv layers, each with its own edit.
    ``shared``: one edit per target pattern (and part) for all the layers it selects.
    """
    found = find_target_layers(model, targets)
    modules = dict(model.named_modules())
    if qkv_parts is not None and not any(is_fused_qkv(n, modules[n])
                                         for names in found.values() for n in names):
        raise UserError(f"qkv_parts={tuple(qkv_parts)} given, but none of the targeted layers "
                        f"({kinds([n for v in found.values() for n in v])}) is a fused qkv "
                        "layer (an nn.Linear named 'qkv' with out_features = 3 x in_features)")
    edits: dict[str, Edit] = {}
    for pattern, names in found.items():
        first = modules[names[0]]
        for name in names:
            layer = modules[name]
            if shared and layer.in_features != first.in_features:
                raise UserError(f"target {pattern!r} shares one edit, but {names[0]!r} has "
                                f"d_in={first.in_features} and {name!r} has "
                                f"d_in={layer.in_features}; use separate targets or shared=False")
            parts = qkv_parts if qkv_parts is not None and is_fused_qkv(name, layer) else (None,)
            layer_edits: dict[Optional[str], Edit] = {}
            for part in parts:
                key = _key(pattern if shared else name) + ("" if part is None else f"_{part}")
                if key not in edits:
                    edit = make_edit(name, layer, qkv_rows(layer.out_features, part))
                    edits[key] = edit.to(device=layer.weight.device, dtype=layer.weight.dtype)
                layer_edits[part] = edits[key]
            replace_module(model, name, make_layer(layer, layer_edits))
    return edits


def rows_of(layer: nn.Linear, rows: slice) -> int:
    """How many output rows ``rows`` selects in ``layer``."""
    return len(range(layer.out_features)[rows])


def check_rank_fits(rank: int, name: str, layer: nn.Linear) -> None:
    if rank > layer.in_features:
        raise UserError(f"rank {rank} exceeds the input size {layer.in_features} of layer "
                        f"{name!r}")


def _key(text: str) -> str:
    return re.sub(r"\W+", "_", text).strip("_") or "target"
