"""WeGeFT, LoRA, DoRA and VeRA on every timm ViT family we support, on small random models.

For each family, with the adapter on all four block projections ("all"): the adapted layers are
exactly the blocks' projections; the model starts at its pretrained output and moves once the
factors are non-zero; every adapter tensor gets a gradient; the merged model equals the adapted
one (float64) and is a plain timm model whose only changed tensors are the adapted weights.
EVA and BEiT attention compute qkv with their own q/v biases; the adapted layer serves that
(timm's ``qkv_bias_separate``): merged == adapted together with the gradients catches an adapter
silently bypassed there.
"""
from __future__ import annotations

import re

import pytest
import timm
import torch
from torch import nn

from wegeft_vision import (DoRAConfig, LoRAConfig, VeRAConfig, WeGeFTConfig, apply_adapter,
                           merge_adapter)
from wegeft_vision.adapters import AdaptedLinear, get_adapter

from tests.helpers.models import create_vit, vit_kwargs

TINY = vit_kwargs("tiny", num_classes=5)
# family: (timm name, extra kwargs, the layer names each block's preset "all" adapts). Layer
# scales are set large where timm starts them near zero, so that the blocks' edits show.
BLOCK = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
FAMILIES = {
    "vit": ("vit_base_patch16_224", {}, BLOCK),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, BLOCK),
    "deit3": ("deit3_small_patch16_224", {"init_values": 0.5}, BLOCK),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", {"init_values": 0.5}, BLOCK),
    "clip": ("vit_base_patch16_clip_224", {}, BLOCK),
    "siglip": ("vit_base_patch16_siglip_224", {}, BLOCK),  # attn_pool.mlp stays frozen
    "eva02": ("eva02_tiny_patch14_224", {}, BLOCK),  # q/v biases beside qkv; packed SwiGLU fc1
    "eva02_split": ("eva02_tiny_patch14_224", {"scale_mlp": True, "qkv_fused": False},
                    ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "mlp.fc1_g",
                     "mlp.fc1_x", "mlp.fc2")),
    "beit": ("beit_base_patch16_224", {}, BLOCK),  # q/v biases beside qkv
    "vit_relpos": ("vit_relpos_base_patch16_224", {"init_values": 0.5}, BLOCK),  # not rel_pos.mlp
    "flexivit": ("flexivit_small", {}, BLOCK),
}
# Every method that edits linear layers; VPT and BitFit on these families: tests/test_vpt_bitfit.py.
CONFIGS = {"wegeft": WeGeFTConfig(rank=2, targets="all"), "lora": LoRAConfig(rank=2, targets="all"),
           "dora": DoRAConfig(rank=2, targets="all"), "vera": VeRAConfig(rank=2, targets="all")}


def create(family: str) -> nn.Module:
    name, extra, _ = FAMILIES[family]
    return create_vit(name, num_classes=5, **extra)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_on_family(family: str, method: str) -> None:
    plain = create(family)
    model = apply_adapter(create(family), CONFIGS[method])
    layers = sorted(n for n, m in model.named_modules() if isinstance(m, AdaptedLinear))
    expected = sorted(f"blocks.{i}.{kind}" for i in range(TINY["depth"])
                      for kind in FAMILIES[family][2])
    assert layers == expected
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = plain(x)
        torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-12)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in get_adapter(model).parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.3)

    adapted = model(x)
    assert (adapted - reference).norm() > 1e-3 * reference.norm(), "the edits must show"
    (adapted * torch.randn(adapted.shape, generator=gen, dtype=adapted.dtype)).sum().backward()
    for name, param in get_adapter(model).named_parameters():
        assert param.grad is not None and param.grad.abs().min() > 0, name

    merge_adapter(model)
    with torch.no_grad():
        merged = model(x)
    assert (merged - adapted).norm() / adapted.norm() < 1e-9
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    state, original = model.state_dict(), plain.state_dict()
    assert list(state) == list(original)  # exactly timm's keys, in timm's order
    changed = sorted(k for k in state if not torch.equal(state[k], original[k]))
    assert changed == sorted(f"{n}.weight" for n in expected)
    assert all(re.match(r"blocks\.\d+\.", k) for k in changed)
    timm.create_model(FAMILIES[family][0], pretrained=False, **TINY, **FAMILIES[family][1]
                      ).load_state_dict(state, strict=True)


@pytest.mark.parametrize("family, targets, expected", [
    ("siglip", "attn_pool.mlp.fc1", ["attn_pool.mlp.fc1"]),
    ("vit_relpos", r"blocks\.1\.attn\.rel_pos\.mlp\.fc\d", ["blocks.1.attn.rel_pos.mlp.fc1",
                                                             "blocks.1.attn.rel_pos.mlp.fc2"]),
    ("eva02_split", "mlp.fc1_g", ["blocks.0.mlp.fc1_g", "blocks.1.mlp.fc1_g"]),
])
def test_explicit_names_reach_what_they_name(family: str, targets: str, expected: list) -> None:
    model = apply_adapter(create(family), LoRAConfig(rank=2, targets=targets))
    assert sorted(n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)) == expected


def test_shared_generator_of_split_projections_equals_the_fused_one() -> None:
    """EVA with separate q/k/v_proj under "attn.qkv": one generator, so dW = [Wq; Wk; Wv]·phi·psi
    as for a fused qkv layer holding the same rows."""
    model = apply_adapter(create("eva02_split"), WeGeFTConfig(rank=2, targets="attn"))
    gens = get_adapter(model).edits
    assert sorted(gens) == ["attn_proj", "attn_qkv"]
    attn = model.blocks[1].attn
    assert attn.q_proj.edits[None] is attn.k_proj.edits[None] is attn.v_proj.edits[None]
