"""A tiny learnable VTAB-layout task, tiny ViT backbone weights, and a config for both."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from safetensors.torch import save_file

from tests.helpers.data import write_list
from tests.helpers.models import create_vit, vit_kwargs
from wegeft_vision import WeGeFTConfig
from wegeft_vision.data import VTAB1kDataModule
from wegeft_vision.training import ViTClassifier

TASK = "toy"
NUM_CLASSES = 6  # > 5, so top-5 accuracy is logged too
# Images per class in each list, plus a few extra test images of the first classes. The test
# total stays even: Lightning's DistributedSampler pads an odd split with a repeated image.
SPLIT_SIZES = {"train800": 2, "val200": 1, "test": 1, "train800val200": 3}
EXTRA_TEST = 2
BACKBONE = "vit_tiny_patch16_224"
BACKBONE_KWARGS = vit_kwargs("narrow")


def class_image(label: int, index: int) -> Image.Image:
    """A noisy image whose colour and stripe position depend on the class."""
    rng = np.random.default_rng(1000 * label + index)
    pixels = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
    pixels[:, :, label % 3] += 150
    pixels[4 * label: 4 * label + 4, :, :] = 255
    return Image.fromarray(pixels)


def make_toy_task(root: Path, task: str = TASK, extra_test: int = EXTRA_TEST) -> Path:
    """``<root>/<task>/`` in NOAH's VTAB-1k layout with PNGs of NUM_CLASSES classes."""
    folder = root / task
    for split, per_class in SPLIT_SIZES.items():
        entries = []
        labels = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
        labels += list(range(extra_test)) if split == "test" else []
        for index, label in enumerate(labels):
            rel = f"images/{split}/{index:06d}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            class_image(label, index).save(folder / rel)
            entries.append((rel, label))
        write_list(folder / f"{split}.txt", entries)
    return folder


def make_backbone_file(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """Random tiny-ViT weights without a head, as an offline ``weights_path``."""
    model = create_vit(BACKBONE, "narrow", dtype=torch.float32, seed=seed, num_classes=0,
                       **overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tiny_model(weights: Path, **kwargs) -> ViTClassifier:
    args = dict(backbone=BACKBONE, num_classes=NUM_CLASSES, weights_path=str(weights),
                backbone_kwargs=BACKBONE_KWARGS, adapter=WeGeFTConfig(rank=4, targets="all"),
                drop_path_rate=0.0, lr=0.01, weight_decay=0.01, warmup_epochs=1.0, min_lr=1e-3)
    return ViTClassifier(**{**args, **kwargs})


def toy_data(files: dict[str, Path], batch_size: int = 12,
             task: str = TASK) -> VTAB1kDataModule:
    return VTAB1kDataModule(str(files["data"]), task, split="train800", num_classes=NUM_CLASSES,
                            batch_size=batch_size, num_workers=0, image_size=32,
                            mean=(0.5,) * 3, std=(0.5,) * 3)


def trainer(tmp_path: Path, max_epochs: int, callbacks: tuple = (), **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="last"), *callbacks],
                     num_sanity_val_steps=0, **kwargs)


def write_config(path: Path, data_root: Path, weights: Path, log_dir: Path,
                 **model: Any) -> Path:
    """A complete fit/test config for the toy task: few steps, no progress bars."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(log_dir), "name": "toy"}},
        },
        "model": {
            "backbone": BACKBONE, "weights_path": str(weights),
            "backbone_kwargs": BACKBONE_KWARGS, "drop_path_rate": 0.0, "lr": 0.01,
            "weight_decay": 0.01, "warmup_epochs": 1, "min_lr": 0.001,
            "adapter": {"class_path": "wegeft_vision.WeGeFTConfig",
                        "init_args": {"rank": 4, "targets": "all"}},
            **model,
        },
        "data": {
            "class_path": "wegeft_vision.data.VTAB1kDataModule",
            "init_args": {"root": str(data_root), "task": TASK, "split": "train800",
                          "num_classes": NUM_CLASSES, "batch_size": 4, "num_workers": 0,
                          "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def fit_toy_run(root: Path) -> dict[str, Any]:
    """One fit of the toy task under ``root`` (2 epochs, tested after fit) through the CLI, for
    module-scoped fixtures: root, config, weights, the CLI, its checkpoint and final metrics."""
    from wegeft_vision.cli import cli_main

    make_toy_task(root / "data")
    weights = make_backbone_file(root / "backbone.safetensors")
    config = write_config(root / "fit.yaml", root / "data", weights, root / "logs")
    cli = cli_main(["fit", "--config", str(config), "--test_after_fit", "true"])
    return {"root": root, "config": config, "weights": weights, "cli": cli,
            "ckpt": Path(cli.trainer.checkpoint_callback.best_model_path),
            "metrics": {k: float(v) for k, v in cli.trainer.callback_metrics.items()}}


def save_google_npz(model: torch.nn.Module, path: Path) -> Path:
    """A timm ViT's weights in the layout of Google's ViT ``.npz`` files (``ViT-B_16.npz``),
    the inverse of the mapping timm's npz loader applies."""
    embed_dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    arrays = {
        "embedding/kernel": model.patch_embed.proj.weight.permute(2, 3, 1, 0),
        "embedding/bias": model.patch_embed.proj.bias,
        "cls": model.cls_token,
        "Transformer/posembed_input/pos_embedding": model.pos_embed,
        "Transformer/encoder_norm/scale": model.norm.weight,
        "Transformer/encoder_norm/bias": model.norm.bias,
    }
    for i, block in enumerate(model.blocks):
        prefix = f"Transformer/encoderblock_{i}/"
        attention = prefix + "MultiHeadDotProductAttention_1/"
        for part, weight, bias in zip(("query", "key", "value"),
                                      block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3)):
            arrays[f"{attention}{part}/kernel"] = weight.T.reshape(embed_dim, heads, -1)
            arrays[f"{attention}{part}/bias"] = bias.reshape(heads, -1)
        arrays[f"{attention}out/kernel"] = block.attn.proj.weight.reshape(
            embed_dim, heads, -1).permute(1, 2, 0)
        arrays[f"{attention}out/bias"] = block.attn.proj.bias
        for norm, name in ((block.norm1, "LayerNorm_0"), (block.norm2, "LayerNorm_2")):
            arrays[f"{prefix}{name}/scale"], arrays[f"{prefix}{name}/bias"] = norm.weight, norm.bias
        for r, layer in enumerate((block.mlp.fc1, block.mlp.fc2)):
            arrays[f"{prefix}MlpBlock_3/Dense_{r}/kernel"] = layer.weight.T
            arrays[f"{prefix}MlpBlock_3/Dense_{r}/bias"] = layer.bias
    np.savez(path, **{k: v.detach().contiguous().numpy() for k, v in arrays.items()})
    return path
