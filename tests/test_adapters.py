"""The adaptation core on tiny timm ViT-family models: counts, identity start, merge, save/load."""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import re
import sys

import pytest
import timm
import torch
from torch import nn

from wegeft_vision import (FullFinetuneConfig, LinearProbeConfig, LoRAConfig, WeGeFTConfig,
                           apply_adapter, count_parameters, load_adapter, merge_adapter,
                           remove_adapter, save_adapter, unmerge_adapter)
from wegeft_vision.adapters import (AdaptedLinear, WeGeFTGenerator, adapter_state_dict,
                                    fingerprint, get_adapter, read_adapter_file,
                                    trainable_parameter_names)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=7)
ARCHS = {
    "vit": ("vit_base_patch16_224", {}),
    "deit": ("deit_tiny_patch16_224", {}),
    "dinov2": ("vit_small_patch14_dinov2", {"init_values": 0.5}),
    "clip": ("vit_base_patch16_clip_224", {}),
    "siglip": ("vit_base_patch16_siglip_224", {}),
}


def tiny_vit(arch: str = "vit", dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    name, extra = ARCHS[arch]
    model = timm.create_model(name, pretrained=False, **TINY, **extra)
    return model.to(dtype).eval()


def randomize_edits(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every adapter tensor random non-zero values (training would)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in get_adapter(model).parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)


def images(n: int = 4, dtype: torch.dtype = torch.float32, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def vit_b16() -> nn.Module:
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)


# ---------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("config, expected", [
    (WeGeFTConfig(rank=16, targets="attn.proj"), 2 * 768 * 16),
    (LoRAConfig(rank=8, targets="attn.proj"), 12 * (768 * 8 + 8 * 768)),
    (WeGeFTConfig(rank=8, targets="attn.qkv", qkv_parts=("q", "v")), 2 * (2 * 768 * 8)),
    (WeGeFTConfig(rank=16, targets="attn.proj", shared=False), 12 * 2 * 768 * 16),
    (WeGeFTConfig(rank=4, targets="all"), 2 * 4 * (768 + 768 + 768 + 3072)),
    (WeGeFTConfig(rank=4, targets="all", shared=False), 12 * 2 * 4 * (768 + 768 + 768 + 3072)),
    (LoRAConfig(rank=8, targets="attn.qkv", qkv_parts=("q", "v")), 12 * 2 * (768 * 8 + 8 * 768)),
    (LinearProbeConfig(), 0),
])
def test_parameter_counts_match_formulas(vit_b16, config, expected):
    model = apply_adapter(copy.deepcopy(vit_b16), config)
    counts = count_parameters(model)
    assert counts.trainable == expected
    assert counts.head == 768 * 100 + 100
    assert counts.backbone == sum(p.numel() for n, p in vit_b16.named_parameters()
                                  if not n.startswith("head."))
    assert counts.total == counts.backbone + counts.head + expected
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected + counts.head


def test_paper_setting_summary_line(vit_b16):
    model = apply_adapter(copy.deepcopy(vit_b16), WeGeFTConfig())
    assert str(count_parameters(model)) == "trainable 24,576 (0.029%) + head 76,900 | total 85.9M"


def test_full_finetune_trains_everything():
    model = apply_adapter(tiny_vit(), FullFinetuneConfig())
    assert all(p.requires_grad for p in model.parameters())
    assert count_parameters(model).percent == pytest.approx(100.0)


def test_shared_generator_is_one_set_of_parameters():
    model = apply_adapter(tiny_vit(), WeGeFTConfig(rank=4, targets="attn.proj"))
    gens = {id(m.edits[None]) for m in model.modules() if isinstance(m, AdaptedLinear)}
    assert len(gens) == 1
    names = [n for n, _ in model.named_parameters() if "psi" in n or "phi" in n]
    assert names == ["adapter.edits.attn_proj.psi.weight", "adapter.edits.attn_proj.phi.weight"]


# ---------------------------------------------------------------- forward behaviour

ALL_CONFIGS = [
    WeGeFTConfig(rank=4, targets="attn.proj"),
    WeGeFTConfig(rank=4, targets="attn"),
    WeGeFTConfig(rank=4, targets="mlp"),
    WeGeFTConfig(rank=4, targets="all"),
    WeGeFTConfig(rank=4, targets="all", shared=False),
    WeGeFTConfig(rank=4, targets="all", alpha=8.0),
    WeGeFTConfig(rank=4, targets="attn", qkv_parts=("q", "v")),
    WeGeFTConfig(rank=4, targets="all", qkv_parts=("k",), shared=False),
    LoRAConfig(rank=4, targets="all"),
    LoRAConfig(rank=4, targets="attn.qkv", qkv_parts=("q", "v"), alpha=16.0),
]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_identity_at_start(config):
    model = tiny_vit()
    x = images()
    with torch.no_grad():
        before = model(x)
        after = apply_adapter(model, config)(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["vit", "deit", "dinov2", "clip", "siglip"])
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_merged_matches_adapted(arch, config):
    model = apply_adapter(tiny_vit(arch), config)
    randomize_edits(model, std=0.5)
    x = images()
    with torch.no_grad():
        adapted = model(x)
        reference = tiny_vit(arch)(x)
        assert (adapted - reference).norm() > 1e-3 * reference.norm(), "edits must change it"
        merged = merge_adapter(model)(x)
    rel = (merged - adapted).norm() / adapted.norm()
    assert rel < 1e-5
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())


