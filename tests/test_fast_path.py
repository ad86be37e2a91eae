"""The WeGeFT fast path equals the plain form in outputs and every gradient, in every setting.

Float64 comparisons against :func:`wegeft_linear_plain` (the representation form written with plain
autograd ops); activation memory against the frozen floor; autocast and DDP
(torch.compile and torch.export: tests/test_compile_export.py).
"""
from __future__ import annotations

from typing import Optional

import pytest
import timm
import torch
import torch.distributed as dist
from torch import nn

from wegeft_vision import LoRAConfig, WeGeFTConfig, apply_adapter
from wegeft_vision.adapters import WeGeFTLinear
from wegeft_vision.adapters import functional
from wegeft_vision.adapters.functional import (EditSpec, plain_form, saved_activation_bytes,
                                               use_output_form, wegeft_linear,
                                               wegeft_linear_plain)

from tests.helpers.models import create_vit, vit_kwargs

TOL = 1e-10
# Tiny ViT: 17 tokens of width 96; batch 6 gives N = 102 tokens, enough for fc2 (96·4 -> 96) to
# take the output form while qkv, proj and fc1 take the input form (checked below).
VIT = vit_kwargs("wide", num_classes=5)
BATCH = 6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_vit(config: Optional[WeGeFTConfig], seed: int = 0, dtype=torch.float64) -> nn.Module:
    model = create_vit("vit_tiny_patch16_224", "wide", dtype=dtype, seed=seed).train()
    if config is not None:
        apply_adapter(model, config)
        with torch.no_grad():  # non-zero generators, so every product matters
            for param in model.adapter.parameters():
                param.normal_(0.0, 0.2)
    return model


def set_recompute(model: nn.Module, recompute: bool) -> None:
    for module in model.modules():
        if isinstance(module, WeGeFTLinear):
            module.recompute = recompute


