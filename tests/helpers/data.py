"""Write tiny datasets in the exact on-disk layouts of VTAB-1k, FGVC, few-shot FGVC, ImageFolder."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

VTAB_LISTS = ("train800", "val200", "train800val200", "test")


def image_bytes(seed: int, size: tuple[int, int] = (20, 28), fmt: str = "JPEG",
                mode: str = "RGB") -> bytes:
    """A random image of ``size`` (width, height) encoded as ``fmt`` in ``mode``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "P":
        image = image.quantize(16)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, seed: int, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    fmt = kwargs.pop("fmt", "PNG" if suffix == ".png" else "JPEG")
    path.write_bytes(image_bytes(seed, fmt=fmt, **kwargs))
    return path


def write_list(path: Path, entries: Sequence[tuple[str, Union[int, str]]],
               newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(f"{rel} {label}{newline}" for rel, label in entries).encode())
    return path


def make_vtab_task(root: Path, task: str, labels: dict[str, Sequence[int]],
                   size: tuple[int, int] = (20, 28)) -> Path:
    """``<root>/<task>/`` with one JPEG per label; ``labels`` maps list name -> labels.

    train800val200 defaults to train800 + val200 with its own image copies, as in NOAH's copies.
    """
    folder = root / task
    labels = dict(labels)
    if "train800val200" not in labels:
        labels["train800val200"] = [*labels["train800"], *labels["val200"]]
    seed = 0
    for name, split_labels in labels.items():
        entries = []
        for index, label in enumerate(split_labels):
            rel = f"images/{name}/{index:06d}.jpg"
            write_image(folder / rel, seed, size=size)
            seed += 1
            entries.append((rel, label))
        write_list(folder / f"{name}.txt", entries)
    return folder


def make_fgvc(folder: Path, image_dir: str, splits: dict[str, dict[str, Union[int, str]]]) -> Path:
    """VPT layout: ``<folder>/{split}.json`` mapping paths under ``image_dir`` to raw labels.

    Every image file is one small shared JPEG: FGVC checks need many files, not many pixels.
    """
    data = image_bytes(0, size=(24, 18))
    for split, labels in splits.items():
        for rel in labels:
            path = folder / image_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (folder / f"{split}.json").write_text(json.dumps(labels))
    return folder


def make_fewshot(root: Path, folder_name: str, image_dir: str,
                 lists: dict[str, Sequence[int]]) -> Path:
    """NOAH layout: ``<root>/<folder_name>/annotations/<list>`` with images under ``image_dir``."""
    folder = root / folder_name
    seed = 100
    for name, split_labels in lists.items():
        entries = []
        for index, label in enumerate(split_labels):
            rel = f"class_{label}/{name.split('.')[0]}_{index}.jpg"
            write_image(folder / image_dir / rel, seed)
            seed += 1
            entries.append((rel, label))
        write_list(folder / "annotations" / name, entries)
    return folder


def make_image_folder(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """torchvision ImageFolder layout: ``<root>/<split>/<class>/<n>.png``; value = image count."""
    seed = 500
    for split, classes in splits.items():
        for class_name, count in classes.items():
            for index in range(count):
                write_image(root / split / class_name / f"{index}.png", seed)
                seed += 1
    return root


# Image sizes (width, height) for datasets whose tensors are checked pixel by pixel: at the
# input size, at FGVC's resize target 18 = floor(16 / (224 / 256)) for a 16 px input, and
# larger, smaller and non-square ones that need resizing.
CHECK_SIZES = ((16, 16), (18, 18), (23, 31), (40, 27), (9, 12))
CHECK_KINDS = ("vtab", "fgvc", "fewshot", "fewshot_resize", "folder", "folder_resize")


def make_datamodule(kind: str, root: Path, sizes: Sequence[tuple[int, int]] = CHECK_SIZES,
                    **common):
    """A datamodule of ``kind`` (see CHECK_KINDS) over PNGs written under ``root``.

    Every split holds one image per size, image i of a split has label i (so a batch's labels
    tell which file each image came from); FGVC's train split holds all 102 OxfordFlowers
    classes, cycling through the sizes. "*_resize" kinds run without augmentation.
    """
    from wegeft_vision.data import (FewShotDataModule, FGVCDataModule, ImageFolderDataModule,
                                    VTAB1kDataModule)
    seed = iter(range(10_000, 20_000))

    def png(path: Path, index: int) -> str:
        write_image(path, next(seed), size=sizes[index % len(sizes)])
        return path.name

    if kind == "vtab":
        for name in VTAB_LISTS:
            write_list(root / "toy" / f"{name}.txt",
                       [(f"images/{name}/{png(root / f'toy/images/{name}/{i}.png', i)}", i)
                        for i in range(len(sizes))])
        return VTAB1kDataModule(root, "toy", **common)
    if kind == "fgvc":
        for split in ("train", "val", "test"):
            count = 102 if split == "train" else len(sizes)
            labels = {f"{split}/{i}.png": i + 1 for i in range(count)}  # 1-based, as VPT's
            for rel in labels:
                png(root / rel, int(Path(rel).stem))
            (root / f"{split}.json").write_text(json.dumps(labels))
        return FGVCDataModule(root, "OxfordFlowers", **common)
    if kind.startswith("fewshot"):
        lists = {"train": "train_meta.list.num_shot_1.seed_0", "val": "val_meta.list",
                 "test": "test_meta.list"}
        for split, name in lists.items():
            folder = root / "toyshot"
            write_list(folder / "annotations" / name,
                       [(f"{split}/{png(folder / f'images/{split}/{i}.png', i)}", i)
                        for i in range(len(sizes))])
        return FewShotDataModule(root, "toyshot", shots=1, augment=kind == "fewshot", **common)
    if kind.startswith("folder"):
        for split in ("train", "val", "test"):
            for i in range(len(sizes)):
                png(root / split / f"class{i}" / "0.png", i)
        return ImageFolderDataModule(root, augment=kind == "folder", **common)
    raise ValueError(f"unknown kind {kind!r}; expected one of {CHECK_KINDS}")