def test_merged_state_dict_loads_into_plain_timm_strictly():
    model = apply_adapter(tiny_vit("vit"), WeGeFTConfig(rank=4, targets="all"))
    randomize_edits(model)
    merge_adapter(model)
    plain = tiny_vit("vit")
    assert set(model.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))


def test_merge_formula_w_times_identity_plus_phi_psi():
    model = apply_adapter(tiny_vit(dtype=torch.float64),
                          WeGeFTConfig(rank=3, targets="attn.proj", alpha=6.0))
    randomize_edits(model)
    gen = get_adapter(model).edits["attn_proj"]
    original = model.blocks[1].attn.proj.base_layer.weight.detach().clone()
    merge_adapter(model)
    m = gen.phi.weight @ gen.psi.weight * (6.0 / 3)
    expected = original @ (torch.eye(32, dtype=torch.float64) + m)
    # A float64 merge is off by ~4e-16 relative, a float32 one by ~6e-8: tell them apart.
    error = (model.blocks[1].attn.proj.weight.detach() - expected).abs().max()
    assert error < 1e-12 * expected.abs().max()


@pytest.mark.parametrize("config_cls", [WeGeFTConfig, LoRAConfig])
@pytest.mark.parametrize("part, index", [("q", 0), ("k", 1), ("v", 2)])
def test_qkv_part_changes_its_own_rows_only(config_cls, part, index):
    """With d = out_features / 3, part q owns rows [0, d), k [d, 2d), v [2d, 3d): fixed slices,
    not taken from part_rows; forward and merged weight."""
    model = apply_adapter(tiny_vit(dtype=torch.float64),
                          config_cls(rank=3, targets="attn.qkv", qkv_parts=(part,)))
    randomize_edits(model)
    layer = model.blocks[0].attn.qkv
    d = layer.out_features // 3
    own = torch.zeros(3 * d, dtype=torch.bool)
    own[index * d:(index + 1) * d] = True
    (edit,) = layer.edits.values()
    w = layer.base_layer.weight.detach().clone()
    if config_cls is WeGeFTConfig:
        delta_w = w[own] @ edit.phi.weight @ edit.psi.weight
    else:
        delta_w = edit.lora_B.weight @ edit.lora_A.weight
    x = torch.randn(5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    assert torch.equal(delta[:, ~own], torch.zeros_like(delta[:, ~own]))
    torch.testing.assert_close(delta[:, own], x @ delta_w.T, rtol=1e-10, atol=1e-13)
    assert delta[:, own].norm(dim=0).min() > 1e-6
    merged = merge_adapter(model).blocks[0].attn.qkv.weight.detach()
    assert torch.equal(merged[~own], w[~own])
    torch.testing.assert_close(merged[own], w[own] + delta_w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("config", [WeGeFTConfig(rank=3, targets="attn.qkv"),
                                    WeGeFTConfig(rank=3, targets="attn.qkv", qkv_parts=("v",)),
                                    LoRAConfig(rank=3, targets="attn.qkv", qkv_parts=("q", "k"))],
                         ids=str)
def test_weight_read_directly_is_the_effective_weight(config):
    """Code that reads ``layer.weight`` (timm's EVA/BEiT attention) gets W + dW, with gradients
    to the edits; the state dict keeps the frozen W."""
    model = apply_adapter(tiny_vit(dtype=torch.float64), config)
    randomize_edits(model)
    layer = model.blocks[0].attn.qkv
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(nn.functional.linear(x, layer.weight, layer.bias), layer(x),
                               rtol=1e-12, atol=1e-14)
    frozen = model.state_dict()["blocks.0.attn.qkv.base_layer.weight"]
    assert torch.equal(frozen, tiny_vit(dtype=torch.float64).blocks[0].attn.qkv.weight)
    assert not torch.equal(layer.weight.detach(), frozen)
    layer.weight.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for edit in layer.edits.values() for p in edit.parameters())
    assert layer.base_layer.weight.grad is None


def test_remove_adapter_restores_original_layers():
    model = tiny_vit()
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    x = images()
    with torch.no_grad():
        before = model(x)
        apply_adapter(model, WeGeFTConfig(rank=4, targets="all"))
        randomize_edits(model)
        remove_adapter(model)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    restored = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert all(restored[n] is m for n, m in originals.items())
    assert all(p.requires_grad for p in model.parameters())


def _recover_m(layer: AdaptedLinear, part: str | None, d: int) -> torch.Tensor:
    """M from outputs alone: solve delta^T = W_p M X^T for M (W_p, X full column rank)."""
    x = torch.randn(64, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        delta = (layer(x) - layer.base_layer(x))[:, layer.part_rows(part)]
        w = layer.base_layer.weight[layer.part_rows(part)]
    return torch.linalg.pinv(w) @ delta.T @ torch.linalg.pinv(x.T)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("target, parts", [("attn.proj", None), ("mlp.fc1", None),
                                           ("attn.qkv", None), ("attn.qkv", ("q", "v"))])
def test_edit_is_w_times_low_rank_m(shared, target, parts):
    rank = 3
    model = apply_adapter(tiny_vit(dtype=torch.float64),
                          WeGeFTConfig(rank=rank, targets=target, shared=shared, qkv_parts=parts))
    randomize_edits(model)
    layers = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    assert len(layers) == 2
    for part in (parts or (None,)):
        ms = [_recover_m(layer, part, 32) for layer in layers]
        for m, layer in zip(ms, layers):
            singular = torch.linalg.svdvals(m)
            assert singular[rank - 1] > 1e-3 and singular[rank:].max() < 1e-8
            gen = layer.edits[part]
            torch.testing.assert_close(m, gen.phi.weight @ gen.psi.weight)
        same = torch.allclose(ms[0], ms[1], atol=1e-8)
        assert same is shared
    if parts:
        for layer in layers:
            x = torch.randn(5, 32, dtype=torch.float64)
            with torch.no_grad():
                k_rows = layer.part_rows("k")
                torch.testing.assert_close(layer(x)[:, k_rows], layer.base_layer(x)[:, k_rows],
                                           rtol=0, atol=1e-12)


# ---------------------------------------------------------------- the authors' layer

class AuthorsLinear(nn.Module):
    """The authors' vision layer, written independently of ours: y = Wx + b + x·dW^T with
    dW = out_proj(in_proj(W)) row by row; ``parts`` maps rows (start, stop) to (in_proj, out_proj)
    and rows outside every part get no residual."""

    def __init__(self, base: nn.Linear, parts: dict[tuple[int, int], tuple[nn.Linear, nn.Linear]]
                 ) -> None:
        super().__init__()
        self.base, self.parts = base, parts
        self.maps = nn.ModuleList(m for pair in parts.values() for m in pair)

    def delta(self) -> torch.Tensor:
        w = self.base.weight.detach()
        blocks, start = [], 0
        for (begin, end), (in_proj, out_proj) in sorted(self.parts.items()):
            blocks += [torch.zeros_like(w[start:begin]), out_proj(in_proj(w[begin:end]))]
            start = end
        return torch.cat([*blocks, torch.zeros_like(w[start:])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + nn.functional.linear(x, self.delta())


def authors_copy(plain: nn.Module, adapted: nn.Module) -> tuple[nn.Module, dict]:
    """``plain`` with the authors' layers where ``adapted`` has ours, their in_proj.weight =
    phi^T and out_proj.weight = psi^T copied from ours; shared generators stay shared."""
    reference = copy.deepcopy(plain)
    maps: dict[int, tuple[nn.Linear, nn.Linear]] = {}
    for name, layer in adapted.named_modules():
        if not isinstance(layer, AdaptedLinear):
            continue
        d = layer.out_features // 3  # fixed q/k/v slices, not taken from part_rows
        slices = {None: (0, layer.out_features), "q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d)}
        parts = {}
        for part, gen in layer.edits.items():
            if id(gen) not in maps:
                d_in, rank = gen.phi.weight.shape
                in_proj = nn.Linear(d_in, rank, bias=False, dtype=torch.float64)
                out_proj = nn.Linear(rank, d_in, bias=False, dtype=torch.float64)
                with torch.no_grad():
                    in_proj.weight.copy_(gen.phi.weight.T)
                    out_proj.weight.copy_(gen.psi.weight.T)
                maps[id(gen)] = (in_proj, out_proj)
            parts[slices[part]] = maps[id(gen)]
        parent, _, child = name.rpartition(".")
        base = reference.get_submodule(name)
        base.requires_grad_(False)
        setattr(reference.get_submodule(parent), child, AuthorsLinear(base, parts))
    return reference, maps


AUTHORS_CONFIGS = [WeGeFTConfig(rank=3, targets="all"),
                   WeGeFTConfig(rank=3, targets="all", shared=False),
                   WeGeFTConfig(rank=3, targets="all", qkv_parts=("q", "v")),
                   WeGeFTConfig(rank=3, targets="attn.qkv", qkv_parts=("k",), shared=False)]


@pytest.mark.parametrize("config", AUTHORS_CONFIGS, ids=str)
def test_equals_the_authors_layer_from_step_one(config):
    plain = tiny_vit(dtype=torch.float64)
    ours = apply_adapter(copy.deepcopy(plain), config)
    reference, maps = authors_copy(plain, ours)
    gens = list(get_adapter(ours).edits.values())
    x = images(dtype=torch.float64)
    target = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    opt_ours = torch.optim.SGD([p for g in gens for p in g.parameters()], lr=2.0)
    opt_ref = torch.optim.SGD([p for pair in maps.values() for m in pair for p in m.parameters()],
                              lr=2.0)
    for step in (1, 2):
        out_ours, out_ref = ours(x), reference(x)
        torch.testing.assert_close(out_ours, out_ref, rtol=1e-10, atol=1e-12)
        if step == 2:
            # far above float64 round-off (1e-16): the step moved the model (k alone moves least)
            assert (out_ours - plain(x)).abs().max() > 1e-8
        opt_ours.zero_grad(), opt_ref.zero_grad()
        (out_ours * target).sum().backward()
        (out_ref * target).sum().backward()
        for gen in gens:
            in_proj, out_proj = maps[id(gen)]
            torch.testing.assert_close(gen.psi.weight.grad, out_proj.weight.grad.T,
                                       rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(gen.phi.weight.grad, in_proj.weight.grad.T,
                                       rtol=1e-9, atol=1e-12)
            if step == 1:  # psi starts at zero: only psi learns at step 1
                assert torch.equal(gen.phi.weight.grad, torch.zeros_like(gen.phi.weight))
                assert gen.psi.weight.grad.abs().min() > 0
        opt_ours.step(), opt_ref.step()
    layers = {n: m for n, m in reference.named_modules() if isinstance(m, AuthorsLinear)}
    with torch.no_grad():
        expected = {n: m.base.weight + m.delta() for n, m in layers.items()}
    merge_adapter(ours)
    for name, weight in expected.items():
        torch.testing.assert_close(ours.get_submodule(name).weight.detach(), weight,
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("config", [
    WeGeFTConfig(rank=4, targets="all"), WeGeFTConfig(rank=4, targets="all", shared=False),
    WeGeFTConfig(rank=4, targets="attn", qkv_parts=("q", "k", "v"))], ids=str)
def test_initialisation_is_the_authors(config):
    """phi ~ U(+-1/sqrt(d_in)) (in_proj's fan-in, not r), psi = 0: for every generator kind."""
    torch.manual_seed(0)
    model = apply_adapter(tiny_vit(), config)
    gens = list(get_adapter(model).edits.values())
    assert len(gens) == (4 if config.shared else 8)
    d_ins = set()
    for gen in gens:
        d_in, rank = gen.phi.weight.shape
        assert gen.psi.weight.shape == (rank, d_in) and rank == 4
        assert torch.equal(gen.psi.weight, torch.zeros_like(gen.psi.weight))
        bound = d_in ** -0.5
        phi = gen.phi.weight.detach()
        assert phi.abs().max() <= bound and phi.abs().max() > 0.8 * bound
        # U(-b, b): variance b^2/3 (n >= 128: within 35% of it)
        assert abs(phi.var().item() / (bound ** 2 / 3) - 1) < 0.35
        d_ins.add(d_in)
    assert d_ins == ({32} if config.qkv_parts else {32, 128})


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("config", [WeGeFTConfig(rank=4, targets="all"),
                                    LoRAConfig(rank=4, targets="attn.proj"),
                                    LinearProbeConfig()], ids=str)
def test_gradients_reach_only_adapter_and_head(config):
    model = apply_adapter(tiny_vit(), config).train()
    x, y = images(8), torch.arange(8) % 7
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    expected = set(trainable_parameter_names(model))
    for name, param in model.named_parameters():
        if name in expected:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name
    assert losses[-1] < losses[0] - 0.05


# ---------------------------------------------------------------- save / load

def test_save_load_round_trip(tmp_path):
    config = WeGeFTConfig(rank=4, targets="all", qkv_parts=("q", "v"))
    model = apply_adapter(tiny_vit(), config)
    randomize_edits(model)
    with torch.no_grad():
        model.head.weight.normal_()
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = load_adapter(tiny_vit(), path)
    assert get_adapter(fresh).config == config
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # Only the trainable tensors are saved: kilobytes, not the backbone.
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(trainable_parameter_names(model))
        saved = sum(f.get_tensor(k).numel() for k in f.keys())
    # q, v, proj and fc1 generators read d_in=32, fc2's reads 128; plus the 7-class head.
    assert saved == 4 * (2 * 32 * 4) + 2 * 128 * 4 + 32 * 7 + 7


def test_load_into_model_with_same_config_applied(tmp_path):
    config = LoRAConfig(rank=2, targets="attn.proj")
    model = apply_adapter(tiny_vit(), config)
    randomize_edits(model)
    path = save_adapter(model, tmp_path / "a.safetensors")
    target = apply_adapter(tiny_vit(), LoRAConfig(rank=2, targets="attn.proj"))
    load_adapter(target, path)
    with torch.no_grad():
        torch.testing.assert_close(target(images()), model(images()), rtol=0, atol=0)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=0), ValueError, "rank must be a positive int, got 0"),
    (dict(rank=-2), ValueError, "rank must be a positive int"),
    (dict(rank=2.5), TypeError, "rank must be an int"),
    (dict(qkv_parts=("q", "x")), ValueError, "qkv_parts must be distinct names"),
    (dict(targets=()), ValueError, "targets is empty"),
    (dict(alpha=0), ValueError, "alpha must be positive"),
])
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        WeGeFTConfig(**kwargs)


@pytest.mark.parametrize("config, error, match", [
    (WeGeFTConfig(targets="attn.qvk"), ValueError,
     r"target 'attn.qvk' matches no linear layer of VisionTransformer; linear layers here: "
     r"blocks.N.attn.qkv, blocks.N.attn.proj, blocks.N.mlp.fc1, blocks.N.mlp.fc2"),
    (WeGeFTConfig(targets="patch_embed.proj"), ValueError,
     r"target 'patch_embed.proj' matches patch_embed.proj \(Conv2d\), which is not an nn.Linear"),
    (WeGeFTConfig(rank=33, targets="attn.proj"), ValueError,
     r"rank 33 exceeds the input size 32 of layer 'blocks.0.attn.proj'"),
    (WeGeFTConfig(rank=2, targets=[r"blocks\.\d+\.mlp\.fc\d"]), ValueError,
     r"shares one edit, but 'blocks.0.mlp.fc1' has d_in=32 and 'blocks.0.mlp.fc2' has "
     r"d_in=128; use separate targets or shared=False"),
    (WeGeFTConfig(targets="attn.proj", qkv_parts=("q",)), ValueError,
     r"qkv_parts=\('q',\) given, but none of the targeted layers \(blocks.N.attn.proj\) is a "
     r"fused qkv"),
    (WeGeFTConfig(targets=["attn.proj", r".*\.proj"]), ValueError,
     re.escape("layer 'blocks.0.attn.proj' is matched by both targets 'attn.proj' and "
               + repr(r".*\.proj"))),
    ("wegeft", TypeError, "config must be an adapter config"),
])
def test_apply_errors(config, error, match):
    with pytest.raises(error, match=match):
        apply_adapter(tiny_vit(), config)


def test_proj_target_skips_patch_embedding_conv():
    model = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2, targets="proj"))
    adapted = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    assert adapted == ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    assert isinstance(model.patch_embed.proj, nn.Conv2d)


def test_regex_targets_per_block():
    model = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2, targets=[r"blocks\.1\.mlp\.fc2"]))
    adapted = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    assert adapted == ["blocks.1.mlp.fc2"]
    assert isinstance(model.blocks[1].mlp.fc2.edits[None], WeGeFTGenerator)


