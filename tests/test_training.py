"""ViTClassifier: backbone creation, optimiser groups, schedule, slim checkpoints, resume."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import load_file

from tests.helpers.training import (BACKBONE, BACKBONE_KWARGS, make_backbone_file, make_toy_task,
                                    save_google_npz, tiny_model, toy_data, trainer)
from wegeft_vision import FullFinetuneConfig, LinearProbeConfig, LoRAConfig, WeGeFTConfig
from wegeft_vision.data import VTAB1kDataModule
from wegeft_vision.training import ViTClassifier, build_adamw, create_backbone, warmup_cosine


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("training")
    make_toy_task(root / "data")
    return {"data": root / "data",
            "weights": make_backbone_file(root / "backbone.safetensors", seed=0),
            "other_weights": make_backbone_file(root / "other.safetensors", seed=1),
            "deeper_weights": make_backbone_file(root / "deeper.safetensors", depth=3)}


# Schedule and optimiser.
def paper_lr(step: int, lr: float, warmup_lr: float, min_lr: float, warmup: int,
             total: int) -> float:
    """The paper's schedule (REFERENCE.md): linear warm-up, then half a cosine to min_lr."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def stepped_lrs(scheduler, optimizer, steps: int) -> list[list[float]]:
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen + [[group["lr"] for group in optimizer.param_groups]]


@pytest.mark.parametrize("warmup, total", [(10, 110), (0, 7), (3, 3), (1, 2)])
def test_warmup_cosine_steps_through_the_papers_schedule(warmup: int, total: int) -> None:
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:],
                                                            "weight_decay": 0.0}], lr=1e-3)
    scheduler = warmup_cosine(optimizer, warmup_lr=1e-7, min_lr=1e-6, warmup_steps=warmup,
                              total_steps=total)
    seen = stepped_lrs(scheduler, optimizer, total)
    # After a warm-up of all steps the rate stays at lr (no cosine left to run).
    expected = [paper_lr(step, 1e-3, 1e-7, 1e-6, warmup, total)
                if step < warmup or warmup < total else 1e-3 for step in range(total + 1)]
    for step, (lrs, lr) in enumerate(zip(seen, expected)):
        assert lrs == pytest.approx([lr, lr], rel=1e-9, abs=1e-15), step
    if warmup:
        assert seen[0][0] == pytest.approx(1e-7, rel=1e-9)
    assert seen[warmup][0] == pytest.approx(1e-3, rel=1e-9)


def test_warmup_cosine_resumes_from_its_state_dict() -> None:
    def fresh():
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        return optimizer, warmup_cosine(optimizer, warmup_lr=1e-7, min_lr=1e-6, warmup_steps=10,
                                        total_steps=50)
    optimizer, scheduler = fresh()
    stepped_lrs(scheduler, optimizer, 7)
    resumed_optimizer, resumed = fresh()
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    seen = stepped_lrs(resumed, resumed_optimizer, 43)
    for step, [lr] in enumerate(seen, start=7):
        assert lr == pytest.approx(paper_lr(step, 1e-3, 1e-7, 1e-6, 10, 50), rel=1e-9), step


@pytest.mark.parametrize("kwargs, match", [
    ({"warmup_steps": 5, "total_steps": 4}, r"0 <= warmup_steps <= total_steps.*got 5 and 4"),
    ({"warmup_steps": 0, "total_steps": 0}, r"total_steps > 0"),
    ({"warmup_lr": 0.0}, r"warmup_lr must be in \(0, lr=0.001\] for a warm-up, got 0.0"),
    ({"warmup_lr": 0.01}, r"warmup_lr must be in \(0, lr=0.001\]"),
])
def test_warmup_cosine_refuses_bad_settings(kwargs: dict, match: str) -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    args = {"warmup_lr": 1e-7, "min_lr": 1e-6, "warmup_steps": 2, "total_steps": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        warmup_cosine(optimizer, **args)


@pytest.mark.parametrize("adapter, trainable_prefixes", [
    (WeGeFTConfig(rank=4, targets="all"), ("adapter.", "head.")),
    (LoRAConfig(rank=2), ("adapter.", "head.")),
    (LinearProbeConfig(), ("head.",)),
    (FullFinetuneConfig(), ("",)),
])
def test_adamw_decays_matrices_only(files: dict[str, Path], adapter, trainable_prefixes) -> None:
    model = tiny_model(files["weights"], adapter=adapter).model
    optimizer = build_adamw(model, lr=1e-3, weight_decay=0.05)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["lr"] == 1e-3
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"]
               for p in g["params"]}
    kept = {names[id(p)] for g in optimizer.param_groups if not g["weight_decay"]
            for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable and not decayed & kept
    assert all(n.startswith(trainable_prefixes) for n in trainable)
    params = dict(model.named_parameters())
    assert decayed and all(params[n].ndim >= 2 for n in decayed)
    assert all(params[n].ndim <= 1 or n.endswith(".bias") or n in ("pos_embed", "cls_token")
               for n in kept)
    assert "head.bias" in kept and "head.weight" in decayed
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8


# Backbone creation and its errors.
def test_local_weights_are_loaded_in_every_format(files: dict[str, Path], tmp_path: Path) -> None:
    saved = load_file(str(files["weights"]))
    pth = tmp_path / "backbone.pth"
    torch.save(saved, pth)
    for path in (files["weights"], pth):
        model = create_backbone(BACKBONE, 3, weights_path=path, backbone_kwargs=BACKBONE_KWARGS)
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items())
        assert state["head.weight"].shape == (3, BACKBONE_KWARGS["embed_dim"])


