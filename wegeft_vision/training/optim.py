"""AdamW with decay on matrices only, and a per-step linear warm-up followed by a cosine decay."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.optim import param_groups_weight_decay
from torch import nn


@dataclass
class WarmupCosine:
    """Learning-rate multiplier for ``LambdaLR``: linear from ``warmup_lr`` to ``lr`` over
    ``warmup_steps``, then half a cosine down to ``min_lr`` at ``total_steps``.

    A plain dataclass rather than a closure, so that the scheduler's state dict (and with it a
    resumed run) keeps the schedule.
    """

    lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {self.warmup_steps} "
                             f"and {self.total_steps}")

    def learning_rate(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / decay_steps) if decay_steps else 1.0
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.learning_rate(step) / self.lr


def build_adamw(model: nn.Module, lr: float, weight_decay: float,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases, 1-D tensors and the model's
    ``no_weight_decay()`` names (timm: pos_embed, cls_token) get no weight decay."""
    skip = getattr(model, "no_weight_decay", lambda: set())()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
