"""VPT and BitFit, the paper's baselines (VPT: Jia et al., ECCV 2022; BitFit: Ben Zaken et al., ACL 2022), on tiny float64 ViTs.

BitFit trains timm's own biases: identity at start, merge = the plain model. VPT puts learned
tokens into the sequence: not the identity at start; VPT-deep cannot merge; VPT-shallow merges
into the timm ViT with more register tokens, checked against a freshly created one of those.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import nn

from tests.helpers.models import create_vit
from tests.helpers.training import make_backbone_file, make_toy_task, write_config
from tests.test_families import FAMILIES
from tests.test_families import create as create_family
from wegeft_vision import (AdapterConfig, BitFitConfig, VPTConfig, apply_adapter,
                           count_parameters, load_adapter, merge_adapter, save_adapter,
                           unmerge_adapter)
from wegeft_vision.adapters import get_adapter, trainable_parameter_names
from wegeft_vision.adapters.targets import head_parameter_names
from wegeft_vision.adapters.vpt import PromptedBlock
from wegeft_vision.cli import cli_main
from wegeft_vision.errors import UserError
from wegeft_vision.protocols.grid import BASELINE_GRIDS
from wegeft_vision.training import ViTClassifier

REPO = Path(__file__).resolve().parents[1]
VIT = "vit_base_patch16_224"
DEPTH = 3  # a middle block too: VPT-shallow's prompts pass through it untouched
DIM = 32  # the tiny size's width
P = 3  # prompt tokens in the tiny tests
METHODS = {
    "vpt_deep": VPTConfig(num_tokens=P),
    "vpt_shallow": VPTConfig(num_tokens=P, deep=False),
    "bitfit_linear": BitFitConfig(),
    "bitfit_all": BitFitConfig(biases="all"),
}
BITFIT = ["bitfit_linear", "bitfit_all"]
VPT = ["vpt_deep", "vpt_shallow"]


def create(name: str = VIT, **kwargs) -> nn.Module:
    return create_vit(name, depth=DEPTH, **kwargs)


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1))


def trained(model: nn.Module, seed: int = 2, scale: float = 0.3) -> nn.Module:
    """Give every tensor the adapter trains (head excluded) random values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    heads = set(head_parameter_names(model))
    with torch.no_grad():
        for name in trainable_parameter_names(model):
            if name not in heads:
                param = params[name]
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * scale)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


# -- what trains, and how much of it on ViT-B/16 --------------------------------------------

def expected_biases(model: nn.Module, biases: str) -> list[str]:
    """BitFit's biases by name, written out for timm's ViT (independent of the method's rule)."""
    layers = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    if biases == "all":
        layers += ["norm1", "norm2"]
    names = [f"blocks.{i}.{layer}.bias" for i in range(len(model.blocks)) for layer in layers]
    return names + (["patch_embed.proj.bias", "norm.bias"] if biases == "all" else [])


@pytest.mark.parametrize("config, trainable, percent", [
    (VPTConfig(), 12 * 5 * 768, "0.054"),  # the paper's count: 46,080
    (VPTConfig(deep=False), 5 * 768, "0.004"),
    (BitFitConfig(), 12 * (2304 + 768 + 3072 + 768), "0.097"),  # the paper's: 82,944
    (BitFitConfig(biases="all"), 102_912, "0.120"),
])
def test_parameter_counts_on_vit_b16(vit_b16: nn.Module, config: AdapterConfig, trainable: int,
                                     percent: str) -> None:
    model = vit_b16
    count = count_parameters(apply_adapter(model, config))
    assert (count.trainable, f"{count.percent:.3f}", count.head) == (trainable, percent, 76_900)
    if isinstance(config, BitFitConfig):
        names = set(trainable_parameter_names(model)) - {"head.weight", "head.bias"}
        assert names == set(expected_biases(model, config.biases))


