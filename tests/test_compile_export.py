"""Adapted models under torch.compile and torch.export equal the eager plain form.

Float64 tiny timm ViTs with WeGeFT on all four projections, WeGeFT on the q and v parts of qkv, and
LoRA, all with non-zero adapter weights. The reference is the eager model with its WeGeFT layers in
the plain form (``fast = False``: plain autograd ops; for LoRA the same as eager).

torch.compile runs with the "aot_eager" backend: it goes through Dynamo and AOTAutograd (where the
autograd.Function, the no-grad path and the dynamic shapes are traced) but leaves out Inductor's
C++ code generation, which takes minutes per model on a small CPU and adds nothing these tests
check.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from wegeft_vision import LoRAConfig, WeGeFTConfig, apply_adapter
from tests.helpers.models import create_vit, plain_form, vit_kwargs
from tests.helpers.training import (BACKBONE, BACKBONE_KWARGS, NUM_CLASSES, make_backbone_file,
                                    make_toy_task, write_config)

VIT = vit_kwargs("wide", num_classes=5)
# qkv and fc1 run the input form, proj and fc2 the output form: both are checked.
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
    labels = torch.arange(x.shape[0], device=x.device) % VIT["num_classes"]
    with plain_form(model) if plain else contextlib.nullcontext():
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
    with plain_form(model), torch.no_grad():
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
    model = make_model(name).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (images(3),), dynamic_shapes=({0: batch},))
    exported = program.module()
    for size in (2, BATCH):
        x = images(size, seed=size)
        with plain_form(model), torch.no_grad():
            reference = model(x)
        with torch.no_grad():
            assert rel_err(exported(x), reference) < TOL, size
            assert rel_err(model(x), reference) < TOL, size  # eager fast path, same inputs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["wegeft-all", "wegeft-qv"])
def test_inductor_on_cuda_equals_eager(name: str) -> None:
    # What a GPU run compiles: Inductor's generated kernels, in float32 (its sums may reorder).
    model = make_model(name).float().cuda()
    x = images(BATCH).float().cuda()
    loss, grads = loss_and_grads(torch.compile(model, fullgraph=True), x)
    ref_loss, ref_grads = loss_and_grads(model, x, plain=True)
    assert rel_err(loss, ref_loss) < 1e-4
    for param_name, grad in grads.items():
        assert rel_err(grad, ref_grads[param_name]) < 1e-3, param_name


def test_cli_fit_with_compile_keeps_checkpoints_resume_and_export(tmp_path: Path) -> None:
    # --model.compile compiles the backbone in place: the checkpoint holds the uncompiled
    # model's keys (no "_orig_mod."), it loads without compiling, resumes and exports.
    # aot_eager: Dynamo and AOTAutograd without Inductor's C++ build (minutes on a small CPU).
    from safetensors.torch import load_file

    from wegeft_vision.cli import cli_main
    from wegeft_vision.training import ViTClassifier
    from wegeft_vision.training.export import export_checkpoint

    make_toy_task(tmp_path / "data")
    weights = make_backbone_file(tmp_path / "backbone.safetensors")
    config = write_config(tmp_path / "fit.yaml", tmp_path / "data", weights, tmp_path / "logs",
                          compile=True, compile_kwargs={"backend": "aot_eager"})
    cli = cli_main(["fit", "--config", str(config)])
    assert cli.model.model._compiled_call_impl is not None  # nn.Module.compile ran
    ckpt = Path(cli.trainer.checkpoint_callback.best_model_path)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert sorted(saved["state_dict"]) == sorted(cli.model.trainable_names())
    assert not any("_orig_mod" in key for key in saved["state_dict"])

    loaded = ViTClassifier.from_checkpoint(ckpt)
    assert loaded.model._compiled_call_impl is None  # compiling is for trainer runs
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        compiled_logits = cli.model.eval()(x)
        assert rel_err(loaded(x), compiled_logits) < 1e-5

    resumed = cli_main(["fit", "--config", str(config), "--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == cli.trainer.global_step  # restored at the end already
    for name, tensor in resumed.model.state_dict().items():
        if name in saved["state_dict"]:
            assert torch.equal(tensor, saved["state_dict"][name]), name

    exported = load_file(export_checkpoint(ckpt, tmp_path / "export")[0])
    plain = timm.create_model(BACKBONE, pretrained=False, num_classes=NUM_CLASSES,
                              **BACKBONE_KWARGS)
    assert sorted(exported) == sorted(plain.state_dict())


def test_compile_options_are_checked() -> None:
    from wegeft_vision.errors import UserError
    from wegeft_vision.training.module import compile_options

    assert compile_options(False, None) is None
    assert compile_options(True, None) == {}
    assert compile_options(True, {"backend": "aot_eager"}) == {"backend": "aot_eager"}
    with pytest.raises(UserError, match="bakend is not a torch.compile option"):
        compile_options(True, {"bakend": "aot_eager"})
    with pytest.raises(UserError, match="compile is off"):
        compile_options(False, {"backend": "aot_eager"})
