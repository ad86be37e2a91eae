"""Write ``predict`` results to CSV: one row per image, in the order of the predict split."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ..data.datasets import UNREADABLE, ImageDecodeError, load_rgb
from ..data.readers import MAX_SHOWN
from ..errors import RunFolderInUseError


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` (``predictions.rank<R>.csv`` per process under DDP) to the log
    directory, or to ``output_dir``. Columns: index (in the predict split), image (its path,
    where the dataset knows its files), label (labelled splits only: not for ``predict_root``),
    prediction (class index), class_name (where the datamodule has names), probability (of the
    predicted class), then p0, p1, ... one probability per class, then error.

    An image of ``predict_root`` that cannot be read stops nothing: its row has an empty
    prediction and probabilities and says why in ``error`` (empty for every other row), and a
    warning names the first few such files. A file that exists already is never overwritten:
    the run is refused before predicting (RunFolderInUseError naming it).

    Args:
        output_dir: where to write; None: the trainer's log directory.
    """

    def __init__(self, output_dir: Optional[str] = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.paths: list[Path] = []
        self._unreadable: list[bool] = []

    def _path(self, trainer: L.Trainer) -> Path:
        folder = Path(self.output_dir or trainer.log_dir or ".")
        name = ("predictions.csv" if trainer.world_size == 1
                else f"predictions.rank{trainer.global_rank}.csv")
        return folder / name

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        # Before the images are read, so a second predict into one folder costs nothing; every
        # rank looks for every rank's name, so that all of them refuse together.
        path = self._path(trainer)
        names = (["predictions.csv"] if trainer.world_size == 1 else
                 [f"predictions.rank{rank}.csv" for rank in range(trainer.world_size)])
        for existing in (path.parent / name for name in names):
            if existing.exists():
                raise RunFolderInUseError(
                    f"{existing} exists already (an earlier predict): move it away, or predict "
                    "into another folder (a new log version, --trainer.logger.init_args.version, "
                    "or PredictionWriter(output_dir=...))")
        self._unreadable = []

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        # The label slot of a tolerant dataset's batch marks the images it could not read.
        labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        count = len(outputs)
        self._unreadable += ([False] * count if not isinstance(labels, torch.Tensor)
                             else (labels == UNREADABLE).tolist())
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx,
                                     dataloader_idx)

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        path = self._path(trainer)
        loader = trainer.predict_dataloaders
        dataset = (loader[0] if isinstance(loader, list) else loader).dataset
        samples = getattr(dataset, "samples", None)
        labelled = getattr(dataset, "labelled", True)
        class_names = getattr(trainer.datamodule, "class_names", None)
        probabilities = torch.cat([p.float().cpu() for p in predictions]) if predictions else None
        indices = [int(i) for batch in batch_indices[0] for i in batch] if batch_indices else []
        unreadable = self._unreadable + [False] * (len(indices) - len(self._unreadable))
        failed: list[tuple[str, str]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", newline="") as handle:  # "x": never over another run's file
            writer = csv.writer(handle)
            classes = 0 if probabilities is None else probabilities.shape[1]
            writer.writerow(["index", "image", *(["label"] if labelled else []), "prediction",
                             "class_name", "probability", *(f"p{c}" for c in range(classes)),
                             "error"])
            for row, index in enumerate(indices):
                sample = samples[index] if samples is not None else None
                image = "" if sample is None else getattr(sample, "path", "")
                label = "" if sample is None else getattr(sample, "label", "")
                if unreadable[row]:
                    reason = _why_unreadable(image)
                    failed.append((str(image), reason))
                    writer.writerow([index, image, *([label] if labelled else []), "", "", "",
                                     *([""] * classes), reason])
                    continue
                probs = probabilities[row]
                predicted = int(probs.argmax())
                writer.writerow([index, image, *([label] if labelled else []), predicted,
                                 class_names[predicted] if class_names else "",
                                 f"{probs[predicted]:.8g}", *(f"{p:.8g}" for p in probs.tolist()),
                                 ""])
        self.paths.append(path)
        if failed:
            shown = "; ".join(f"{image}: {reason}" for image, reason in failed[:MAX_SHOWN])
            more = f"; and {len(failed) - MAX_SHOWN} more" if len(failed) > MAX_SHOWN else ""
            warnings.warn(f"{len(failed)} of {len(indices)} images could not be read and have no "
                          f"prediction (their rows in {path} say why in the error column): "
                          f"{shown}{more}", stacklevel=2)


def _why_unreadable(image: Any) -> str:
    """Decoding failed in a loader worker, whose message did not travel with the batch: decode
    the file again here for it (only the failed files)."""
    try:
        load_rgb(image)
    except ImageDecodeError as exc:
        return str(exc).removeprefix(f"cannot decode image {image}: ")
    return "could not be read while predicting"
