"""BitFit (Ben Zaken et al., ACL 2022), the paper's bias-only baseline: only biases train.

Nothing is injected: the trained tensors are timm's own biases, named by ``extra_trainable``, so
the adapted model is the plain timm model and merging only takes the (empty) adapter off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import UserError
from .base import AdapterConfig, register_method
from .model import head_parameter_names

BIASES = ("linear", "all")
# EVA and BEiT keep the fused qkv layer's bias beside a bias-free nn.Linear, as two vectors (the
# k part has none): they are that linear layer's bias, so both choices train them.
QKV_BIASES = ("q_bias", "v_bias")


@register_method
@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit: train biases only (and the head).

    Args:
        biases: ``"linear"``: the bias of every ``nn.Linear`` outside the head, as the WeGeFT
            authors' BitFit (savadikarc/gift ``gift/bitfit_wrapper.py``); on a ViT the blocks'
            qkv, proj, fc1 and fc2 (ViT-B/16: 12 x (2,304 + 768 + 3,072 + 768) = 82,944).
            ``"all"``: every bias outside the head, LayerNorms and the patch embedding too, as
            VPT's and V-PETL Bench's BitFit (ViT-B/16: 102,912). EVA's and BEiT's ``q_bias`` and
            ``v_bias`` (the fused qkv layer's bias) train in both.
    """

    method: ClassVar[str] = "bitfit"
    biases: str = "linear"

    def __post_init__(self) -> None:
        if self.biases not in BIASES:
            raise UserError(f"BitFit biases must be one of {BIASES}, got {self.biases!r}")

    def inject(self, model: nn.Module) -> dict[str, nn.Module]:
        if not self.extra_trainable(model):
            raise UserError(f"BitFit (biases={self.biases!r}) finds no bias to train in "
                            f"{type(model).__name__}")
        return {}

    def extra_trainable(self, model: nn.Module) -> list[str]:
        head = set(head_parameter_names(model))
        names = []
        for prefix, module in model.named_modules():
            for leaf, param in module.named_parameters(recurse=False):
                is_bias = leaf in QKV_BIASES or (leaf == "bias" and (
                    self.biases == "all" or isinstance(module, nn.Linear)))
                name = f"{prefix}.{leaf}" if prefix else leaf
                if is_bias and param is not None and name not in head:
                    names.append(name)
        return names
