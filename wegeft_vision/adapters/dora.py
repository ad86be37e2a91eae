"""DoRA, weight-decomposed LoRA: W' = m · (W + s·B·A) / ‖W + s·B·A‖, the norm per output row.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024. The LoRA pair (A, B) moves
the direction of each row of W, the magnitude m its length. As in HF PEFT's
``LoraConfig(use_dora=True)`` (peft/tuners/lora/dora.py), the row norm is a constant in backward
(detached: the paper's section 4.3, which saves its graph), so values and gradients are PEFT's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import register_method
from .layer import AdaptedLinear, check_rank_fits, inject_linear
from .lora import LoRAConfig, LoRAPair


@register_method
@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA: W' = m · (W + s·B·A) / ‖W + s·B·A‖ per output row, with s = alpha/rank.

    Initialised at the pretrained model: B = 0, A as LoRA's, m = ‖W‖ row by row. Trainable: A, B
    and m, per layer (or per q/k/v part). ViT-B/16 attn.proj, rank 8: 12 × (2 × 8 × 768 + 768) =
    156,672 parameters.

    Args:
        rank: r of the pair (A: r x d_in, B: d_out x r).
        alpha: None for s = 1; a number gives s = alpha/rank (PEFT's ``lora_alpha``).
        targets: as for LoRA (:mod:`wegeft_vision.adapters.targets`).
        qkv_parts: DoRA on e.g. the q and v rows of the fused qkv only: each part gets its own
            A, B and m (the norm is per row, so a part is exactly those rows' DoRA).
    """

    method = "dora"

    def inject(self, model: nn.Module) -> dict[str, nn.Module]:
        def make_edit(name: str, layer: nn.Linear, rows: slice) -> DoRAEdit:
            check_rank_fits(self.rank, name, layer)
            return DoRAEdit(layer.weight[rows], self.rank, self.scale)

        return inject_linear(model, self.targets, self.qkv_parts, DoRALinear, make_edit)


class DoRAEdit(LoRAPair):
    """LoRA's pair (A, B) for some rows of W, plus their magnitude m (one per row)."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float) -> None:
        super().__init__(weight.shape[1], weight.shape[0], rank, scale)
        # B = 0, so ‖W + s·B·A‖ = ‖W‖ = m: the edit starts as the identity.
        self.magnitude = nn.Parameter(torch.linalg.norm(weight.detach(), dim=1))

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        edited = weight + self.delta_weight(weight)
        norm = torch.linalg.norm(edited.detach(), dim=1, keepdim=True)
        return (self.magnitude.to(weight.dtype).unsqueeze(1) / norm) * edited


class DoRALinear(AdaptedLinear):
    """y = W'x + b with W' the DoRA weight (row blocks of a fused qkv edited by part).

    The norm needs W + s·B·A in every forward (PEFT forms it too), so applying W' itself is one
    matmul over the activations, which saves only the input x for backward.
    """

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