def test_bitfit_trains_evas_q_and_v_biases() -> None:
    """EVA's fused qkv is a bias-free nn.Linear with q_bias and v_bias beside it: its bias."""
    model = create_family("eva02")
    names = BitFitConfig().extra_trainable(model)
    for i in range(len(model.blocks)):
        assert {f"blocks.{i}.attn.q_bias", f"blocks.{i}.attn.v_bias"} <= set(names)
    assert not any("rope" in n or "pos_embed" in n for n in names)


@pytest.mark.parametrize("bad", [dict(num_tokens=0), dict(num_tokens=2.0), dict(deep="yes"),
                                 dict(dropout=1.0), dict(dropout=-0.1)])
def test_vpt_config_refuses_bad_values(bad: dict) -> None:
    with pytest.raises(UserError, match="VPT"):
        VPTConfig(**bad)


def test_bitfit_config_refuses_unknown_biases() -> None:
    with pytest.raises(UserError, match="'linear', 'all'"):
        BitFitConfig(biases="norm")


@pytest.mark.parametrize("method", list(METHODS))
def test_config_serialises_and_comes_back(method: str) -> None:
    config = METHODS[method]
    data = json.loads(json.dumps(config.to_dict()))
    assert AdapterConfig.from_dict(data) == config


@pytest.mark.parametrize("name, config", [("vpt", VPTConfig()),
                                          ("vpt_shallow", VPTConfig(deep=False)),
                                          ("bitfit", BitFitConfig())])
def test_method_configs_are_the_authors_baselines(name: str, config: AdapterConfig) -> None:
    """configs/methods/<name>.yaml: the config, no weight decay, and the authors' lr-only grids
    as its comments give them to --grid."""
    path = REPO / "configs" / "methods" / f"{name}.yaml"
    model = yaml.safe_load(path.read_text())["model"]
    assert AdapterConfig.from_dict(model["adapter"]) == config and model["weight_decay"] == 0.0
    if name == "vpt_shallow":
        return
    lines = [line for line in path.read_text().splitlines() if "--grid" in line]
    grids = {line.split(":")[0].strip("# "): yaml.safe_load(line.split("--grid")[1].strip()[1:-1])
             for line in lines}
    # YAML 1.1 reads 5e-4 as a string; the protocol's parser reads it as the number.
    grids = {b: {k: [float(v) for v in vs] for k, vs in g.items()} for b, g in grids.items()}
    assert grids == {"VTAB-1k": BASELINE_GRIDS["vtab"], "FGVC": BASELINE_GRIDS["fgvc"]}


# -- behaviour on tiny models --------------------------------------------------------------

@pytest.mark.parametrize("method", BITFIT)
def test_bitfit_starts_at_the_model_and_trains_its_biases(method: str) -> None:
    plain, model = create(), apply_adapter(create(), METHODS[method])
    x = images()
    with torch.no_grad():
        reference = plain(x)
        assert torch.equal(model(x), reference)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(expected_biases(model, METHODS[method].biases)) | {
        "head.weight", "head.bias"}
    assert dict(get_adapter(model).named_parameters()) == {}  # nothing injected
    out = trained(model)(x)
    assert rel(out, reference) > 1e-3
    out.pow(2).sum().backward()
    for name in trainable:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().max() > 0, name


@pytest.mark.parametrize("method", VPT)
def test_vpt_prompts_change_the_output_and_all_get_gradients(method: str) -> None:
    plain, model = create(), apply_adapter(create(), METHODS[method])
    x = images()
    with torch.no_grad():
        reference, start = plain(x), model(x)
    assert rel(start, reference) > 1e-6, "prompts take part in attention: not the identity"
    tokens = get_adapter(model).edits["prompts"].tokens
    assert tokens.shape == ((DEPTH if METHODS[method].deep else 1), P, DIM)
    bound = (6 / (3 * 8 * 8 + DIM)) ** 0.5  # VPT's Xavier-uniform bound, patch 8
    assert 0.5 * bound < tokens.abs().max() <= bound
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "adapter.edits.prompts.tokens", "head.weight", "head.bias"}
    out = trained(model)(x)
    assert rel(out, start) > 1e-3
    out.pow(2).sum().backward()
    for index, grad in enumerate(tokens.grad):  # every block's prompts, every token
        assert grad.abs().amax(dim=-1).min() > 0, index


