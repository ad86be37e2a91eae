"""LoRA, the baseline WeGeFT is compared with: y = Wx + b + scale·B(A(x))."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import QKV_PARTS
from .layer import AdaptedLinear, Edit


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        whole = self.edits.get(None)
        if whole is not None:
            return out + whole(x)
        size = self.base_layer.out_features // len(QKV_PARTS)
        chunks = list(out.split(size, dim=-1))
        for index, part in enumerate(QKV_PARTS):
            edit = self.edits.get(part)
            if edit is not None:
                chunks[index] = chunks[index] + edit(x)
        return torch.cat(chunks, dim=-1)
