"""Adapted models under torch.compile and torch.export equal the eager plain form.

Float64 tiny timm ViTs with WeGeFT on all four projections, WeGeFT on the q and v parts of qkv, and
LoRA, all with non-zero adapter weights. The reference is the eager model in
:func:`functional.plain_form` (plain autograd ops; for LoRA the same as eager).

torch.compile runs with the "aot_eager" backend: it goes through Dynamo and AOTAutograd (where the
autograd.Function, the no-grad path and the dynamic shapes are traced) but leaves out Inductor's
C++ code generation, which takes minutes per model on a small CPU and adds nothing these tests
check.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wegeft_vision import LoRAConfig, WeGeFTConfig, apply_adapter
from wegeft_vision.adapters.functional import plain_form, use_output_form

from tests.helpers.models import create_vit, vit_kwargs

VIT = vit_kwargs("wide", num_classes=5)
# Batch 6 (102 tokens) puts fc2 (384 -> 96) in the output form and the other layers in the input
# form; at batch 2 (34 tokens) eager takes the input form for fc2 too, exported graphs the output
# form (no branch on a dynamic batch): both forms are checked against the plain form.
BATCH = 6
CONFIGS = {
    "wegeft-all": WeGeFTConfig(rank=4, targets="all", alpha=8.0),
    "wegeft-qv": WeGeFTConfig(rank=3, targets="all", qkv_parts=("q", "v")),
    "lora-all": LoRAConfig(rank=4, targets="all"),
}
TOL = 1e-10


@pytest.fixture(autouse=True)
def fresh_compiler_cache() -> None:
    # Every test compiles timm's VisionTransformer.forward again (new model, grad mode); without a
    # reset the count across tests reaches Dynamo's recompile limit and fullgraph=True fails.
    torch.compiler.reset()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_model(name: str) -> nn.Module:
    model = create_vit("vit_tiny_patch16_224", "wide").train()
    apply_adapter(model, CONFIGS[name])
    with torch.no_grad():  # non-zero factors (LoRA's B and WeGeFT's psi start at zero)
        for param in model.adapter.parameters():
            param.normal_(0.0, 0.2)
    return model


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def loss_and_grads(model: nn.Module, x: torch.Tensor, plain: bool = False
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    labels = torch.arange(x.shape[0]) % VIT["num_classes"]
    with plain_form() if plain else torch.enable_grad():
        loss = F.cross_entropy(model(x), labels)
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad
                           for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", CONFIGS)
def test_compiled_training_equals_eager(name: str) -> None:
    model = make_model(name)
    x = images(BATCH)
    loss, grads = loss_and_grads(torch.compile(model, backend="aot_eager", fullgraph=True), x)
    ref_loss, ref_grads = loss_and_grads(model, x, plain=True)
    assert rel_err(loss, ref_loss) < TOL
    assert grads.keys() == ref_grads.keys() and any(n.startswith("adapter.") for n in grads)
    for param_name, grad in grads.items():
        assert grad is not None, param_name
        assert rel_err(grad, ref_grads[param_name]) < TOL, param_name


@pytest.mark.parametrize("name", CONFIGS)
def test_compiled_inference_equals_eager(name: str) -> None:
    model = make_model(name).eval()
    x = images(BATCH)
    with plain_form(), torch.no_grad():
        reference = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():  # compiled validation and prediction
        assert rel_err(compiled(x), reference) < TOL
    # Grad mode on, but nothing needs a gradient (a frozen adapted model inside a larger one):
    # Dynamo inlines autograd.Functions here too.
    model.requires_grad_(False)
    assert rel_err(compiled(x), reference) < TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_export_with_dynamic_batch_equals_eager(name: str) -> None:
    tokens, d = (VIT["img_size"] // VIT["patch_size"]) ** 2 + 1, VIT["embed_dim"]
    assert not use_output_form(2 * tokens, 4 * d, d, whole=True)  # fc2, eager at batch 2
    assert use_output_form(None, 4 * d, d, whole=True)  # fc2, exported
    model = make_model(name).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (images(3),), dynamic_shapes=({0: batch},))
    exported = program.module()
    for size in (2, BATCH):
        x = images(size, seed=size)
        with plain_form(), torch.no_grad():
            reference = model(x)
        with torch.no_grad():
            assert rel_err(exported(x), reference) < TOL, size
            assert rel_err(model(x), reference) < TOL, size  # eager fast path, same inputs
