"""Pretrain the offline demo's tiny ViT on the source digits (0-4) and save it for plain timm.

Writes ``data/demo_backbone.safetensors`` (backbone weights under timm's own key names, no
classifier head, so any head size can be created) and ``data/demo_backbone.json`` (how to
rebuild it and how it was made). Loading needs no wegeft_vision import::

    timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=5,
                      pretrained_cfg_overlay=dict(file="data/demo_backbone.safetensors"),
                      img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3)

    python scripts/make_demo_data.py          # first, if data/digits_vtab is missing
    python scripts/pretrain_demo_backbone.py [--data data/digits_vtab] [--out data/demo_backbone]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from wegeft_vision.data import load_rgb, read_list_file

MODEL_NAME = "vit_tiny_patch16_224"
MODEL_KWARGS: dict[str, int] = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3)
MEAN = STD = (0.5, 0.5, 0.5)
SOURCE_TASK = "digits_source"
NUM_SOURCE_CLASSES = 5
MAX_SHIFT = 2


def load_split(root: Path, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a VTAB-1k list file as uint8 [N, 3, H, W] and their labels [N]."""
    samples = read_list_file(root / task / f"{split}.txt", root / task)
    images = np.stack([np.asarray(load_rgb(sample.path)) for sample in samples])
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            torch.tensor([sample.label for sample in samples], dtype=torch.int64))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 normalised with the backbone's mean/std."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random offset of up to ``max_shift`` px, filling with 0."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def create_backbone(num_classes: int, pretrained_file: Path | None = None) -> nn.Module:
    """The demo ViT, random or loaded from a weights file the way a plain timm user would."""
    if pretrained_file is None:
        return timm.create_model(MODEL_NAME, pretrained=False, num_classes=num_classes,
                                 **MODEL_KWARGS)
    return timm.create_model(MODEL_NAME, pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(file=str(pretrained_file)),
                             **MODEL_KWARGS)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256) -> float:
    """Top-1 accuracy (0-1) of ``model`` on normalised ``images``."""
    model.eval()
    correct = sum(int((model(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size])
                      .sum()) for i in range(0, len(images), batch_size))
    return correct / len(images)


def pretrain(data: Path, steps: int, batch_size: int, lr: float, weight_decay: float,
             seed: int) -> tuple[nn.Module, dict[str, float]]:
    """Train the ViT with its 5-way head on source train800val200; returns it and test accuracy."""
    torch.manual_seed(seed)
    train_x, train_y = load_split(data, SOURCE_TASK, "train800val200")
    test_x, test_y = load_split(data, SOURCE_TASK, "test")
    model = create_backbone(NUM_SOURCE_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.int64)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(train_x), generator=generator)])
        batch, order = order[:batch_size], order[batch_size:]
        images = normalize(random_shift(train_x[batch], MAX_SHIFT, generator))
        loss = F.cross_entropy(model(images), train_y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}")
    seconds = time.perf_counter() - start
    result = {"source_test_accuracy": accuracy(model, normalize(test_x), test_y),
              "source_train_accuracy": accuracy(model, normalize(train_x), train_y),
              "train_seconds": seconds, "num_train": len(train_x), "num_test": len(test_x)}
    return model, result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/digits_vtab"),
                        help="VTAB-1k root written by make_demo_data.py")
    parser.add_argument("--out", type=Path, default=Path("data/demo_backbone"),
                        help="output path without suffix: writes .safetensors and .json")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    source_list = args.data / SOURCE_TASK / "train800val200.txt"
    if not source_list.is_file():
        raise FileNotFoundError(f"{source_list} not found: run scripts/make_demo_data.py first")

    model, result = pretrain(args.data, args.steps, args.batch_size, args.lr,
                             args.weight_decay, args.seed)
    model.reset_classifier(0)
    weights_path = args.out.with_suffix(".safetensors")
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights_path),
              metadata={"timm_model": MODEL_NAME, "model_kwargs": json.dumps(MODEL_KWARGS)})

    # The file must load through plain timm with a fresh head, as the docs promise.
    reloaded = create_backbone(NUM_SOURCE_CLASSES, weights_path)
    reference = model.state_dict()
    if any(not torch.equal(v, reference[k]) for k, v in reloaded.state_dict().items()
           if not k.startswith("head.")):
        raise RuntimeError(f"{weights_path} did not reload into timm {MODEL_NAME} unchanged")

    info = {
        "timm_model": MODEL_NAME,
        "model_kwargs": MODEL_KWARGS,
        "weights": weights_path.name,
        "load": (f"timm.create_model({MODEL_NAME!r}, pretrained=True, num_classes=C, "
                 f"pretrained_cfg_overlay=dict(file={str(weights_path)!r}), "
                 + ", ".join(f"{k}={v}" for k, v in MODEL_KWARGS.items()) + ")"),
        "head": "removed (num_classes=0); create the model with the number of classes you need",
        "data_config": {"input_size": [3, MODEL_KWARGS["img_size"], MODEL_KWARGS["img_size"]],
                        "mean": list(MEAN), "std": list(STD), "interpolation": "bilinear"},
        "source_task": {"data": str(args.data / SOURCE_TASK), "digits": [0, 1, 2, 3, 4],
                        "train_split": "train800val200", "test_split": "test",
                        "num_train": result["num_train"], "num_test": result["num_test"]},
        "source_test_accuracy": round(result["source_test_accuracy"], 4),
        "source_train_accuracy": round(result["source_train_accuracy"], 4),
        "training": {"steps": args.steps, "batch_size": args.batch_size, "optimizer": "AdamW",
                     "lr": args.lr, "weight_decay": args.weight_decay,
                     "schedule": "cosine to 0, no warm-up", "augmentation":
                     f"random shift of up to +-{MAX_SHIFT} px per image, zero fill",
                     "seed": args.seed, "seconds": round(result["train_seconds"], 1),
                     "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                     "timm": timm.__version__},
        "made_by": "python scripts/pretrain_demo_backbone.py",
    }
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"source test accuracy {result['source_test_accuracy']:.4f} "
          f"(train {result['source_train_accuracy']:.4f}) after {result['train_seconds']:.1f} s; "
          f"wrote {weights_path} and {json_path}")


if __name__ == "__main__":
    main()
