"""Write scikit-learn's bundled handwritten digits in the VTAB-1k on-disk layout (no network).

Two task folders under ``--out`` (default ``data/digits_vtab``):

* ``digits``: the demo's TARGET task, digits 5-9 relabelled 0-4. Per class 40 train, 20 val and
  the rest (~119) test, so ``train800.txt`` holds 200 images, ``val200.txt`` 100,
  ``train800val200.txt`` 300 and ``test.txt`` 596. Few-shot lists ``train_shot{K}_seed{S}.txt``
  (K in 1, 2, 4, 8, 16 per class; seeds 0, 1, 2) draw from the train800 images; for one seed the
  smaller lists are subsets of the larger ones.
* ``digits_source``: the backbone's SOURCE task, digits 0-4 (labels unchanged). Per class 120
  train, 20 val, the rest (~41) test: 600 / 100 / 700 / 201 images.

Each 8x8 image (values 0-16) is scaled to [0, 1], upsampled bilinearly to 32x32, scaled to
[0, 255], rounded and written as an RGB PNG (three equal channels) named after its index in
``load_digits`` (``images/test/001234.png``). List lines read ``images/<split>/NNNNNN.png label``,
in a shuffled order as in the published VTAB-1k lists. Everything is derived from ``--seed``,
so re-running gives byte-identical files.

    python scripts/make_demo_data.py [--out data/digits_vtab] [--seed 0] [--overwrite]
"""
from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

IMAGE_SIZE = 32
SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)
FEWSHOT_SEEDS: tuple[int, ...] = (0, 1, 2)
TARGET_TASK, SOURCE_TASK = "digits", "digits_source"


@dataclass(frozen=True)
class TaskSpec:
    """Which digits form a task and how many images per class go to train800 and val200."""

    name: str
    digits: tuple[int, ...]
    train_per_class: int
    val_per_class: int


TASKS = (TaskSpec(TARGET_TASK, (5, 6, 7, 8, 9), train_per_class=40, val_per_class=20),
         TaskSpec(SOURCE_TASK, (0, 1, 2, 3, 4), train_per_class=120, val_per_class=20))


def fewshot_split_name(shots: int, seed: int) -> str:
    """The list-file stem of a few-shot training split, e.g. ``train_shot8_seed0``."""
    return f"train_shot{shots}_seed{seed}"


def to_rgb_32(images: np.ndarray) -> np.ndarray:
    """[N, 8, 8] values 0-16 -> [N, 32, 32, 3] uint8, bilinear upsampling in float32."""
    x = torch.from_numpy(images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    gray = (x[:, 0] * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return np.repeat(gray[..., None], 3, axis=-1)


def split_task(targets: np.ndarray, spec: TaskSpec, rng: np.random.Generator
               ) -> dict[str, list[tuple[int, int]]]:
    """Per-class split into train800 / val200 / test; items are (digits index, new label)."""
    splits: dict[str, list[tuple[int, int]]] = {"train800": [], "val200": [], "test": []}
    for label, digit in enumerate(spec.digits):
        indices = rng.permutation(np.flatnonzero(targets == digit))
        cut_train, cut_val = spec.train_per_class, spec.train_per_class + spec.val_per_class
        if len(indices) <= cut_val:
            raise ValueError(f"digit {digit} has only {len(indices)} images; task {spec.name!r} "
                             f"needs more than {cut_val}")
        splits["train800"] += [(int(i), label) for i in indices[:cut_train]]
        splits["val200"] += [(int(i), label) for i in indices[cut_train:cut_val]]
        splits["test"] += [(int(i), label) for i in indices[cut_val:]]
    splits["train800val200"] = splits["train800"] + splits["val200"]
    return {name: [items[i] for i in rng.permutation(len(items))] for name, items in splits.items()}


def fewshot_lists(train: Sequence[tuple[int, int]], seed: int
                  ) -> dict[str, list[tuple[int, int]]]:
    """K-shot subsets of ``train`` for every K in SHOTS; one class order per seed, so nested."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[tuple[int, int]]] = {}
    for item in sorted(train):
        by_class.setdefault(item[1], []).append(item)
    orders = {label: [items[i] for i in rng.permutation(len(items))]
              for label, items in sorted(by_class.items())}
    out = {}
    for shots in SHOTS:
        chosen = [item for items in orders.values() for item in items[:shots]]
        out[fewshot_split_name(shots, seed)] = [chosen[i] for i in rng.permutation(len(chosen))]
    return out


def image_path(split: str, index: int) -> str:
    return f"images/{split}/{index:06d}.png"


def write_list(path: Path, lines: Sequence[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_task(root: Path, spec: TaskSpec, images: np.ndarray, targets: np.ndarray,
               rng: np.random.Generator) -> dict[str, int]:
    """Write one task folder; returns the number of images per list file."""
    task_dir = root / spec.name
    splits = split_task(targets, spec, rng)
    counts = {}
    for split, items in splits.items():
        (task_dir / "images" / split).mkdir(parents=True)
        for index, _ in items:
            Image.fromarray(images[index]).save(task_dir / image_path(split, index),
                                                            format="PNG")
        write_list(task_dir / f"{split}.txt", [f"{image_path(split, i)} {y}" for i, y in items])
        counts[split] = len(items)
    if spec.name == TARGET_TASK:
        for seed in FEWSHOT_SEEDS:
            for name, items in fewshot_lists(splits["train800"], seed).items():
                write_list(task_dir / f"{name}.txt",
                           [f"{image_path('train800', i)} {y}" for i, y in items])
                counts[name] = len(items)
    return counts


def make_demo_data(out: Path, seed: int = 0, overwrite: bool = False) -> dict[str, dict[str, int]]:
    """Write both task folders under ``out``; returns list-file sizes per task."""
    for spec in TASKS:
        task_dir = out / spec.name
        if task_dir.exists() and any(task_dir.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{task_dir} exists and is not empty; pass --overwrite to "
                                      "replace it")
            shutil.rmtree(task_dir)
    digits = load_digits()
    images = to_rgb_32(digits.images)
    rng = np.random.default_rng(seed)
    return {spec.name: write_task(out, spec, images, digits.target, rng) for spec in TASKS}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/digits_vtab"),
                        help="VTAB-1k root to write the task folders into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing task folders")
    args = parser.parse_args(argv)
    for task, counts in make_demo_data(args.out, args.seed, args.overwrite).items():
        sizes = ", ".join(f"{name} {n}" for name, n in counts.items())
        print(f"{args.out / task}: {sizes}")


if __name__ == "__main__":
    main()