def test_vpt_prompt_dropout_only_while_training() -> None:
    x = images()
    model = apply_adapter(create(), VPTConfig(num_tokens=P, dropout=0.5))
    plain_prompts = apply_adapter(create(), VPTConfig(num_tokens=P))
    with torch.no_grad():
        assert torch.equal(model(x), plain_prompts(x))  # eval: no dropout
        model.train()
        torch.manual_seed(0)
        first = model(x)
        assert not torch.equal(first, model(x))


@pytest.mark.parametrize("method", list(METHODS))
def test_adapter_file_round_trip(method: str, tmp_path: Path) -> None:
    model = trained(apply_adapter(create(), METHODS[method]))
    x = images()
    with torch.no_grad():
        expected = model(x)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = load_adapter(create(), path)
    assert get_adapter(fresh).config == METHODS[method]
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


# -- merging ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", BITFIT)
def test_bitfit_merges_into_the_plain_model(method: str) -> None:
    model = trained(apply_adapter(create(), METHODS[method]))
    x = images()
    with torch.no_grad():
        adapted = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_adapter(model, unload=False)
    with torch.no_grad():
        assert torch.equal(model(x), adapted)
    unmerge_adapter(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    merge_adapter(model)
    assert get_adapter(model) is None and list(model.state_dict()) == list(create().state_dict())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), adapted)


def test_vpt_deep_refuses_to_merge_and_says_what_to_keep() -> None:
    model = trained(apply_adapter(create(), METHODS["vpt_deep"]))
    x = images()
    with torch.no_grad():
        adapted = model(x)
    for unload in (True, False):
        with pytest.raises(UserError, match="VPT-deep cannot be folded") as info:
            merge_adapter(model, unload=unload)
        assert "checkpoint" in str(info.value) and "adapter file" in str(info.value)
    assert get_adapter(model) is not None and not get_adapter(model).merged
    with torch.no_grad():
        assert torch.equal(model(x), adapted)


# family: (timm name, extra kwargs); the register tokens a fresh timm model then needs
SHALLOW_MERGES = {
    "vit": (VIT, {}),  # no_embed_class=False: zero position-embedding rows are inserted
    "vit_avg_pool": (VIT, {"global_pool": "avg", "fc_norm": True}),
    "deit3": ("deit3_small_patch16_224", {"init_values": 0.5}),  # no_embed_class=True
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", {"init_values": 0.5}),  # 4 + P
    "siglip": ("vit_base_patch16_siglip_224", {}),  # no class token, attention pooling
    "patch_dropout": (VIT, {"patch_drop_rate": 0.5}),  # keeps the (now more) prefix tokens
    "flexivit": ("flexivit_small", {}),
    "dynamic_size": (VIT, {"dynamic_img_size": True}),  # position embedding resampled per input
}