def run(model: nn.Module, images: torch.Tensor, plain: bool = False, input_grad: bool = True
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, and the gradients of a fixed loss for the input and every trainable parameter."""
    model.zero_grad(set_to_none=True)
    images = images.detach().requires_grad_(input_grad)
    with plain_form() if plain else torch.enable_grad():
        logits = model(images)
    weights = torch.linspace(-1.0, 1.0, logits.numel(), dtype=torch.float64).view_as(logits)
    (logits.double() * weights).sum().backward()
    grads = {"input": images.grad} if input_grad else {}
    # DDP and torch.compile wrap the model; compare by the model's own parameter names.
    grads.update({n.removeprefix("module.").removeprefix("_orig_mod."): p.grad
                  for n, p in model.named_parameters() if p.requires_grad})
    return logits.detach(), grads


def assert_same(fast: tuple, plain: tuple, tol: float = TOL) -> None:
    (out_f, grads_f), (out_p, grads_p) = fast, plain
    assert rel_err(out_f, out_p) < tol
    assert grads_f.keys() == grads_p.keys()
    for name in grads_p:
        assert grads_f[name] is not None, name
        assert rel_err(grads_f[name], grads_p[name]) < tol, name


def test_tiny_vit_exercises_both_forms() -> None:
    tokens = BATCH * ((VIT["img_size"] // VIT["patch_size"]) ** 2 + 1)
    d = VIT["embed_dim"]
    assert use_output_form(tokens, 4 * d, d, whole=True)  # fc2
    for d_in, d_out in ((d, 3 * d), (d, d), (d, 4 * d)):  # qkv, proj, fc1
        assert not use_output_form(tokens, d_in, d_out, whole=True)


@pytest.mark.parametrize("config", [
    WeGeFTConfig(rank=4, targets="all"),
    WeGeFTConfig(rank=4, targets="all", shared=False, alpha=8.0),
    WeGeFTConfig(rank=3, targets="all", qkv_parts=("q", "v"), alpha=1.5),
    WeGeFTConfig(rank=4, targets=("attn.qkv",), qkv_parts=("k",), shared=False),
    WeGeFTConfig(rank=5, targets=("attn.proj",)),
], ids=["shared", "per-layer-alpha", "qkv-parts-q-v-alpha", "qkv-part-k", "proj"])
@pytest.mark.parametrize("recompute", [False, True], ids=["store", "recompute"])
def test_model_fast_path_equals_plain_form(config: WeGeFTConfig, recompute: bool) -> None:
    model = make_vit(config)
    set_recompute(model, recompute)
    images = torch.randn(BATCH, 3, 32, 32, dtype=torch.float64)
    assert_same(run(model, images), run(model, images, plain=True))


def test_training_without_input_gradient_equals_plain_form() -> None:
    # As in real training: the first block's qkv input needs no gradient, so g·W is skipped there.
    model = make_vit(WeGeFTConfig(rank=4, targets="all"))
    images = torch.randn(BATCH, 3, 32, 32, dtype=torch.float64)
    assert_same(run(model, images, input_grad=False),
                run(model, images, plain=True, input_grad=False))


def test_recompute_in_chunks_equals_plain_form(monkeypatch: pytest.MonkeyPatch) -> None:
    # One sample per chunk, so x is rebuilt and reduced piece by piece.
    monkeypatch.setattr(functional, "_CHUNK_ELEMENTS", 1)
    model = make_vit(WeGeFTConfig(rank=4, targets="all", qkv_parts=("q", "v"), alpha=3.0))
    set_recompute(model, True)
    images = torch.randn(BATCH, 3, 32, 32, dtype=torch.float64)
    assert_same(run(model, images), run(model, images, plain=True))


def _as_in_another_torch(node: object, change: str) -> object:
    """``node`` as a PyTorch that renamed (or gave new meanings to) the saved attributes shows it.

    The proxy's class takes the node's class name, so the recipe table still picks the recipe.
    """
    def __getattr__(self, name: str) -> object:
        if change == "renamed" and name.startswith("_saved_"):
            raise AttributeError(f"'{type(node).__name__}' object has no attribute '{name}'")
        if change == "redefined" and name in ("_saved_result1", "_saved_result2"):
            # LayerNorm's mean and rstd in the other order.
            name = {"_saved_result1": "_saved_result2", "_saved_result2": "_saved_result1"}[name]
        gelu = type(node).__name__ == "GeluBackward0"
        if change == "redefined" and gelu and name == "_saved_self":
            return torch.nn.functional.gelu(node._saved_self)  # its output, not its input
        return getattr(node, name)

    return type(type(node).__name__, (), {"__getattr__": __getattr__})()


@pytest.mark.parametrize("change", ["renamed", "redefined"])
def test_recompute_falls_back_to_saving_x(monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    # Recompute reads private autograd attributes: another PyTorch must cost memory, never a crash
    # or a wrong gradient.
    recipes = dict(functional._RECIPES)
    monkeypatch.setattr(functional, "_RECIPES", {
        name: (lambda node, x, make=make: make(_as_in_another_torch(node, change), x))
        for name, make in recipes.items()})
    monkeypatch.setattr(functional, "_RECIPE_WORKS", {}, raising=False)
    model = make_vit(WeGeFTConfig(rank=4, targets="all", qkv_parts=("q", "v"), alpha=2.0))
    images = torch.randn(BATCH, 3, 32, 32, dtype=torch.float64)
    set_recompute(model, True)
    with pytest.warns(RuntimeWarning) as caught:
        fast = run(model, images)
    assert_same(fast, run(model, images, plain=True))
    messages = "\n".join(str(w.message) for w in caught)
    unusable = {"GeluBackward0", "NativeLayerNormBackward0"}
    if change == "renamed":
        unusable.add("UnsafeViewBackward0" if "UnsafeViewBackward0" in messages
                     else "ViewBackward0")
        assert "AttributeError" in messages
    else:
        assert "the rebuilt input differs from the input" in messages
    for name in unusable:
        assert f"what {name} saves in torch {torch.__version__}" in messages
    params = list(model.parameters())
    saved = saved_activation_bytes(model(images), params)
    set_recompute(model, False)
    stored = saved_activation_bytes(model(images), params)
    # Every layer whose recipe failed saves x. (attn.proj's input is a view of what attention
    # saves here, so whether its recipe works changes no byte.)
    assert saved == stored


def _layer_case(d_in: int, d_out: int, parts: tuple[Optional[str], ...], scale: float,
                bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rank = 3
    weight = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    size = d_out // 3
    edits = []
    for part in parts:
        rows = None if part is None else ("q", "k", "v").index(part)
        edits.append(EditSpec(
            psi=torch.randn(rank, d_in, generator=g, dtype=torch.float64).requires_grad_(),
            phi=torch.randn(d_in, rank, generator=g, dtype=torch.float64).requires_grad_(),
            scale=scale, rows=None if rows is None else (rows * size, (rows + 1) * size)))
    x = torch.randn(2, 7, d_in, generator=g, dtype=torch.float64)
    return x, weight, b, edits


def _layer_grads(fn, x, weight, bias, edits, x_grad: bool):
    x = x.detach().requires_grad_(x_grad)
    for e in edits:
        e.psi.grad = e.phi.grad = None
    out = fn(x, weight, bias, edits)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    grads = [t.grad for e in edits for t in (e.psi, e.phi)] + ([x.grad] if x_grad else [])
    return out.detach(), grads


@pytest.mark.parametrize("output_form", [False, True], ids=["input-form", "output-form"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "no-x-grad"])
@pytest.mark.parametrize("scale,bias", [(1.0, True), (0.375, False)], ids=["s1-bias", "s-nobias"])
def test_layer_forms_equal_plain(output_form: bool, x_grad: bool, scale: float,
                                 bias: bool) -> None:
    x, weight, b, edits = _layer_case(12, 9, (None,), scale, bias)
    fast = _layer_grads(lambda *a: wegeft_linear(*a, output_form=output_form), x, weight, b,
                        edits, x_grad)
    plain = _layer_grads(wegeft_linear_plain, x, weight, b, edits, x_grad)
    assert rel_err(fast[0], plain[0]) < TOL
    for got, want in zip(fast[1], plain[1]):
        assert rel_err(got, want) < TOL


@pytest.mark.parametrize("parts", [("q",), ("q", "v"), ("q", "k", "v")])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "no-x-grad"])
def test_qkv_parts_equal_plain(parts: tuple[str, ...], x_grad: bool) -> None:
    x, weight, b, edits = _layer_case(8, 24, parts, 2.0, True)
    fast = _layer_grads(wegeft_linear, x, weight, b, edits, x_grad)
    plain = _layer_grads(wegeft_linear_plain, x, weight, b, edits, x_grad)
    assert rel_err(fast[0], plain[0]) < TOL
    for got, want in zip(fast[1], plain[1]):
        assert rel_err(got, want) < TOL


def test_shared_generator_used_twice_accumulates() -> None:
    x, weight, b, edits = _layer_case(10, 10, (None,), 1.0, True)

    def twice(fn):
        def apply(x, weight, bias, edits):
            return fn(torch.tanh(fn(x, weight, bias, edits)), weight, bias, edits)
        return apply

    fast = _layer_grads(twice(wegeft_linear), x, weight, b, edits, True)
    plain = _layer_grads(twice(wegeft_linear_plain), x, weight, b, edits, True)
    for got, want in zip(fast[1], plain[1]):
        assert rel_err(got, want) < TOL


def test_trainable_base_weight_gets_its_gradient() -> None:
    x, weight, b, edits = _layer_case(6, 6, (None,), 1.0, True)
    grads = []
    for fn in (wegeft_linear, wegeft_linear_plain):
        w = weight.clone().requires_grad_()
        fn(x, w, b, edits).sum().backward()
        grads.append(w.grad)
    assert rel_err(grads[0], grads[1]) < TOL


def test_bad_edit_combinations_raise() -> None:
    x, weight, b, edits = _layer_case(8, 24, (None, "q"), 1.0, True)
    with pytest.raises(ValueError, match="whole-layer edit cannot be combined"):
        wegeft_linear(x, weight, b, edits)
    x, weight, b, edits = _layer_case(8, 24, ("q",), 1.0, True)
    with pytest.raises(ValueError, match="need the output form"):
        wegeft_linear(x, weight, b, edits, output_form=False)


def _hook_bytes(model: nn.Module, images: torch.Tensor) -> int:
    """Saved bytes counted by saved_tensors_hooks (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images)
    return sum(storages.values())


def test_recompute_saves_only_h_over_the_floor() -> None:
    """With recompute on, the adapted model saves the frozen model's tensors plus N x r per layer."""
    images = torch.randn(BATCH, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    floor = make_vit(None)
    for name, param in floor.named_parameters():
        param.requires_grad_(name.startswith("head."))  # as in the adapted model
    floor_bytes = saved_activation_bytes(floor(images), list(floor.parameters()))
    assert floor_bytes == _hook_bytes(floor, images)  # the graph walk counts what hooks see

    rank = 4
    model = make_vit(WeGeFTConfig(rank=rank, targets="all"))
    params = list(model.parameters())
    layers = [m for m in model.modules() if isinstance(m, WeGeFTLinear)]
    assert len(layers) == 4 * VIT["depth"]
    tokens = BATCH * 17
    h_bytes = len(layers) * tokens * rank * 8
    with plain_form():
        plain_bytes = saved_activation_bytes(model(images), params)
        assert plain_bytes == _hook_bytes(model, images)
    set_recompute(model, False)
    assert saved_activation_bytes(model(images), params) == plain_bytes
    set_recompute(model, True)
    assert saved_activation_bytes(model(images), params) == floor_bytes + h_bytes
    # Under saved-tensor hooks (offloading, checkpointing) recompute stands down: x is saved.
    assert _hook_bytes(model, images) == plain_bytes


def test_wegeft_saves_no_more_than_lora() -> None:
    images = torch.randn(BATCH, 3, 32, 32, dtype=torch.float64)
    lora = make_vit(None)
    apply_adapter(lora, LoRAConfig(rank=4, targets="all"))
    wegeft = make_vit(WeGeFTConfig(rank=4, targets="all"))
    for recompute in (False, True):
        set_recompute(wegeft, recompute)
        assert (saved_activation_bytes(wegeft(images), list(wegeft.parameters()))
                <= saved_activation_bytes(lora(images), list(lora.parameters())))


def test_autocast_bf16_on_cpu() -> None:
    model = make_vit(WeGeFTConfig(rank=4, targets="all", qkv_parts=None), dtype=torch.float32)
    images = torch.randn(BATCH, 3, 32, 32)
    results = []
    for plain in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run(model, images, plain=plain))
    (out_f, grads_f), (out_p, grads_p) = results
    assert out_f.dtype == out_p.dtype == torch.bfloat16
    assert rel_err(out_f.float(), out_p.float()) < 3e-2
    reference = run(model, images)  # float32, no autocast
    for name, grad in grads_f.items():
        assert grad.dtype == torch.float32, name
        assert rel_err(grad, reference[1][name]) < 0.1, name
        assert rel_err(grad, grads_p[name]) < 0.1, name


def test_ddp_gradients_match_plain(tmp_path) -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = make_vit(WeGeFTConfig(rank=4, targets="all"))
        images = torch.randn(BATCH, 3, 32, 32, dtype=torch.float64)
        plain = run(model, images, plain=True)
        ddp = nn.parallel.DistributedDataParallel(model)
        assert_same(run(ddp, images), plain)
    finally:
        dist.destroy_process_group()


def test_recompute_config_field() -> None:
    assert WeGeFTConfig().recompute is True
    with pytest.raises(TypeError, match="recompute must be True or False, got 'yes'"):
        WeGeFTConfig(recompute="yes")
