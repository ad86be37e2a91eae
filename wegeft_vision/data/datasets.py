"""Decode images to RGB, run a split's pipeline, and optionally keep prepared images in memory."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .readers import Sample
from .transforms import SplitTransform

log = logging.getLogger(__name__)
CACHE_FILL_BATCH = 64


class ImageDecodeError(RuntimeError):
    """An image file exists but cannot be decoded (corrupt, truncated, not an image)."""


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image as 8-bit "L"; PIL's own conversion clips
    (a mid-grey 16-bit PNG would turn white, a [0, 1] float image black)."""
    pixels = np.asarray(image, dtype=np.float64)
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if image.mode == "F":
        # Float images hold [0, 1]; a small excursion from arithmetic is clipped.
        if not (-0.5 / 255 <= low and high <= 1 + 0.5 / 255):
            raise ValueError(f"float image (mode F) with values in [{low:g}, {high:g}]: only "
                             "[0, 1] is read; scale it to [0, 1] or convert it to 8 or 16 bits")
        scale = 255.0
    else:
        # I;16* are 16-bit by definition; older Pillow and some TIFFs give 16-bit data as I.
        if not (0 <= low and high <= 65535):
            raise ValueError(f"32-bit integer image (mode {image.mode}) with values in "
                             f"[{low:g}, {high:g}]: only 0..65535 (16-bit) is read; convert it "
                             "to 8 or 16 bits")
        scale = 255 / 65535
    return Image.fromarray(np.clip(np.floor(pixels * scale + 0.5), 0, 255).astype(np.uint8), "L")


def load_rgb(path: Union[str, Path]) -> Image.Image:
    """Decode an image file and convert any mode (1, L, LA, P, RGBA, CMYK, YCbCr, ...) to RGB.

    Alpha is dropped (as torchvision's and timm's loaders do). Deeper grey images are scaled to
    8 bits, rounding half up: 16-bit (I;16, I;16B, ...) and I holding 0..65535 as
    ``value * 255 / 65535``; float (F) holding [0, 1] as ``value * 255``. I or F outside those
    ranges raise ImageDecodeError rather than be guessed at.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I") or image.mode == "F":
                image = _to_8bit(image)
            # A palette image with a transparent colour goes through RGBA, as PIL advises, so the
            # transparent index keeps its palette colour instead of raising a warning.
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode image {path}: {exc}") from exc


class ImageListDataset(Dataset):
    """``(image float32 [3,H,W] normalised, label)`` pairs from a list of samples.

    ``fill_cache`` decodes and prepares every image once and keeps the uint8 results in one
    tensor; later reads skip decoding and resizing. Only splits whose pipeline does not augment
    can be cached (their prepared images all have the input size). ``labelled`` is False for
    images to classify, whose labels are placeholders (``NO_LABEL``).
    """

    def __init__(self, samples: Sequence[Sample], transform: SplitTransform,
                 labelled: bool = True) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.labelled = labelled
        self.cache: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.samples)

    def prepared(self, index: int) -> torch.Tensor:
        """The uint8 image after the deterministic part of the pipeline."""
        return self.transform.prepare(load_rgb(self.samples[index].path))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.cache[index] if self.cache is not None else self.prepared(index)
        return self.transform.finish(image), self.samples[index].label

    @property
    def labels(self) -> list[int]:
        return [sample.label for sample in self.samples]

    def fill_cache(self, num_workers: int = 0) -> None:
        """Decode and prepare every image once, with ``num_workers`` loader processes."""
        if self.transform.augments:
            raise ValueError("only splits without augmentation can be cached")
        batches = -(-len(self) // CACHE_FILL_BATCH)
        # Workers pay off only with batches to share; a single batch is decoded in-process.
        workers = min(num_workers, batches) if batches > 1 else 0
        loader = DataLoader(_Prepared(self), batch_size=CACHE_FILL_BATCH, num_workers=workers)
        cache: Optional[torch.Tensor] = None
        start = 0
        for batch in loader:
            if cache is None:
                cache = torch.empty((len(self), *batch.shape[1:]), dtype=torch.uint8)
            cache[start:start + len(batch)] = batch
            start += len(batch)
        self.cache = cache
        log.info("cached %d prepared images (%.1f MB)", len(self),
                 0 if cache is None else cache.numel() / 2**20)


class _Prepared(Dataset):
    """The prepared uint8 images of a dataset, for filling its cache in loader workers."""

    def __init__(self, dataset: ImageListDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset.prepared(index)
