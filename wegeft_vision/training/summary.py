"""The end-of-run summary: what trained, how well, how long, and where the files went."""
from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class RunSummary(Callback):
    """Collects validation accuracy per epoch and the wall time; ``report()`` formats them with
    the test metrics, parameter counts, checkpoint and log paths.

    The accuracies travel in checkpoints, so the summary of a resumed fit covers every epoch.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.val_acc: list[tuple[int, float]] = []  # (epoch from 0, accuracy)
        self.fitted = False

    def state_dict(self) -> dict[str, Any]:
        return {"val_acc": [list(pair) for pair in self.val_acc]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_acc = [(int(epoch), float(acc)) for epoch, acc in state_dict["val_acc"]]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fitted = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        acc = trainer.callback_metrics.get("val/acc")
        if acc is not None and not trainer.sanity_checking and trainer.state.fn == "fit":
            self.val_acc.append((trainer.current_epoch, float(acc)))

    def report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        lines = ["", "=== wegeft-vision summary ==="]
        describe = getattr(pl_module, "describe", None)
        if callable(describe):
            lines.append(f"model:        {describe()}")
        if self.val_acc:
            of = f" of {trainer.max_epochs}" if (trainer.max_epochs or -1) > 0 else ""
            (best_epoch, best), (last_epoch, last) = max(
                self.val_acc, key=lambda pair: pair[1]), self.val_acc[-1]
            lines.append(f"val acc:      best {best:.4f} (epoch {best_epoch + 1}{of}), last "
                         f"{last:.4f} (epoch {last_epoch + 1}{of})")
        metrics = trainer.callback_metrics
        for stage in ("val", "test"):
            if stage == "val" and self.val_acc:
                continue
            values = [f"{name.split('/', 1)[1]} {float(metrics[name]):.4f}"
                      for name in (f"{stage}/acc", f"{stage}/acc_top5", f"{stage}/loss")
                      if name in metrics]
            if values:
                lines.append(f"{stage + ':':<14}{', '.join(values)}")
        lines.append(f"wall time:    {time.perf_counter() - self.start:.1f} s")
        for checkpoint in trainer.checkpoint_callbacks if self.fitted else []:
            if checkpoint.best_model_path:
                kind = ("latest epoch" if checkpoint.monitor is None else
                        f"best {checkpoint.monitor}")
                lines.append(f"checkpoint:   {checkpoint.best_model_path} ({kind})")
            if checkpoint.last_model_path:
                lines.append(f"checkpoint:   {checkpoint.last_model_path} (last)")
        if trainer.ckpt_path:
            lines.append(f"loaded:       {trainer.ckpt_path}")
        if trainer.log_dir:
            lines.append(f"logs:         {trainer.log_dir}")
        return "\n".join(lines)
