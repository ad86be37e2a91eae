"""LoRA, the baseline WeGeFT is compared with: y = Wx + b + scale·B(A(x)).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import QKV_PARTS, register_method
from .layer import AdaptedLinear, Edit, LowRankConfig, check_rank_fits, inject_linear, rows_of


@register_method
@dataclass
class LoRAConfig(LowRankConfig):
    """LoRA: y = Wx + b + (alpha/r)·B(A(x)), one (A, B) pair per layer.

    Args:
        rank: r.
        alpha: None for a scale of 1; a number scales by alpha/rank.
        targets: as for WeGeFT (:mod:`wegeft_vision.adapters.targets`).
        qkv_parts: LoRA on e.g. the q and v rows of the fused qkv only.
    """

    method = "lora"

    def inject(self, model: nn.Module) -> dict[str, nn.Module]:
        def make_edit(name: str, layer: nn.Linear, rows: slice) -> Edit:
            check_rank_fits(self.rank, name, layer)
            return LoRAPair(layer.in_features, rows_of(layer, rows), self.rank, self.scale)

        return inject_linear(model, self.targets, self.qkv_parts, LoRALinear, make_edit)


class LoRAPair(Edit):
    """One layer's (A, B): A: d_in -> r (kaiming-uniform), B: r -> d_out (zeros)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lora_B(self.lora_A(x))
        return out if self.scale == 1.0 else out * self.scale

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.weight.to(weight.dtype)
        b = self.lora_B.weight.to(weight.dtype)
        return (b @ a) * self.scale


class LoRALinear(AdaptedLinear):
    """y = Wx + b + scale·B(A(x)), per q/k/v part when the edits are keyed by part."""

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        whole = self.edits.get(None)
        if whole is not None:
            return out + whole(x)
        chunks = [out[..., self.part_rows(part)] for part in QKV_PARTS]
        for index, part in enumerate(QKV_PARTS):
            edit = self.edits.get(part)
            if edit is not None:
                chunks[index] = chunks[index] + edit(x)
        return torch.cat(chunks, dim=-1)
