"""DoRA and VeRA on tiny float64 ViTs: the method checks, the paper's counts, and equality with
HF PEFT's ``LoraConfig(use_dora=True)`` and ``VeraConfig`` on the same tensor values."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from wegeft_vision import (AdapterConfig, DoRAConfig, VeRAConfig, apply_adapter, count_parameters,
                           load_adapter, merge_adapter, save_adapter, unmerge_adapter)
from wegeft_vision.adapters import (METHODS, AdaptedLinear, get_adapter, read_adapter_file,
                                    trainable_parameter_names)
from wegeft_vision.errors import UserError, UserTypeError

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=7)
D = TINY["embed_dim"]


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, **TINY).double().eval()


def images(n: int = 3, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64)


def perturb(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Move every adapter tensor away from its initial value, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in get_adapter(model).parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖ / ‖b‖ (0 where both are zero, as timm's zero-initialised biases)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


CONFIGS = [
    DoRAConfig(rank=4, alpha=6.0),
    DoRAConfig(rank=2, targets="all"),
    DoRAConfig(rank=3, targets="attn.qkv", qkv_parts=("q", "v")),
    VeRAConfig(rank=16),
    VeRAConfig(rank=8, targets="all", seed=3),
    # The q and v parts share the pair of shape (D, D) with attn.proj.
    VeRAConfig(rank=8, targets=("attn.qkv", "attn.proj"), qkv_parts=("q", "v")),
]
IDS = ["dora", "dora-all", "dora-qv", "vera", "vera-all", "vera-qv-proj"]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_identity_at_start_and_outputs_move_once_trained(config):
    plain, x = tiny_vit(), images()
    model = apply_adapter(copy.deepcopy(plain), config)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        perturb(model)
        assert (model(x) - plain(x)).abs().max() > 1e-3


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_every_trainable_tensor_gets_a_gradient(config):
    model = apply_adapter(tiny_vit(), config)
    perturb(model)
    model(images()).square().sum().backward()
    params = dict(model.named_parameters())
    trainable = trainable_parameter_names(model)
    assert {n for n, p in params.items() if p.requires_grad} == set(trainable)
    for name in trainable:
        assert params[name].grad is not None and params[name].grad.abs().max() > 0, name
    assert all(p.grad is None for n, p in params.items() if n not in trainable)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_merged_equals_adapted_and_unmerge_restores_every_tensor(config):
    plain, x = tiny_vit(), images()
    model = apply_adapter(copy.deepcopy(plain), config)
    perturb(model)
    with torch.no_grad():
        adapted = model(x)
        before = {n: t.clone() for n, t in [*model.state_dict().items(),
                                             *model.named_buffers()]}
        merge_adapter(model, unload=False)
        assert relative(model(x), adapted) < 1e-9
        changed = [n for n, t in model.state_dict().items() if not torch.equal(t, before[n])]
        assert changed and all(n.endswith(".base_layer.weight") for n in changed)
        unmerge_adapter(model)
        after = dict([*model.state_dict().items(), *model.named_buffers()])
        assert after.keys() == before.keys()
        for name, tensor in before.items():
            assert torch.equal(after[name], tensor), name
        assert torch.equal(model(x), adapted)
        merged = merge_adapter(model)
        assert list(merged.state_dict()) == list(plain.state_dict())
        assert relative(merged(x), adapted) < 1e-9


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_adapter_file_round_trip(config, tmp_path):
    model, x = apply_adapter(tiny_vit(), config), images()
    perturb(model)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    saved_config, tensors = read_adapter_file(path)
    assert saved_config == config
    assert set(tensors) == set(trainable_parameter_names(model))
    fresh = load_adapter(tiny_vit(), path)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ---------------------------------------------------------------- the papers' counts on ViT-B/16

@pytest.mark.parametrize("config, expected", [
    (VeRAConfig(), 12 * (256 + 768)),  # the count: 12,288
    (VeRAConfig(targets="attn.qkv", qkv_parts=("q", "v")), 12 * 2 * (256 + 768)),
    (VeRAConfig(rank=1024, targets="all"), 12 * (4 * 1024 + 3 * 768 + 768 + 3072 + 768)),
    (DoRAConfig(), 12 * (8 * 768 + 768 * 8 + 768)),
    (DoRAConfig(targets="attn.qkv", qkv_parts=("q", "v")), 12 * 2 * (8 * 768 + 768 * 8 + 768)),
])
def test_parameter_counts_on_vit_b16(vit_b16, config, expected):
    total = sum(p.numel() for p in vit_b16.parameters())
    counts = count_parameters(apply_adapter(vit_b16, config))
    assert counts.trainable == expected
    # Nothing else was added: VeRA's frozen pairs are buffers, not parameters.
    assert counts.total == total + expected


def test_vera_pairs_are_one_per_shape_frozen_and_never_saved():
    model = apply_adapter(tiny_vit(), VeRAConfig(rank=8, targets="all"))
    projections = get_adapter(model).edits["projections"]
    shapes = {(3 * D, D), (D, D), (4 * D, D), (D, 4 * D)}
    assert {n for n, _ in projections.named_buffers()} == {
        f"{m}_{o}x{i}" for m in "AB" for o, i in shapes}
    assert not any("projections" in n for n in model.state_dict())
    assert not any("projections" in n for n, _ in model.named_parameters())
    # Both blocks' proj edits read the very same tensors.
    edits = [model.get_submodule(f"blocks.{i}.attn.proj").edits[None] for i in range(2)]
    pairs = [e._projections[0].pair(*e.shape) for e in edits]
    assert all(a is b for a, b in zip(*pairs))


def test_vera_seed_draws_the_pairs_again():
    def pair(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        model = apply_adapter(tiny_vit(), VeRAConfig(rank=8, seed=seed))
        return get_adapter(model).edits["projections"].pair(D, D)

    assert all(torch.equal(a, b) for a, b in zip(pair(5), pair(5)))
    assert not any(torch.equal(a, b) for a, b in zip(pair(5), pair(6)))


def test_configs_go_through_the_registry():
    assert METHODS["dora"] is DoRAConfig and METHODS["vera"] is VeRAConfig
    for config in CONFIGS:
        assert AdapterConfig.from_dict(config.to_dict()) == config
    assert DoRAConfig(rank=4, alpha=6.0).scale == 1.5 and DoRAConfig(rank=4).scale == 1.0


@pytest.mark.parametrize("cls, kwargs, error, match", [
    (DoRAConfig, dict(rank=0), UserError, "rank must be a positive int, got 0"),
    (DoRAConfig, dict(alpha=-1.0), UserError, "alpha must be positive.*-1.0"),
    (DoRAConfig, dict(qkv_parts=("x",)), UserError, "qkv_parts.*'x'"),
    (VeRAConfig, dict(rank=1.5), UserTypeError, "rank must be an int, got 1.5"),
    (VeRAConfig, dict(seed=-1), UserError, "seed must be a non-negative int, got -1"),
    (VeRAConfig, dict(seed="1"), UserTypeError, "seed must be an int, got '1'"),
    (VeRAConfig, dict(seed=True), UserTypeError, "seed must be an int, got True"),
    (VeRAConfig, dict(d_initial=0.0), UserError, "d_initial must be finite and non-zero.*0.0"),
    (VeRAConfig, dict(d_initial=float("nan")), UserError, "d_initial.*nan"),
    (VeRAConfig, dict(d_initial="0.1"), UserTypeError, "d_initial must be a number, got '0.1'"),
    (VeRAConfig, dict(targets=()), UserError, "targets is empty"),
])
def test_config_validation_names_the_bad_value(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_dora_rank_above_the_input_size_is_refused():
    with pytest.raises(UserError, match=f"rank {D + 1} exceeds the input size {D}"):
        apply_adapter(tiny_vit(), DoRAConfig(rank=D + 1))


# ------------------------------------------------------------ equal to HF PEFT on the same values

BLOCK_LINEARS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
QKV = r"blocks\.\d+\.attn\.qkv"
QKV_PROJ = r"blocks\.\d+\.attn\.(qkv|proj)"
PROJ_FC2 = r"blocks\.\d+\.(attn\.proj|mlp\.fc2)"


@pytest.fixture(scope="module")
def peft():
    """HF PEFT (the dev extra installs it); without it these tests are skipped."""
    return pytest.importorskip("peft")


def peft_twin(peft, plain: nn.Module, peft_config) -> nn.Module:
    """PEFT's adaptation of a copy of ``plain`` (float64 like ours); returns the PeftModel."""
    return peft.get_peft_model(copy.deepcopy(plain), peft_config).double().eval()