@pytest.mark.parametrize("family", list(SHALLOW_MERGES))
def test_vpt_shallow_merges_into_a_vit_with_register_tokens(family: str) -> None:
    name, extra = SHALLOW_MERGES[family]
    model = trained(apply_adapter(create(name, **extra), METHODS["vpt_shallow"]))
    registers = model.num_reg_tokens
    prompts = get_adapter(model).edits["prompts"].tokens[0].detach().clone()
    x = images(size=48 if extra.get("dynamic_img_size") else 32)  # 6 x 6 patches, not 4 x 4
    with torch.no_grad():
        adapted = model(x)
        torch.manual_seed(5)  # training mode too (patch dropout draws the same patches)
        adapted_training = model.train()(x)
    merge_adapter(model.eval(), unload=False)  # nothing to fold in place: the same model
    with torch.no_grad():
        assert torch.equal(model(x), adapted)
    unmerge_adapter(model)
    merge_adapter(model)
    # the reference: timm's own ViT with P more register tokens, holding the prompts
    fresh = create(name, **extra, reg_tokens=registers + P)
    assert list(model.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.reg_token[0, registers:], prompts)
    if not fresh.no_embed_class:
        at = fresh.num_prefix_tokens - P
        assert torch.equal(fresh.pos_embed[0, at:at + P],
                           torch.zeros(P, DIM, dtype=torch.float64))
    for attr in ("num_prefix_tokens", "num_reg_tokens"):
        assert getattr(model, attr) == getattr(fresh, attr)
    assert getattr(model.patch_drop, "num_prefix_tokens", None) == getattr(
        fresh.patch_drop, "num_prefix_tokens", None)
    with torch.no_grad():
        assert rel(fresh(x), adapted) < 1e-12
        assert torch.equal(model(x), fresh(x))
        torch.manual_seed(5)
        assert rel(fresh.train()(x), adapted_training) < 1e-12


@pytest.mark.parametrize("family, reason", [
    ("clip", "norm_pre"),
    ("deit_distilled", "VisionTransformerDistilled does not place register tokens"),
])
def test_vpt_shallow_refuses_to_merge_where_registers_differ(family: str, reason: str) -> None:
    model = trained(apply_adapter(create_family(family), METHODS["vpt_shallow"]))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        adapted = model(x)
    with pytest.raises(UserError, match=reason) as info:
        merge_adapter(model)
    assert "adapter file" in str(info.value)
    assert get_adapter(model) is not None and not get_adapter(model).merged
    assert all(not m.merged for m in model.modules() if isinstance(m, PromptedBlock))
    with torch.no_grad():
        assert torch.equal(model(x), adapted)


# -- where the prompts are, checked against a forward written out here -----------------------

