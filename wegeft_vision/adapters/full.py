"""Full fine-tuning: every parameter of the model trains."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import AdapterConfig, register_method


@register_method
@dataclass
class FullFinetuneConfig(AdapterConfig):
    """Every parameter trains (checkpoints then hold the whole model)."""

    method = "full"

    def extra_trainable(self, model: nn.Module) -> list[str]:
        return [name for name, _ in model.named_parameters()]