def peft_layer(twin: nn.Module, name: str) -> nn.Module:
    return twin.base_model.model.get_submodule(name)


def assert_same_model(ours: nn.Module, twin: nn.Module, pairs: dict[str, tuple]) -> None:
    """Same outputs, same gradients and the same merged weights. ``pairs``: our parameter's name
    -> (PEFT's parameter, rows, columns): that block of its gradient must equal ours."""
    x = images()
    out, twin_out = ours(x), twin(x)
    assert relative(out, twin_out) < 1e-12
    out.square().sum().backward()
    twin_out.square().sum().backward()
    params = dict(ours.named_parameters())
    for name, (twin_param, rows, cols) in pairs.items():
        assert relative(params[name].grad, twin_param.grad[rows][..., cols]) < 1e-10, name
    with torch.no_grad():
        merged = merge_adapter(ours).state_dict()
        twin_merged = twin.merge_and_unload().state_dict()
    assert merged.keys() == twin_merged.keys()
    for name, tensor in merged.items():
        assert relative(tensor, twin_merged[name]) < 1e-12, name


ALL = slice(None)


def test_dora_equals_peft_use_dora(peft):
    plain = tiny_vit()
    ours = apply_adapter(copy.deepcopy(plain), DoRAConfig(rank=4, alpha=6.0, targets="all"))
    perturb(ours)
    twin = peft_twin(peft, plain, peft.LoraConfig(r=4, lora_alpha=6.0, use_dora=True,
                                                  target_modules=BLOCK_LINEARS))
    pairs = {}
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, AdaptedLinear):
                edit, theirs = module.edits[None], peft_layer(twin, name)
                key = f"adapter.edits.{name.replace('.', '_')}"
                for ours_name, twin_param in (
                        ("lora_A.weight", theirs.lora_A["default"].weight),
                        ("lora_B.weight", theirs.lora_B["default"].weight),
                        ("magnitude", theirs.lora_magnitude_vector["default"].weight)):
                    twin_param.copy_(edit.get_parameter(ours_name))
                    pairs[f"{key}.{ours_name}"] = (twin_param, ALL, ALL)
    assert len(pairs) == 2 * 4 * 3
    assert_same_model(ours, twin, pairs)