def vpt_reference(plain: nn.Module, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """VPT on the plain model, step by step: prompts after the prefix tokens from the first
    block on (replaced per block when deep), dropped before the final norm; then timm's head."""
    deep = tokens.shape[0] > 1
    prefix, p = plain.num_prefix_tokens, tokens.shape[1]
    h = plain.norm_pre(plain._pos_embed(plain.patch_embed(x)))
    for i, block in enumerate(plain.blocks):
        if i == 0 or deep:
            kept = h[:, prefix + (p if i else 0):]
            h = torch.cat([h[:, :prefix], tokens[i].expand(len(x), -1, -1), kept], dim=1)
        h = block(h)
    h = plain.norm(torch.cat([h[:, :prefix], h[:, prefix + p:]], dim=1))
    return plain.forward_head(h)


@pytest.mark.parametrize("method", VPT)
@pytest.mark.parametrize("kwargs", [{"global_pool": "avg", "fc_norm": True},
                                    {"global_pool": "avg", "class_token": False},
                                    {"global_pool": "token"}])
def test_vpt_matches_a_written_out_forward_and_avg_pool_skips_prompts(method: str,
                                                                      kwargs: dict) -> None:
    plain = create(**kwargs)
    model = trained(apply_adapter(create(**kwargs), METHODS[method]))
    tokens = get_adapter(model).edits["prompts"].tokens.detach()
    x = images()
    with torch.no_grad():
        assert rel(model(x), vpt_reference(plain, tokens, x)) < 1e-12
    # the pooled features are the mean over the patch tokens alone, as without prompts
    features = model.forward_features(x)
    assert features.shape[1] == plain.num_prefix_tokens + plain.patch_embed.num_patches
    if METHODS[method].deep:  # every block's output has the model's layout: intermediates too
        final, blocks = model.forward_intermediates(x, output_fmt="NLC")
        assert torch.equal(final, features)
        assert [y.shape[1] for y in blocks] == [plain.patch_embed.num_patches] * DEPTH


# -- families --------------------------------------------------------------------------------

VPT_REFUSED = {
    "eva02": "rotary position embedding",
    "eva02_split": "rotary position embedding",
    "beit": "relative position bias",
    "vit_relpos": "relative-position embedding",
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_vpt_on_every_family_or_a_refusal_naming_it(family: str) -> None:
    model = create_family(family)
    if family in VPT_REFUSED:
        with pytest.raises(UserError, match=VPT_REFUSED[family]) as info:
            apply_adapter(model, VPTConfig(num_tokens=P))
        assert type(model).__name__ in str(info.value)
        assert get_adapter(model) is None and not hasattr(model, "adapter")
        assert not any(isinstance(m, PromptedBlock) for m in model.modules())
        return
    check_vpt_works(model)


@pytest.mark.parametrize("name, extra", [
    ("eva02_tiny_patch14_224", {"use_rot_pos_emb": False}),
    ("beit_base_patch16_224", {"use_rel_pos_bias": False, "use_abs_pos_emb": True}),
])
def test_vpt_on_eva_and_beit_without_their_relative_positions(name: str, extra: dict) -> None:
    check_vpt_works(create_vit(name, **extra))


def check_vpt_works(model: nn.Module) -> None:
    """Prompts move the output, the head sees the tokens it saw before, every prompt trains."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.eval().forward_features(x).shape
    apply_adapter(model, VPTConfig(num_tokens=P))
    with torch.no_grad():
        start = model(x)
        assert model.forward_features(x).shape == features
    out = trained(model)(x)
    assert rel(out, start) > 1e-4
    out.pow(2).sum().backward()
    tokens = get_adapter(model).edits["prompts"].tokens
    assert tokens.shape[0] == len(model.blocks) and tokens.grad.abs().amax(-1).min() > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bitfit_on_every_family(family: str) -> None:
    plain, model = create_family(family), apply_adapter(create_family(family), BitFitConfig())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    trained(model)(x).pow(2).sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    with torch.no_grad():
        adapted = model(x)
        assert rel(adapted, plain(x)) > 1e-4
    merge_adapter(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), adapted)


# -- the method configs through the CLI, and export ------------------------------------------

@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy")
    make_toy_task(root / "data")
    return {"root": root, "weights": make_backbone_file(root / "backbone.safetensors")}


@pytest.mark.parametrize("method, config", [("vpt", VPTConfig()),
                                            ("vpt_shallow", VPTConfig(deep=False)),
                                            ("bitfit", BitFitConfig())])
def test_cli_fits_with_the_method_config_and_exports_or_refuses(
        toy: dict[str, Path], tmp_path: Path, method: str, config: AdapterConfig) -> None:
    """``fit -c <base> -c configs/methods/<method>.yaml``, then ``export``: VPT-shallow as timm's
    ViT with 5 register tokens, BitFit as the plain ViT, VPT-deep refused with the reason."""
    base = write_config(tmp_path / "fit.yaml", toy["root"] / "data", toy["weights"],
                        tmp_path / "logs")
    cli = cli_main(["fit", "--config", str(base),
                    "--config", str(REPO / "configs" / "methods" / f"{method}.yaml"),
                    "--trainer.max_epochs", "1"])
    assert cli.model.adapter_config == config and cli.model.hparams.weight_decay == 0.0
    ckpt, out = cli.trainer.checkpoint_callback.best_model_path, tmp_path / "export"
    export = ["export", "--ckpt_path", ckpt, "--output_dir", str(out)]
    if method == "vpt":
        with pytest.raises(UserError, match="VPT-deep cannot be folded.*adapter file"):
            cli_main(export)
        assert not (out / "model.safetensors").exists()
        return
    cli_main(export)
    exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert exported.num_reg_tokens == (5 if method == "vpt_shallow" else 0)
    module = ViTClassifier.from_checkpoint(ckpt).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), module.model(x), rtol=1e-5, atol=1e-6)
