"""VeRA, vector-based random matrix adaptation: y = Wx + b + Λ_b·B·Λ_d·A·x.

Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024. A (r x d_in) and
B (d_out x r) are frozen random matrices, one pair for every layer of one shape; each layer
trains only the diagonals lambda_d (r) and lambda_b (d_out). The pairs are drawn again from the
config's ``seed`` (so from the adapter file's config) and never saved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, UserTypeError
from .base import AdapterConfig, check_rank, register_method
from .layer import Edit, inject_linear, rows_of
from .lora import LoRALinear
from .targets import Targets, check_parts, expand_targets

PROJECTIONS_KEY = "projections"


@register_method
@dataclass
class VeRAConfig(AdapterConfig):
    """VeRA: dW = Λ_b·B·Λ_d·A with frozen random A, B shared by the layers of one shape.

    Initialised as the paper and HF PEFT's ``VeraConfig``: A and B kaiming-uniform from a
    generator seeded with ``seed`` (PEFT's ``projection_prng_key``), lambda_d = d_initial,
    lambda_b = 0 (so training starts at the pretrained model). ViT-B/16 attn.proj, rank 256:
    12 × (256 + 768) = 12,288 trainable parameters.

    Args:
        rank: r, the width of the random projections (may exceed d_in: A is not trained).
        targets: as for LoRA (:mod:`wegeft_vision.adapters.targets`).
        qkv_parts: VeRA on e.g. the q and v rows of the fused qkv only: each part gets its own
            lambdas and shares the pair of shape (d_out / 3, d_in).
        seed: seeds the frozen A and B; stored in the config, so in adapter files.
        d_initial: the initial value of every lambda_d (non-zero: lambda_b = 0 trains only
            through it).
    """

    method = "vera"
    rank: int = 256
    targets: Targets = ("attn.proj",)
    qkv_parts: Optional[Sequence[str]] = None
    seed: int = 0
    d_initial: float = 0.1

    def __post_init__(self) -> None:
        check_rank(self.rank)
        self.targets = expand_targets(self.targets)
        self.qkv_parts = check_parts(self.qkv_parts)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserTypeError(f"seed must be an int, got {self.seed!r}")
        if self.seed < 0:
            raise UserError(f"seed must be a non-negative int, got {self.seed}")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise UserTypeError(f"d_initial must be a number, got {self.d_initial!r}")
        if self.d_initial == 0 or not math.isfinite(self.d_initial):
            raise UserError(f"d_initial must be finite and non-zero (lambda_b starts at 0 and "
                            f"trains only through lambda_d), got {self.d_initial}")

    def inject(self, model: nn.Module) -> dict[str, nn.Module]:
        projections = VeRAProjections(self.rank, self.seed)

        def make_edit(name: str, layer: nn.Linear, rows: slice) -> VeRAEdit:
            out = rows_of(layer, rows)
            projections.add(out, layer.in_features, layer.weight)
            return VeRAEdit(projections, out, layer.in_features, self.rank, self.d_initial)

        edits = inject_linear(model, self.targets, self.qkv_parts, LoRALinear, make_edit)
        if PROJECTIONS_KEY in edits:
            raise UserError(f"a targeted layer's key {PROJECTIONS_KEY!r} clashes with VeRA's "
                            "frozen projections; target it by another name")
        return {**edits, PROJECTIONS_KEY: projections}


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA init (peft/tuners/vera/model.py ``_kaiming_init``): U(±sqrt(6 / fan_in))."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen pairs (A, B), one per layer shape: buffers that are neither trained nor saved."""

    def __init__(self, rank: int, seed: int) -> None:
        super().__init__()
        self.rank, self.seed = rank, seed

    def add(self, out_features: int, in_features: int, like: torch.Tensor) -> None:
        name = f"{out_features}x{in_features}"
        if hasattr(self, f"A_{name}"):
            return
        # A, then B, from one generator seeded afresh for each shape: PEFT's draw for one shape
        # (float32 on the CPU, so the same on every device), each shape with its own fan-in.
        generator = torch.Generator().manual_seed(self.seed)
        for key, shape in (("A", (self.rank, in_features)), ("B", (out_features, self.rank))):
            tensor = _kaiming_uniform(shape, generator).to(device=like.device, dtype=like.dtype)
            self.register_buffer(f"{key}_{name}", tensor, persistent=False)

    def pair(self, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        name = f"{out_features}x{in_features}"
        return getattr(self, f"A_{name}"), getattr(self, f"B_{name}")


class VeRAEdit(Edit):
    """One layer's (or q/k/v part's) lambda_d and lambda_b over the shared pair of its shape."""

    def __init__(self, projections: VeRAProjections, out_features: int, in_features: int,
                 rank: int, d_initial: float) -> None:
        super().__init__()
        # A plain reference: the pairs are registered once, on the adapter container.
        self._projections = (projections,)
        self.shape = (out_features, in_features)
        self.lambda_d = nn.Parameter(torch.full((rank,), float(d_initial)))
        self.lambda_b = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._projections[0].pair(*self.shape)
        return self.lambda_b * F.linear(self.lambda_d * F.linear(x, a), b)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        a, b = (t.to(weight.dtype) for t in self._projections[0].pair(*self.shape))
        lambda_d, lambda_b = self.lambda_d.to(weight.dtype), self.lambda_b.to(weight.dtype)
        return (lambda_b.unsqueeze(1) * b) @ (lambda_d.unsqueeze(1) * a)
