"""Decode images to RGB, run a split's pipeline, and optionally keep prepared images in memory."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .readers import Sample
from .transforms import SplitTransform

log = logging.getLogger(__name__)
CACHE_FILL_BATCH = 64


class ImageDecodeError(RuntimeError):
    """An image file exists but cannot be decoded (corrupt, truncated, not an image)."""


def load_rgb(path: Union[str, Path]) -> Image.Image:
    """Decode an image file and convert any mode (L, P, RGBA, CMYK, ...) to RGB."""
    try:
        with Image.open(path) as image:
            image.load()
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
