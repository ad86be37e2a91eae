"""Decode images to RGB, check image files cheaply before training, run a split's pipeline, and
optionally keep prepared images in memory."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from ..errors import MissingFileError, UserError
from .readers import MAX_SHOWN, Sample
from .transforms import SplitTransform

log = logging.getLogger(__name__)
CACHE_FILL_BATCH = 64
# The label an image to classify carries when it could not be read (ImageListDataset's
# ``tolerant`` mode): the batch tells the prediction writer which rows hold no prediction.
UNREADABLE = -2
MISSING = "does not exist"
WORKER_PREFIX = "Caught ImageDecodeError in DataLoader worker"


class ImageDecodeError(UserError):
    """An image file cannot be decoded (corrupt, truncated, not an image), or a list of such
    files; the message names each file."""

    def __init__(self, message: str = "") -> None:
        super().__init__(_from_worker(str(message)))


def _from_worker(message: str) -> str:
    """The original message first when a DataLoader worker re-raised the error: torch rebuilds
    it in the main process from "Caught ImageDecodeError in DataLoader worker process N.\n
    Original Traceback ...", whose first line, all a user-error line shows, names no file."""
    if not message.startswith(WORKER_PREFIX):
        return message
    marker = f"{__name__}.ImageDecodeError: "
    original = message.rpartition(marker)[2].strip() if marker in message else ""
    if not original:
        return message
    where = message.splitlines()[0].removeprefix("Caught ImageDecodeError ").rstrip(".")
    return f"{original.splitlines()[0]} ({where})\n{message}"


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


def _file_problem(path: Path, header: bool) -> Optional[str]:
    """Why ``path`` cannot be an image, from its directory entry and (``header``) its header
    only: PIL's ``open`` identifies the format and reads the size without decoding pixels.
    None if it looks readable; truncated or corrupt pixel data is found only when decoded."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return MISSING
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        return "is not a file"
    if info.st_size == 0:
        return "is empty (0 bytes)"
    if header:
        try:
            with Image.open(path):
                pass
        except UnidentifiedImageError:
            return "not an image file PIL can identify"
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            return str(exc) or type(exc).__name__
    return None


def check_image_files(splits: dict[str, Sequence[Sample]], description: str,
                      headers: bool = True) -> None:
    """Check every image file of every split at once, before training reads any: it exists,
    is a non-empty file, and (``headers``) PIL identifies its header. Raises one error for all
    splits, per split counting the bad files and naming the first few with their annotation
    line: MissingFileError when every bad file is missing, else ImageDecodeError."""
    parts, only_missing = [], True
    for split, samples in splits.items():
        bad = [(sample, problem) for sample in samples
               if (problem := _file_problem(sample.path, headers)) is not None]
        if not bad:
            continue
        missing = all(problem == MISSING for _, problem in bad)
        only_missing &= missing
        shown = "; ".join(f"{sample.path} ({sample.source})" + ("" if missing else f": {problem}")
                          for sample, problem in bad[:MAX_SHOWN])
        more = f"; and {len(bad) - MAX_SHOWN} more" if len(bad) > MAX_SHOWN else ""
        what = "do not exist" if missing else "cannot be read"
        parts.append(f"{description}, {split} split: {len(bad)} of {len(samples)} image files "
                     f"{what}: {shown}{more}")
    if parts:
        raise (MissingFileError if only_missing else ImageDecodeError)(". ".join(parts))


class ImageListDataset(Dataset):
    """``(image float32 [3,H,W] normalised, label)`` pairs from a list of samples.

    ``fill_cache`` decodes and prepares every image once and keeps the uint8 results in one
    tensor; later reads skip decoding and resizing. Only splits whose pipeline does not augment
    can be cached (their prepared images all have the input size). ``labelled`` is False for
    images to classify, whose labels are placeholders (``NO_LABEL``). ``tolerant`` (images to
    classify): an image that cannot be read gives a black image and the label ``UNREADABLE``
    instead of stopping the run, so the others are still classified.
    """

    def __init__(self, samples: Sequence[Sample], transform: SplitTransform,
                 labelled: bool = True, tolerant: bool = False) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.labelled = labelled
        self.tolerant = tolerant
        self.cache: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.samples)

    def prepared(self, index: int) -> torch.Tensor:
        """The uint8 image after the deterministic part of the pipeline."""
        return self.transform.prepare(load_rgb(self.samples[index].path))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.cache is not None:
            image = self.cache[index]
        elif not self.tolerant:
            image = self.prepared(index)
        else:
            try:
                image = self.prepared(index)
            except ImageDecodeError as exc:
                log.debug("%s", exc)
                # Black, of the prepared size: the batch must collate.
                return (self.transform(Image.new("RGB", (8, 8))), UNREADABLE)
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
