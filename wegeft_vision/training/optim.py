"""The paper's optimisation, from the ecosystem's parts: timm's AdamW factory (decay on matrices
only) and torch's schedulers (a per-step linear warm-up, then a cosine decay)."""
from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def build_adamw(model: nn.Module, lr: float, weight_decay: float,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """``timm.optim.create_optimizer_v2(model, "adamw", ...)`` over the trainable parameters:
    biases, 1-D tensors and the model's ``no_weight_decay()`` names (timm: pos_embed, cls_token)
    get no weight decay."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, betas=betas,
                               eps=eps)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_lr: float, min_lr: float,
                  warmup_steps: int, total_steps: int) -> LRScheduler:
    """Step the learning rate from ``warmup_lr`` linearly up to the optimizer's ``lr`` over
    ``warmup_steps``, then down along half a cosine to ``min_lr`` at ``total_steps``.

    torch's ``LinearLR`` then ``CosineAnnealingLR`` in a ``SequentialLR``: their state dicts carry
    the schedule, so a resumed run continues it.
    """
    lr = optimizer.defaults["lr"]
    if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps > 0, got "
                         f"{warmup_steps} and {total_steps}")
    if warmup_steps and not 0 < warmup_lr <= lr:
        raise ValueError(f"warmup_lr must be in (0, lr={lr}] for a warm-up, got {warmup_lr}")
    schedulers = []
    if warmup_steps:
        schedulers.append(LinearLR(optimizer, start_factor=warmup_lr / lr, end_factor=1.0,
                                   total_iters=warmup_steps))
    if total_steps > warmup_steps:
        schedulers.append(CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps,
                                            eta_min=min_lr))
    if len(schedulers) == 1:
        return schedulers[0]
    return SequentialLR(optimizer, schedulers, milestones=[warmup_steps])
