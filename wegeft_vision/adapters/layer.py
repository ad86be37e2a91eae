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
        """The effective weight W + dW, differentiable in the edits.

        For code that reads ``.weight`` instead of calling the layer: timm's EVA and BEiT
        attention compute qkv as ``F.linear(x, self.qkv.weight, qkv_bias)``, which then trains
        and merges the same model as the layer's own forward. The frozen weight is
        ``base_layer.weight`` (what the state dict, merging and fingerprints read).
        """
        weight = self.base_layer.weight
        return weight + self.delta_weight(weight)

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

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """dW for the whole frozen ``weight`` (zero on rows no edit owns), in its dtype."""
        whole = self.edits.get(None)
        if whole is not None:
            return whole.delta_weight(weight)
        blocks = []
        for part in QKV_PARTS:
            rows = weight[self.part_rows(part)]
            edit = self.edits.get(part)
            blocks.append(torch.zeros_like(rows) if edit is None else edit.delta_weight(rows))
        return torch.cat(blocks)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the edits folded in, computed in float64."""
        base = self.base_layer
        weight = base.weight.detach().to(torch.float64)
        merged = weight + self.delta_weight(weight)
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
