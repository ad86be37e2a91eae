"""Images/s of VTAB1kDataModule on CPU, with and without the in-memory cache.

Writes a VTAB-1k-style task folder of random JPEGs (to --root, or a temporary folder), then
times full passes over the training split (train800val200: --images images) and prints a
Markdown table. Cached: the one-off decode+resize in setup() is timed separately from the epochs.

    OMP_NUM_THREADS=1 python scripts/benchmark_data.py --images 1000 --epochs 3
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wegeft_vision.data import VTAB1kDataModule

LISTS = {"train800": 0.8, "val200": 0.2, "test": 0.2}


def write_task(folder: Path, images: int, size: int, classes: int = 10) -> None:
    """NOAH's layout with ``images`` training images (train800 + val200) of ``size`` px."""
    rng = np.random.default_rng(0)
    # Smooth random images compress like photos; pure noise would make JPEG decoding slow.
    base = rng.integers(0, 256, (images, 8, 8, 3), dtype=np.uint8)
    lines: dict[str, list[str]] = {name: [] for name in (*LISTS, "train800val200")}
    index = 0
    for name, fraction in LISTS.items():
        (folder / "images" / name).mkdir(parents=True, exist_ok=True)
        for i in range(int(images * fraction)):
            rel = f"images/{name}/{i:06d}.jpg"
            Image.fromarray(base[index % images]).resize((size, size), Image.BICUBIC).save(
                folder / rel, quality=90)
            index += 1
            lines[name].append(f"{rel} {i % classes}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for name, entries in lines.items():
        (folder / f"{name}.txt").write_text("\n".join(entries) + "\n")


def epochs_per_second(dm: VTAB1kDataModule, epochs: int) -> float:
    loader = dm.train_dataloader()
    start = time.perf_counter()
    seen = 0
    for _ in range(epochs):
        for images, _labels in loader:
            seen += len(images)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="training images (train800val200)")
    parser.add_argument("--source-size", type=int, default=256, help="side of the JPEGs on disk")
    parser.add_argument("--image-size", type=int, default=224, help="model input size")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--root", type=Path, default=None, help="keep the generated data here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        if not (root / "bench" / "train800val200.txt").is_file():
            write_task(root / "bench", args.images, args.source_size)
        common = {"image_size": args.image_size, "batch_size": args.batch_size,
                  "num_workers": args.num_workers}
        rows = []
        for cache in (False, True):
            dm = VTAB1kDataModule(root, "bench", num_classes=10, cache=cache, **common)
            start = time.perf_counter()
            dm.setup("fit")
            fill = time.perf_counter() - start
            rate = epochs_per_second(dm, args.epochs)
            total = fill + args.epochs * len(dm.datasets["train"]) / rate
            rows.append((cache, fill, rate, total))

    print(f"VTAB-1k-style train split: {args.images} JPEGs of {args.source_size} px -> "
          f"{args.image_size} px, batch {args.batch_size}, num_workers {args.num_workers}, "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print()
    print(f"| cache | setup (s) | images/s per epoch | {args.epochs} epochs incl. setup (s) |")
    print("| --- | --- | --- | --- |")
    for cache, fill, rate, total in rows:
        print(f"| {'on' if cache else 'off'} | {fill:.2f} | {rate:,.0f} | {total:.1f} |")


if __name__ == "__main__":
    main()