def test_google_npz_weights_load_through_timms_npz_loader(tmp_path: Path) -> None:
    source = create_backbone(BACKBONE, 3, pretrained=False, init_seed=7,
                             backbone_kwargs=BACKBONE_KWARGS)
    npz = save_google_npz(source, tmp_path / "ViT-tiny.npz")
    model = create_backbone(BACKBONE, 5, weights_path=npz, backbone_kwargs=BACKBONE_KWARGS)
    reference = source.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)
    deeper = {**BACKBONE_KWARGS, "depth": 3}
    with pytest.raises(ValueError, match=r"weights .*ViT-tiny.npz do not fit timm model "
                                         r"'vit_tiny_patch16_224'.*encoderblock_2"):
        create_backbone(BACKBONE, 5, weights_path=npz, backbone_kwargs=deeper)


def test_random_backbone_is_reproducible_from_init_seed() -> None:
    first, second, other = (create_backbone(BACKBONE, 3, pretrained=False, init_seed=seed,
                                            backbone_kwargs=BACKBONE_KWARGS) for seed in (0, 0, 1))
    assert torch.equal(first.blocks[0].attn.qkv.weight, second.blocks[0].attn.qkv.weight)
    assert not torch.equal(first.blocks[0].attn.qkv.weight, other.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("name, kwargs, error, match", [
    ("vit_bse_patch16_224", {}, ValueError,
     r"unknown timm backbone 'vit_bse_patch16_224'; did you mean .*vit_base_patch16_224"),
    ("vit_base_patch16_224.augreg_in21", {"pretrained": True}, ValueError,
     r"no pretrained weights 'vit_base_patch16_224.augreg_in21'; did you mean "
     r".*vit_base_patch16_224.augreg_in21k"),
    (BACKBONE, {"weights_path": "missing/weights.safetensors"}, FileNotFoundError,
     r"weights_path missing/weights.safetensors does not exist"),
    (BACKBONE, {"backbone_kwargs": {**BACKBONE_KWARGS, "depth_typo": 3}}, ValueError,
     r"backbone_kwargs .*depth_typo.* do not fit timm model 'vit_tiny_patch16_224'"),
])
def test_backbone_errors(name: str, kwargs: dict, error: type, match: str) -> None:
    kwargs = {"pretrained": False, "backbone_kwargs": BACKBONE_KWARGS, **kwargs}
    with pytest.raises(error, match=match):
        create_backbone(name, 3, **kwargs)


def test_weights_of_another_architecture_are_refused(files: dict[str, Path],
                                                     tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"weights .*deeper.safetensors do not fit timm model "
                                         r"'vit_tiny_patch16_224'.*unexpected blocks.2"):
        create_backbone(BACKBONE, 3, weights_path=files["deeper_weights"],
                        backbone_kwargs=BACKBONE_KWARGS)
    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    with pytest.raises(ValueError, match=r"weights.txt has suffix '.txt'; expected one of .npz"):
        create_backbone(BACKBONE, 3, weights_path=text, backbone_kwargs=BACKBONE_KWARGS)


# Slim checkpoints, resuming, and loading into the wrong model.
class Crash(Callback):
    """Fails as the second epoch starts, after the first epoch's checkpoint was written."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def fit(files: dict[str, Path], tmp_path: Path, max_epochs: int, ckpt_path=None,
        crash: bool = False) -> tuple[ViTClassifier, L.Trainer]:
    L.seed_everything(0)
    model = tiny_model(files["weights"])
    run = trainer(tmp_path, max_epochs)
    if crash:
        run.callbacks.append(Crash())
        with pytest.raises(RuntimeError, match="simulated crash"):
            run.fit(model, datamodule=toy_data(files))
    else:
        run.fit(model, datamodule=toy_data(files), ckpt_path=ckpt_path)
    return model, run


def test_checkpoint_is_slim_and_resume_reproduces_training(files: dict[str, Path],
                                                          tmp_path: Path) -> None:
    straight, straight_run = fit(files, tmp_path / "straight", max_epochs=2)
    fit(files, tmp_path / "first", max_epochs=2, crash=True)
    checkpoint_file = tmp_path / "first" / "last.ckpt"
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    trainable = set(straight.trainable_names())
    assert set(checkpoint["state_dict"]) == trainable
    assert not any("blocks" in k and "adapter" not in k for k in checkpoint["state_dict"])
    assert checkpoint["global_step"] == 1 and checkpoint["epoch"] == 0
    frozen_bytes = sum(v.numel() * v.element_size() for k, v in straight.state_dict().items()
                       if k not in trainable)
    assert checkpoint_file.stat().st_size < frozen_bytes / 2

    resumed, resumed_run = fit(files, tmp_path / "resumed", max_epochs=2,
                               ckpt_path=checkpoint_file)
    assert resumed_run.global_step == straight_run.global_step == 2
    live, reference = resumed.state_dict(), straight.state_dict()
    for name in trainable:
        torch.testing.assert_close(live[name], reference[name], rtol=1e-5, atol=1e-6)
    state, reference_state = (run.optimizers[0].state_dict()["state"]
                              for run in (resumed_run, straight_run))
    for index, moments in reference_state.items():
        torch.testing.assert_close(state[index]["exp_avg_sq"], moments["exp_avg_sq"],
                                   rtol=1e-4, atol=1e-10)
    assert (resumed_run.lr_scheduler_configs[0].scheduler.last_epoch
            == straight_run.lr_scheduler_configs[0].scheduler.last_epoch == 2)


@pytest.mark.parametrize("overrides, match", [
    ({"num_classes": 5}, r"trained with num_classes=6, but this model has num_classes=5"),
    ({"backbone_kwargs": {**BACKBONE_KWARGS, "depth": 3}, "weights_path": None,
      "pretrained": False}, r"trained with backbone_kwargs=.*'depth': 2.*this model has "
                            r"backbone_kwargs=.*'depth': 3"),
    ({"adapter": LoRAConfig(rank=4)}, r"trained with adapter=WeGeFTConfig.*this model has "
                                      r"adapter=LoRAConfig"),
    ({"other_weights": True}, r"was trained on other frozen weights than this model's "
                              r"vit_tiny_patch16_224 from .*other.safetensors"),
])
def test_loading_into_a_different_model_is_refused(files: dict[str, Path], tmp_path: Path,
                                                   overrides: dict, match: str) -> None:
    fit(files, tmp_path, max_epochs=1)
    if overrides.pop("other_weights", False):
        overrides["weights_path"] = str(files["other_weights"])
    with pytest.raises(ValueError, match=match):
        ViTClassifier.from_checkpoint(tmp_path / "last.ckpt", **overrides)


def test_trainer_test_refuses_mismatching_checkpoint_before_testing(files: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    fit(files, tmp_path, max_epochs=1)
    model = tiny_model(files["other_weights"])
    run = trainer(tmp_path, 1)
    with pytest.raises(ValueError, match=r"checkpoint .*last.ckpt was trained on other frozen"):
        run.test(model, datamodule=toy_data(files), ckpt_path=tmp_path / "last.ckpt")
    assert "test/acc" not in run.callback_metrics


def test_schedule_is_counted_in_steps_for_max_steps_runs(files: dict[str, Path],
                                                         tmp_path: Path) -> None:
    model = tiny_model(files["weights"], warmup_epochs=1.0)
    run = trainer(tmp_path, max_epochs=None, max_steps=5, limit_val_batches=0)
    run.fit(model, datamodule=toy_data(files, batch_size=4))  # 12 images: 3 steps per epoch
    config = run.lr_scheduler_configs[0]
    assert config.interval == "step" and config.scheduler.last_epoch == 5
    warmup, cosine = config.scheduler._schedulers
    assert (warmup.total_iters, cosine.T_max) == (3, 2)
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        paper_lr(5, 0.01, 1e-7, 1e-3, 3, 5), rel=1e-9)


def test_full_finetuning_checkpoint_rebuilds_without_the_backbone_file(files: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    weights = tmp_path / "backbone.safetensors"
    weights.write_bytes(files["weights"].read_bytes())
    L.seed_everything(0)
    model = tiny_model(weights, adapter=FullFinetuneConfig())
    trainer(tmp_path, 1).fit(model, datamodule=toy_data(files))
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(model.state_dict())
    weights.unlink()
    rebuilt = ViTClassifier.from_checkpoint(tmp_path / "last.ckpt")
    reference = model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in rebuilt.state_dict().items())