def test_second_adapter_refused():
    model = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2))
    with pytest.raises(ValueError, match=r"already has an adapter \(WeGeFTConfig\(rank=2"):
        apply_adapter(model, LoRAConfig())


def test_merge_without_adapter_refused():
    with pytest.raises(ValueError, match="cannot merge: VisionTransformer has no adapter"):
        merge_adapter(tiny_vit())


def test_merge_refuses_non_finite_weights():
    model = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2))
    with torch.no_grad():
        get_adapter(model).edits["attn_proj"].phi.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="layer 'blocks.0.attn.proj': merging produced non-finite"):
        merge_adapter(model)


def test_load_rejects_other_config(tmp_path):
    model = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2))
    path = save_adapter(model, tmp_path / "a.safetensors")
    other = apply_adapter(tiny_vit(), WeGeFTConfig(rank=4))
    with pytest.raises(ValueError, match=r"holds an adapter with WeGeFTConfig\(rank=2.*but the "
                                         r"model has WeGeFTConfig\(rank=4"):
        load_adapter(other, path)


def test_load_rejects_other_shape(tmp_path):
    model = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2))
    path = save_adapter(model, tmp_path / "a.safetensors")
    wider = timm.create_model("vit_base_patch16_224", pretrained=False, **{**TINY, "num_classes": 9})
    backbone = {k: v for k, v in tiny_vit().state_dict().items() if not k.startswith("head.")}
    wider.load_state_dict(backbone, strict=False)  # the same backbone, another head
    before = _state(wider)
    with pytest.raises(ValueError, match=r"tensor 'head.weight' has shape \(7, 32\), the model "
                                         r"expects \(9, 32\)"):
        load_adapter(wider, path)
    _assert_unchanged(wider, before)  # all or nothing: no adapted layer left in place