def test_dora_on_qkv_parts_is_peft_dora_on_the_whole_layer_with_block_values(peft):
    """DoRA on the q and v rows, rank r, equals PEFT's DoRA on the whole qkv with rank 2r:
    A = [A_q; A_v], B = [[B_q, 0], [0, 0], [0, B_v]], m = [m_q, ‖W_k‖, m_v] (the norm is per
    row, so the k rows stay W_k exactly), and the same scale (alpha doubled with the rank)."""
    r = 3
    plain = tiny_vit()
    ours = apply_adapter(copy.deepcopy(plain),
                         DoRAConfig(rank=r, alpha=6.0, targets="attn.qkv", qkv_parts=("q", "v")))
    perturb(ours)
    twin = peft_twin(peft, plain, peft.LoraConfig(r=2 * r, lora_alpha=12.0, use_dora=True,
                                                  target_modules=QKV))
    pairs = {}
    with torch.no_grad():
        for block in range(2):
            name = f"blocks.{block}.attn.qkv"
            layer, theirs = ours.get_submodule(name), peft_layer(twin, name)
            a, b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
            m = theirs.lora_magnitude_vector["default"].weight
            b.zero_()
            m.copy_(torch.linalg.norm(layer.base_layer.weight, dim=1))
            for index, part in ((0, "q"), (1, "v")):
                edit, rows = layer.edits[part], layer.part_rows(part)
                ranks = slice(index * r, (index + 1) * r)
                a[ranks] = edit.lora_A.weight
                b[rows, ranks] = edit.lora_B.weight
                m[rows] = edit.magnitude
                key = f"adapter.edits.blocks_{block}_attn_qkv_{part}"
                pairs[f"{key}.lora_A.weight"] = (a, ranks, ALL)
                pairs[f"{key}.lora_B.weight"] = (b, rows, ranks)
                pairs[f"{key}.magnitude"] = (m, rows, ALL)
    assert_same_model(ours, twin, pairs)


def _vera_twin_lambdas(ours: nn.Module, twin: nn.Module, layers: list[str]) -> dict:
    """Copy our lambdas into PEFT's; the pairs whose gradients must match."""
    pairs = {}
    with torch.no_grad():
        for name in layers:
            edit, theirs = ours.get_submodule(name).edits[None], peft_layer(twin, name)
            key = f"adapter.edits.{name.replace('.', '_')}"
            for which in ("lambda_d", "lambda_b"):
                twin_param = getattr(theirs, f"vera_{which}")["default"]
                twin_param.copy_(getattr(edit, which))
                pairs[f"{key}.{which}"] = (twin_param, ALL, ALL)
    return pairs


