"""The frozen linear layer with edits attached: shared by WeGeFT and LoRA."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from .config import QKV_PARTS


class Edit(nn.Module):
    """A trainable low-rank edit of one linear layer (or of one q/k/v part of it)."""

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """dW for the frozen ``weight`` rows this edit applies to, in ``weight``'s dtype."""
        raise NotImplementedError


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` (kept as ``base_layer``) plus edits of its whole weight or of its
    q/k/v row blocks.

    ``edits`` maps ``None`` (the whole layer) or a part name ("q", "k", "v") to an :class:`Edit`.
    The edits are registered once on the model's adapter container; this layer only refers to
    them, so a generator shared by twelve blocks is one set of parameters, saved once.
    """

    def __init__(self, base_layer: nn.Linear, edits: Mapping[Optional[str], Edit]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.edits: dict[Optional[str], Edit] = dict(edits)  # a dict: deliberately not registered

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def part_rows(self, part: Optional[str]) -> slice:
        """The rows of W that ``part`` owns in a fused qkv layer (all rows for ``None``)."""
        if part is None:
            return slice(None)
        size = self.base_layer.out_features // len(QKV_PARTS)
        index = QKV_PARTS.index(part)
        return slice(index * size, (index + 1) * size)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the edits folded in, computed in float64."""
        base = self.base_layer
        weight = base.weight.detach().to(torch.float64)
        merged = weight.clone()
        for part, edit in self.edits.items():
            rows = self.part_rows(part)
            merged[rows] += edit.delta_weight(weight[rows])
        if not torch.isfinite(merged).all():
            raise ValueError("merging produced non-finite weights; the adapter has diverged")
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        out.weight.copy_(merged)
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        parts = ", ".join("all" if p is None else p for p in self.edits)
        return f"edits=({parts})"
