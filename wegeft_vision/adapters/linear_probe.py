"""The linear probe: only the classifier head trains (the head always trains; nothing else)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import AdapterConfig, register_method


@register_method
@dataclass
class LinearProbeConfig(AdapterConfig):
    """Only the classifier head trains."""

    method = "linear_probe"
