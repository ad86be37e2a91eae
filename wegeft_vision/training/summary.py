"""The end-of-run summary: what trained, how well, how long, and where the files went."""
from __future__ import annotations

import time
import lightning as L
from lightning.pytorch.callbacks import Callback


class RunSummary(Callback):
    """Collects validation accuracy per epoch and the wall time; ``report()`` formats them with
    the test metrics, parameter counts, checkpoint and log paths."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.val_acc: list[float] = []
        self.fitted = False

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fitted = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        acc = trainer.callback_metrics.get("val/acc")
        if acc is not None and not trainer.sanity_checking and trainer.state.fn == "fit":
            self.val_acc.append(float(acc))

    def report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        lines = ["", "=== wegeft-vision summary ==="]
        describe = getattr(pl_module, "describe", None)
        if callable(describe):
            lines.append(f"model:        {describe()}")
        if self.val_acc:
            best = max(range(len(self.val_acc)), key=self.val_acc.__getitem__)
            lines.append(f"val acc:      best {self.val_acc[best]:.4f} (validation {best + 1} of "
                         f"{len(self.val_acc)}), last {self.val_acc[-1]:.4f}")
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