def _state(model: nn.Module) -> tuple[dict, dict, list]:
    """Everything load_adapter could change: tensors, requires_grad, module types."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, type(m)) for n, m in model.named_modules()])


def _assert_unchanged(model: nn.Module, before: tuple[dict, dict, list]) -> None:
    tensors, grads, modules = _state(model)
    assert modules == before[2] and grads == before[1] and get_adapter(model) is None
    assert tensors.keys() == before[0].keys()
    assert all(torch.equal(tensors[k], before[0][k]) for k in tensors)


def test_adapter_file_refuses_a_deeper_backbone_and_loads_on_request(tmp_path):
    """A shared generator fits any depth: only the stored identity tells depth 2 from 4."""
    config = WeGeFTConfig(rank=2, targets="all")
    model = apply_adapter(tiny_vit(), config)
    randomize_edits(model)
    path = save_adapter(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    deeper = timm.create_model("vit_base_patch16_224", pretrained=False, **{**TINY, "depth": 4})
    deeper.blocks[0].attn.qkv.weight.requires_grad_(False)  # a user's choice, kept on failure
    before = _state(deeper)
    with pytest.raises(ValueError, match=re.escape(
            "a.safetensors adapts 8 layers, this model 16: the backbones differ (adapted in this "
            "model only: blocks.2.attn.qkv, blocks.2.attn.proj, blocks.2.mlp.fc1, blocks.2.mlp.fc2 "
            "(+4 more)); pass check_backbone=False to load it anyway (deliberate transfer)")):
        load_adapter(deeper, path)
    _assert_unchanged(deeper, before)
    load_adapter(deeper, path, check_backbone=False)
    gen = get_adapter(deeper).edits["attn_qkv"]
    torch.testing.assert_close(gen.psi.weight, get_adapter(model).edits["attn_qkv"].psi.weight,
                               rtol=0, atol=0)


def test_adapter_file_refuses_other_frozen_weights_whatever_the_dtype(tmp_path):
    model = apply_adapter(tiny_vit(), LoRAConfig(rank=2, targets="attn"))
    randomize_edits(model)
    path = save_adapter(model, tmp_path / "a.safetensors")
    # The same backbone in bfloat16 or float64 is the same backbone ...
    for dtype in (torch.bfloat16, torch.float64):
        same = load_adapter(tiny_vit(dtype=dtype), path)
        assert get_adapter(same).config == get_adapter(model).config
    bf16 = apply_adapter(tiny_vit(dtype=torch.bfloat16), LoRAConfig(rank=2, targets="attn"))
    load_adapter(tiny_vit(), save_adapter(bf16, tmp_path / "bf16.safetensors"))
    # ... one changed weight (far beyond bfloat16 rounding) is another.
    other = tiny_vit()
    with torch.no_grad():
        other.blocks[1].mlp.fc2.weight[0, 0] += 0.05
    before = _state(other)
    with pytest.raises(ValueError, match=r"a.safetensors was trained on other frozen weights than "
                                         r"this model's \(fingerprint [0-9a-f]{12} in the file, "
                                         r"[0-9a-f]{12} here\); pass check_backbone=False"):
        load_adapter(other, path)
    _assert_unchanged(other, before)
    load_adapter(other, path, check_backbone=False)


def test_adapter_file_refuses_another_architecture(tmp_path):
    path = save_adapter(apply_adapter(tiny_vit("vit"), LinearProbeConfig()),
                        tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"a.safetensors was saved from a vit_base_patch16_224 "
                                         r"backbone; this model is a deit_tiny_patch16_224 "
                                         r"\(architecture\); pass check_backbone=False"):
        load_adapter(tiny_vit("deit"), path)
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, **TINY)
    with pytest.raises(ValueError, match=r"saved from a timm.models.vision_transformer."
                                         r"VisionTransformer backbone; this model is a "
                                         r"timm.models.eva.Eva \(model class\)"):
        load_adapter(eva, path)
    assert get_adapter(eva) is None


def test_failed_load_into_an_adapted_model_changes_nothing(tmp_path):
    model = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2))
    randomize_edits(model)
    path = save_adapter(model, tmp_path / "a.safetensors")
    target = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2))
    with torch.no_grad():
        target.blocks[0].norm1.weight.add_(1.0)
    tensors = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="trained on other frozen weights"):
        load_adapter(target, path)
    assert all(torch.equal(v, tensors[k]) for k, v in target.state_dict().items())


def test_adapter_files_of_another_format_are_refused(tmp_path):
    """One file format: a file of another (an unreleased earlier one) is refused, named."""
    from safetensors.torch import save_file
    model = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2))
    tensors = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={
        "format": "wegeft_vision.adapter/1", "model_class": "VisionTransformer",
        "config": json.dumps(get_adapter(model).config.to_dict())})
    with pytest.raises(ValueError, match=r"old.safetensors is not a wegeft_vision adapter file "
                                         r"\(format 'wegeft_vision.adapter/1', expected"):
        load_adapter(tiny_vit(), tmp_path / "old.safetensors")


def test_fingerprint_of_float32_weights_is_unchanged():
    """Checkpoints store it: its value for float32 tensors must never change."""
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(2)}
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:torch.float32;".encode())
        digest.update(tensor.numpy().tobytes())
    assert fingerprint(tensors) == digest.hexdigest()
    assert fingerprint(tensors, dtype=torch.bfloat16) == fingerprint(
        {k: v.to(torch.bfloat16) for k, v in tensors.items()})


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter file not found: .*nope.safetensors"):
        load_adapter(tiny_vit(), tmp_path / "nope.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="foreign.safetensors is not a wegeft_vision adapter file"):
        load_adapter(tiny_vit(), tmp_path / "foreign.safetensors")


def test_distilled_deit_trains_both_heads():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **TINY)
    with pytest.raises(ValueError, match="target 'head_dist' matches no linear layer"):
        apply_adapter(model, WeGeFTConfig(rank=2, targets="head_dist"))
    apply_adapter(model, WeGeFTConfig(rank=2, targets="attn.proj"))
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, AdaptedLinear))
    assert adapted == ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    assert count_parameters(model).head == 2 * (32 * 7 + 7)


@pytest.mark.parametrize("recompute", [True, False])
def test_recompute_reaches_every_layer_and_is_not_part_of_identity(recompute, tmp_path):
    model = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2, targets="all", recompute=recompute))
    layers = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    assert len(layers) == 8 and all(layer.recompute is recompute for layer in layers)
    path = save_adapter(model, tmp_path / "a.safetensors")
    other = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2, targets="all",
                                                   recompute=not recompute))
    load_adapter(other, path)  # a runtime choice: files load across it


# ---------------------------------------------------------------- merge both ways, the registry

MERGEABLE = {
    "wegeft_all": WeGeFTConfig(rank=2, targets="all"),
    "wegeft_qv": WeGeFTConfig(rank=2, targets="attn.qkv", qkv_parts=("q", "v"), shared=False),
    "lora_all": LoRAConfig(rank=2, alpha=4.0, targets="all"),
    "lora_kv": LoRAConfig(rank=2, targets="attn.qkv", qkv_parts=("k", "v")),
}


@pytest.mark.parametrize("config", MERGEABLE.values(), ids=MERGEABLE)
def test_merge_in_place_then_unmerge_restores_every_tensor_bit_for_bit(config, tmp_path):
    model = apply_adapter(tiny_vit(dtype=torch.float64), copy.deepcopy(config))
    randomize_edits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(dtype=torch.float64)
    with torch.no_grad():
        adapted = model(x)
    assert merge_adapter(model, unload=False) is model
    assert get_adapter(model) is not None and get_adapter(model).merged
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith("base_layer.weight") for k in changed)
    with torch.no_grad():
        merged = model(x)
    assert ((merged - adapted).norm() / adapted.norm()) < 1e-9
    # While merged: no training step, no adapter file, no second merge.
    model.train()
    with pytest.raises(ValueError, match="merged into its weights: call unmerge_adapter"):
        model(x).sum().backward()
    model.eval()
    with pytest.raises(ValueError, match="cannot save an adapter: the adapter is merged"):
        save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="merged already; unmerge_adapter"):
        merge_adapter(model, unload=False)
    unmerge_adapter(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x), adapted)
    with pytest.raises(ValueError, match="the adapter is not merged"):
        unmerge_adapter(model)


def test_merge_and_unload_after_merging_in_place_gives_the_plain_model():
    model = apply_adapter(tiny_vit(dtype=torch.float64), WeGeFTConfig(rank=2, targets="all"))
    randomize_edits(model)
    x = images(dtype=torch.float64)
    with torch.no_grad():
        adapted = model(x)
    plain = merge_adapter(merge_adapter(model, unload=False))
    assert set(plain.state_dict()) == set(tiny_vit().state_dict())
    with torch.no_grad():
        assert ((plain(x) - adapted).norm() / adapted.norm()) < 1e-9


def test_merge_is_all_or_nothing_when_a_later_layer_diverges():
    model = apply_adapter(tiny_vit(dtype=torch.float64),
                          WeGeFTConfig(rank=2, targets="all", shared=False))
    randomize_edits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    last = list(get_adapter(model).edits)[-1]
    with torch.no_grad():
        get_adapter(model).edits[last].psi.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer 'blocks.1.mlp.fc2': merging produced "
                                         r"non-finite weights"):
        merge_adapter(model, unload=False)
    assert not get_adapter(model).merged
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()
               if "psi" not in k)


def test_config_serialisation_round_trips_through_the_registry():
    from wegeft_vision.adapters import AdapterConfig
    config = WeGeFTConfig(rank=4, targets=["attn.qkv"], qkv_parts=["v", "q"], recompute=False)
    data = config.to_dict()
    assert data == {"class_path": "wegeft_vision.adapters.wegeft.WeGeFTConfig",
                    "init_args": {"rank": 4, "targets": ["attn.qkv"], "shared": True,
                                  "alpha": None, "qkv_parts": ["q", "v"], "recompute": False}}
    assert json.loads(json.dumps(data)) == data
    again = AdapterConfig.from_dict(data)
    assert again == config and again.recompute is False
    # The short path users write in configs names the same registered class.
    assert AdapterConfig.from_dict({"class_path": "wegeft_vision.LoRAConfig",
                                    "init_args": {"rank": 3}}) == LoRAConfig(rank=3)


def test_a_file_naming_an_unregistered_class_is_refused_without_importing_it(tmp_path,
                                                                          monkeypatch):
    from wegeft_vision.adapters import AdapterConfig
    marker = tmp_path / "imported"
    (tmp_path / "planted_method.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nclass Config: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown adapter method 'planted_method.Config': "
                                         r"registered are .*wegeft"):
        AdapterConfig.from_dict({"class_path": "planted_method.Config", "init_args": {}})
    assert not marker.exists()


def test_two_classes_cannot_register_one_method_name():
    from dataclasses import dataclass

    from wegeft_vision.adapters import AdapterConfig, register_method

    @dataclass
    class Impostor(AdapterConfig):
        method = "lora"

    with pytest.raises(ValueError, match="'lora' is already registered by "
                                         "wegeft_vision.adapters.lora.LoRAConfig"):
        register_method(Impostor)


def test_an_outside_method_from_the_docs_fits_with_the_cli(tmp_path, monkeypatch):
    """docs/adding-a-method.md's example saved as a module: the registry, its adapter file, and
    `wegeft-vision fit --model.adapter <module>.RowScaleConfig` (the page's command)."""
    from wegeft_vision.cli import cli_main
    from pathlib import Path

    from wegeft_vision.adapters import METHODS
    page = (Path(__file__).parents[1] / "docs" / "adding-a-method.md").read_text()
    code = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(code) == 1
    (tmp_path / "row_scale_example.py").write_text(code[0])
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("row_scale_example")
        assert METHODS["row_scale"] is module.RowScaleConfig
        config, _ = read_adapter_file(tmp_path / "row_scale.safetensors")
        assert config == module.RowScaleConfig(targets="all")
        repo = Path(__file__).parents[1]
        cli = cli_main(["fit", "--config", str(repo / "configs/demo.yaml"),
                        "--model.adapter", "row_scale_example.RowScaleConfig",
                        "--model.adapter.targets", "all",
                        "--model.weights_path", str(repo / "data/demo_backbone.safetensors"),
                        "--data.init_args.root", str(repo / "data/digits_vtab"),
                        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                        "--trainer.limit_val_batches", "1", "--test_after_fit", "false"])
        assert isinstance(cli.model.adapter_config, module.RowScaleConfig)
        trained = [n for n, p in cli.model.named_parameters() if p.requires_grad]
        assert any(".edits." in n for n in trained) and all(
            n.startswith("model.adapter.") or n.startswith("model.head.") for n in trained)
    finally:
        METHODS.pop("row_scale", None)
        sys.modules.pop("row_scale_example", None)


def test_load_into_an_adapted_model_is_all_or_nothing_when_a_later_tensor_fails(tmp_path):
    """Every tensor is checked before any is copied: a bad last tensor changes nothing."""
    from safetensors.torch import load_file, save_file
    source = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2, targets="all", shared=False))
    randomize_edits(source)
    path = save_adapter(source, tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    names = trainable_parameter_names(source)
    tensors[names[-1]] = torch.full_like(tensors[names[-1]], float("nan"))
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    target = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2, targets="all", shared=False))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(names[-1])}' holds non-finite"):
        load_adapter(target, tmp_path / "bad.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("bad", ["int", "bool", "inf"])
def test_load_refuses_integer_bool_and_non_finite_tensors(tmp_path, bad):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    source = apply_adapter(tiny_vit(), WeGeFTConfig(rank=2))
    path = save_adapter(source, tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    name = "adapter.edits.attn_proj.phi.weight"
    value = tensors[name]
    tensors[name] = {"int": value.to(torch.int32), "bool": value > 0,
                     "inf": value.clone().fill_(float("inf"))}[bad]
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    match = "holds non-finite" if bad == "inf" else "has dtype torch.(int32|bool); adapter tensors"
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(name)}' {match}"):
        load_adapter(tiny_vit(), tmp_path / "bad.safetensors")
