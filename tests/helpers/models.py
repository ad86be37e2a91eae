"""Tiny timm ViTs at a few named sizes, the only place the test suite defines them."""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Iterator

import timm
import torch
from torch import nn

# Every size has 32 px images in 8 px patches: 16 patches + the class token = 17 tokens a sample.
VIT_SIZES: dict[str, dict[str, Any]] = {
    # Adapter, family and protocol tests: head width 16, two blocks.
    "tiny": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    # The toy training task's backbone (weights files, fits through the CLI): the smallest width
    # that still learns the task in two epochs, which keeps the fits the suite runs short.
    "narrow": dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2),
    # The fast path: qkv and fc1 (d_in < d_out) take the input form of the kernel, proj and fc2
    # the output form, so both forms run (test_fast_path checks it).
    "wide": dict(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3),
}


def vit_kwargs(size: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """timm ``create_model`` keyword arguments of a named size, with ``overrides`` on top."""
    return {**VIT_SIZES[size], **overrides}


def create_vit(name: str = "vit_base_patch16_224", size: str = "tiny", *,
             dtype: torch.dtype = torch.float64, seed: int = 0, num_classes: int = 5,
             **overrides: Any) -> nn.Module:
    """A random timm model ``name`` at a named size, seeded, in ``dtype``, in eval mode.

    ``name`` picks the family (its block and attention classes); the size replaces its widths.
    float64 by default, so that adapted, merged and reference outputs compare exactly.
    """
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes,
                              **vit_kwargs(size, **overrides))
    return model.to(dtype).eval()


@functools.lru_cache(maxsize=None)
def _vit_b16_meta(num_classes: int) -> nn.Module:
    # Built on the CPU and then moved: timm 1.0.16 (our lower bound) calls .item() while building
    # (its drop-path schedule), which the meta device cannot answer. One build a session, ~2.5 s.
    return timm.create_model("vit_base_patch16_224", pretrained=False,
                             num_classes=num_classes).to("meta")


def vit_b16_on_meta(num_classes: int = 100) -> nn.Module:
    """ViT-B/16 (86M parameters) with shapes and no storage, for parameter counts: a fresh copy
    each call (copying meta tensors costs nothing), so callers may adapt it in place."""
    return copy.deepcopy(_vit_b16_meta(num_classes))


@contextlib.contextmanager
def plain_form(model: nn.Module) -> Iterator[None]:
    """Within this context ``model``'s WeGeFT layers run the plain autograd form (``fast =
    False``): the reference the fast kernel is compared with."""
    from wegeft_vision.adapters import WeGeFTLinear

    layers = [m for m in model.modules() if isinstance(m, WeGeFTLinear)]
    for layer in layers:
        layer.fast = False
    try:
        yield
    finally:
        for layer in layers:
            layer.fast = True
