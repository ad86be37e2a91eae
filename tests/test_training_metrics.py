"""The training metrics: ``train/acc`` and the epoch's ``train/loss`` equal what an independent
computation from the model's outputs gives, in one process and over two DDP processes."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from tests.helpers.training import (make_backbone_file, make_toy_task, tiny_model, toy_data,
                                    trainer, write_config)

REPO = Path(__file__).parents[1]  # where the DDP processes import this file's callback from


class RecordBatches(Callback):
    """Before each training step, the model's outputs on that step's batch, computed apart from
    the module's metrics: per image the cross-entropy, and whether the largest (and, to show
    the test can tell, the smallest) logit is the label. ``folder``: also saved there as
    ``rank<r>.pt`` (for runs in other processes)."""

    def __init__(self, folder: str = "") -> None:
        self.folder = folder
        self.losses: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []
        self.argmin_correct: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch,
                             batch_idx: int) -> None:
        images, labels = batch
        with torch.no_grad():  # the same forward as the step's: no dropout, no drop path
            logits = pl_module(images).double()
        self.losses.append(F.cross_entropy(logits, labels, reduction="none"))
        self.correct.append(logits.argmax(1) == labels)
        self.argmin_correct.append(logits.argmin(1) == labels)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.folder:
            torch.save({key: torch.cat(getattr(self, key)) for key in
                        ("losses", "correct", "argmin_correct")},
                       Path(self.folder) / f"rank{trainer.global_rank}.pt")


def randomise_head(model, seed: int = 0) -> None:
    """A head whose logits differ enough that argmax and argmin pick different classes."""
    generator = torch.Generator().manual_seed(seed)
    head = model.model.head
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
        head.bias.copy_(torch.randn(head.bias.shape, generator=generator))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("metrics")
    make_toy_task(root / "data")
    return {"root": root, "data": root / "data",
            "weights": make_backbone_file(root / "backbone.safetensors")}


def test_train_accuracy_and_loss_are_those_of_the_steps_outputs(files: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    L.seed_everything(0)
    model = tiny_model(files["weights"])
    randomise_head(model, seed=4)  # train/acc 4 / 12; from -logits it would be 2 / 12
    record = RecordBatches()
    run = trainer(tmp_path, 1, callbacks=(record,), limit_val_batches=0)
    run.fit(model, datamodule=toy_data(files, batch_size=5))  # 12 images: batches of 5, 5, 2
    correct, argmin_correct = torch.cat(record.correct), torch.cat(record.argmin_correct)
    losses = torch.cat(record.losses)
    assert len(losses) == 12
    accuracy = correct.double().mean().item()
    assert argmin_correct.double().mean().item() != accuracy  # -logits would be caught
    assert float(run.callback_metrics["train/acc"]) == pytest.approx(accuracy, abs=1e-7)
    # The epoch's loss is the mean over images, not over batches (the last one is smaller).
    assert float(run.callback_metrics["train/loss_epoch"]) == pytest.approx(
        losses.mean().item(), rel=1e-6)
    batch_means = torch.stack([batch.mean() for batch in record.losses]).mean().item()
    assert abs(batch_means - losses.mean().item()) > 1e-3 * losses.mean().item()


def test_ddp_train_loss_and_accuracy_are_means_over_both_processes(files: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    config = write_config(tmp_path / "fit.yaml", files["data"], files["weights"], tmp_path)
    command = [sys.executable, "-m", "wegeft_vision.cli", "fit", "--config", str(config),
               "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
               "--trainer.strategy", "ddp", "--trainer.devices", "2",
               "--trainer.callbacks+=tests.test_training_metrics.RecordBatches",
               f"--trainer.callbacks.folder={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # 12 training images, 6 per process in batches of 4 and 2.
    assert [len(rank["losses"]) for rank in ranks] == [6, 6]
    losses = torch.cat([rank["losses"] for rank in ranks])
    correct = torch.cat([rank["correct"] for rank in ranks]).double()
    [metrics_file] = tmp_path.glob("toy/version_*/metrics.csv")
    with open(metrics_file) as handle:
        [epoch_row] = [row for row in csv.DictReader(handle) if row.get("train/loss_epoch")]
    logged_loss, logged_acc = float(epoch_row["train/loss_epoch"]), float(epoch_row["train/acc"])
    assert logged_loss == pytest.approx(losses.mean().item(), rel=1e-5)
    local = ranks[0]["losses"].mean().item()  # what rank 0 alone would log, without sync_dist
    assert abs(local - losses.mean().item()) > 1e-3 * losses.mean().item()
    assert logged_acc == pytest.approx(correct.mean().item(), abs=1e-7)
