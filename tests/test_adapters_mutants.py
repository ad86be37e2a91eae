"""Adapter behaviour that the mutation run (docs/development.md) found unchecked.

timm initialises every ViT bias to zero, so a test model built with ``pretrained=False`` cannot
tell a layer that adds its bias from one that drops it: the models here get non-zero biases.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from wegeft_vision import (LoRAConfig, WeGeFTConfig, apply_adapter, load_adapter, remove_adapter,
                           save_adapter)
from wegeft_vision.adapters import get_adapter

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=7)


def adapted_vit(config, seed: int = 0) -> nn.Module:
    """A tiny float64 ViT with random non-zero biases and adapter tensors."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **TINY)
    model = model.to(torch.float64).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen,
                                              dtype=torch.float64))
        apply_adapter(model, config)
        for param in get_adapter(model).parameters():
            param.copy_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return model


def tokens(n: int = 5, d: int = 32) -> torch.Tensor:
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("plain", [False, True], ids=["fast", "plain"])
@pytest.mark.parametrize("parts", [None, ("q", "v")])
def test_wegeft_layer_adds_its_bias(plain, parts):
    """y = W(x + phi(psi(x))) + b with b != 0, in the fast and the plain form (the plain form is
    the fast path's reference, so it is checked against this independent sum)."""
    model = adapted_vit(WeGeFTConfig(rank=3, targets="attn.qkv", qkv_parts=parts))
    layer = model.blocks[0].attn.qkv
    w, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    assert b.abs().min() > 0
    x = tokens()
    d = w.shape[0] // 3
    expected = F.linear(x, w, b)
    for index, part in enumerate(("q", "k", "v") if parts else (None,)):
        edit = layer.edits.get(part)
        if edit is None:
            continue
        rows = slice(None) if part is None else slice(index * d, (index + 1) * d)
        h = x @ edit.psi.weight.T @ edit.phi.weight.T
        expected[:, rows] += h @ w[rows].T
    layer.fast = not plain
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_lora_layer_adds_its_bias():
    model = adapted_vit(LoRAConfig(rank=3, targets="attn.proj"))
    layer = model.blocks[0].attn.proj
    (edit,) = layer.edits.values()
    w, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    x = tokens()
    expected = F.linear(x, w, b) + x @ edit.lora_A.weight.T @ edit.lora_B.weight.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_adapted_layer_repr_names_its_edits():
    """The printed model says which parts of each layer carry an edit."""
    model = adapted_vit(WeGeFTConfig(rank=2, targets=("attn.qkv", "attn.proj"),
                                     qkv_parts=("q", "v")))
    assert model.blocks[0].attn.qkv.extra_repr() == "edits=(q, v)"
    assert model.blocks[0].attn.proj.extra_repr() == "edits=(all)"
    assert "edits=(q, v)" in repr(model)


def _vit(depth: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False,
                             **{**TINY, "depth": depth, "embed_dim": width})


@pytest.mark.parametrize("saved, here, difference", [
    ((4, 32), (4, 48), "4 layers, this model 4: the backbones differ (other shapes: "
     + ", ".join(f"blocks.{i}.attn.proj (32x32 in the file, 48x48 here)" for i in range(4))),
    ((3, 32), (2, 32), "3 layers, this model 2: the backbones differ (adapted in the file only: "
     "blocks.2.attn.proj"),
])
def test_adapter_file_from_another_backbone_names_the_layers(tmp_path, saved, here, difference):
    """Per-layer generators (shared=False) so the tensors alone would not catch the difference:
    the error lists every differing layer, up to four of them without a "(+N more)"."""
    config = WeGeFTConfig(rank=2, targets="attn.proj", shared=False)
    path = save_adapter(apply_adapter(_vit(*saved), config), tmp_path / "a.safetensors")
    with pytest.raises(ValueError) as info:
        load_adapter(_vit(*here), path)
    assert str(info.value) == (f"{path} adapts {difference}); pass check_backbone=False to load "
                               "it anyway (deliberate transfer)")


def test_remove_adapter_without_one_says_so():
    with pytest.raises(ValueError, match=r"^cannot remove the adapter: VisionTransformer has no "
                       r"adapter \(call apply_adapter first\)$"):
        remove_adapter(_vit(1, 32))


@pytest.mark.parametrize("alpha", [6.0, 1.5])  # scale alpha / rank = 2 (a common LoRA choice), 0.5
def test_lora_scales_by_alpha_over_rank(alpha):
    model = adapted_vit(LoRAConfig(rank=3, alpha=alpha, targets="attn.proj"))
    layer = model.blocks[0].attn.proj
    (edit,) = layer.edits.values()
    x = tokens()
    expected = (F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
                + alpha / 3 * x @ edit.lora_A.weight.T @ edit.lora_B.weight.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_lora_config_refuses_a_non_positive_alpha():
    with pytest.raises(ValueError, match=r"^alpha must be positive or None \(no scaling\), got 0"):
        LoRAConfig(rank=4, alpha=0)