def test_vera_equals_peft_vera_from_the_seed_alone(peft):
    """Layers with one d_in (qkv: 3D x D, proj: D x D): our pairs drawn from ``seed`` are PEFT's
    from ``projection_prng_key`` (PEFT slices its largest pair; our per-shape draws with the same
    fan-in are those slices), and with the same lambdas the models are equal."""
    plain = tiny_vit()
    config = VeRAConfig(rank=8, targets=("attn.qkv", "attn.proj"), seed=7, d_initial=0.3)
    ours = apply_adapter(copy.deepcopy(plain), config)
    twin = peft_twin(peft, plain, peft.VeraConfig(r=8, target_modules=QKV_PROJ,
                                                  projection_prng_key=7, d_initial=0.3))
    projections = get_adapter(ours).edits["projections"]
    vera_a, vera_b = twin.base_model.vera_A["default"], twin.base_model.vera_B["default"]
    for out in (3 * D, D):
        a, b = projections.pair(out, D)
        assert torch.equal(a, vera_a) and torch.equal(b, vera_b[:out])
    layers = [f"blocks.{i}.attn.{n}" for i in range(2) for n in ("qkv", "proj")]
    for name in layers:  # PEFT's initial lambdas are ours
        edit, theirs = ours.get_submodule(name).edits[None], peft_layer(twin, name)
        assert torch.equal(edit.lambda_d, theirs.vera_lambda_d["default"])
        assert torch.equal(edit.lambda_b, theirs.vera_lambda_b["default"])
    perturb(ours)
    assert_same_model(ours, twin, _vera_twin_lambdas(ours, twin, layers))


def test_vera_equals_peft_vera_on_the_same_values_across_input_sizes(peft):
    """proj (D x D) and fc2 (D x 4D): PEFT slices one pair drawn for (D, 4D), we draw a pair for
    each shape (each with its own fan-in); with PEFT's slices copied into ours they are equal."""
    plain = tiny_vit()
    ours = apply_adapter(copy.deepcopy(plain), VeRAConfig(rank=8, targets=("attn.proj", "mlp.fc2")))
    twin = peft_twin(peft, plain, peft.VeraConfig(r=8, target_modules=PROJ_FC2,
                                                  projection_prng_key=0))
    projections = get_adapter(ours).edits["projections"]
    vera_a, vera_b = twin.base_model.vera_A["default"], twin.base_model.vera_B["default"]
    assert not torch.equal(projections.pair(D, D)[0], vera_a[:, :D])
    with torch.no_grad():
        for d_in in (D, 4 * D):
            a, b = projections.pair(D, d_in)
            a.copy_(vera_a[:, :d_in])
            b.copy_(vera_b[:D])
    perturb(ours)
    layers = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.proj", "mlp.fc2")]
    assert_same_model(ours, twin, _vera_twin_lambdas(ours, twin, layers))


def test_vera_on_qkv_parts_is_peft_vera_on_the_whole_layer_with_block_values(peft):
    """VeRA on the q and v rows, each part's lambdas over the (D x D) pair, equals PEFT's VeRA on
    the whole qkv with B = [B; B; B], lambda_b = [lambda_b_q, 0, lambda_b_v] where the parts
    share lambda_d (PEFT has one lambda_d per layer)."""
    plain = tiny_vit()
    ours = apply_adapter(copy.deepcopy(plain),
                         VeRAConfig(rank=8, targets="attn.qkv", qkv_parts=("q", "v")))
    perturb(ours)
    twin = peft_twin(peft, plain, peft.VeraConfig(r=8, target_modules=QKV, projection_prng_key=0))
    a, b = get_adapter(ours).edits["projections"].pair(D, D)
    pairs = {}
    with torch.no_grad():
        twin.base_model.vera_A["default"].copy_(a)
        twin.base_model.vera_B["default"].copy_(torch.cat([b, b, b]))
        for block in range(2):
            layer = ours.get_submodule(f"blocks.{block}.attn.qkv")
            theirs = peft_layer(twin, f"blocks.{block}.attn.qkv")
            layer.edits["v"].lambda_d.copy_(layer.edits["q"].lambda_d)
            theirs.vera_lambda_d["default"].copy_(layer.edits["q"].lambda_d)
            lambda_b = theirs.vera_lambda_b["default"]
            lambda_b.zero_()
            for part in ("q", "v"):
                rows = layer.part_rows(part)
                lambda_b[rows] = layer.edits[part].lambda_b
                key = f"adapter.edits.blocks_{block}_attn_qkv_{part}"
                pairs[f"{key}.lambda_b"] = (lambda_b, rows, ALL)
    lambdas_d = [(ours.get_submodule(f"blocks.{i}.attn.qkv").edits,
                  peft_layer(twin, f"blocks.{i}.attn.qkv").vera_lambda_d["default"])
                 for i in range(2)]
    assert_same_model(ours, twin, pairs)
    for edits, theirs in lambdas_d:  # PEFT's one lambda_d collects both parts' gradients
        assert relative(edits["q"].lambda_d.grad + edits["v"].lambda_d.grad, theirs.grad) < 1e-10
