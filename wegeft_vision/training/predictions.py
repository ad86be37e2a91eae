"""Write ``predict`` results to CSV: one row per image, in the order of the predict split."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` (``predictions.rank<R>.csv`` per process under DDP) to the log
    directory, or to ``output_dir``. Columns: index (in the predict split), image (its path,
    where the dataset knows its files), label (labelled splits only: not for ``predict_root``),
    prediction (class index), class_name (where the datamodule has names), probability (of the
    predicted class), then p0, p1, ... one probability per class.

    Args:
        output_dir: where to write; None: the trainer's log directory.
    """

    def __init__(self, output_dir: Optional[str] = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.paths: list[Path] = []

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        folder = Path(self.output_dir or trainer.log_dir or ".")
        name = ("predictions.csv" if trainer.world_size == 1
                else f"predictions.rank{trainer.global_rank}.csv")
        loader = trainer.predict_dataloaders
        dataset = (loader[0] if isinstance(loader, list) else loader).dataset
        samples = getattr(dataset, "samples", None)
        labelled = getattr(dataset, "labelled", True)
        class_names = getattr(trainer.datamodule, "class_names", None)
        probabilities = torch.cat([p.float().cpu() for p in predictions]) if predictions else None
        indices = [int(i) for batch in batch_indices[0] for i in batch] if batch_indices else []
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            classes = 0 if probabilities is None else probabilities.shape[1]
            writer.writerow(["index", "image", *(["label"] if labelled else []), "prediction",
                             "class_name", "probability", *(f"p{c}" for c in range(classes))])
            for row, index in enumerate(indices):
                probs = probabilities[row]
                predicted = int(probs.argmax())
                sample = samples[index] if samples is not None else None
                label = "" if sample is None else getattr(sample, "label", "")
                writer.writerow([index, "" if sample is None else getattr(sample, "path", ""),
                                 *([label] if labelled else []), predicted,
                                 class_names[predicted] if class_names else "",
                                 f"{probs[predicted]:.8g}", *(f"{p:.8g}" for p in probs.tolist())])
        self.paths.append(path)
