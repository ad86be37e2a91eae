"""The README.md of an export: a Hugging Face model card written from the training run.

Everything in it is read from the checkpoint and the run's own files beside it (Lightning's
``config.yaml`` and ``metrics.csv``); what cannot be found is written as not recorded, never
guessed.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

import timm
from huggingface_hub import ModelCardData

from ..adapters.model import ParameterCount

# Datamodule arguments that say nothing about the data (the backbone is the model's row).
LOADER_ARGS = {"root", "num_workers", "pin_memory", "cache", "cache_budget_gb", "batch_size",
               "backbone", "predict_root"}
NOT_RECORDED = "not recorded"


def run_folder(ckpt_path: Path) -> Path:
    """Lightning's log folder of a checkpoint written to ``<log_dir>/checkpoints/``."""
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


def run_accuracy(metrics_csv: Path, global_step: int) -> dict[str, float]:
    """Accuracies the run logged for the checkpoint's own weights.

    Lightning's CSVLogger writes validation rows at the index of the last training batch
    (``global_step - 1``) and test rows at ``global_step``; rows at other steps belong to other
    weights (an earlier epoch) and are ignored. Lightning logs ``trainer.test(ckpt_path=...)`` at
    the trainer's step, not the checkpoint's: a test of an earlier checkpoint in the same log
    folder reads as the final weights' (docs/export.md says so).
    """
    if not metrics_csv.is_file():
        return {}
    found: dict[str, float] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            for stage, step in (("val", global_step - 1), ("test", global_step)):
                if row.get("step") != str(step):
                    continue
                for key in (f"{stage}/acc", f"{stage}/acc_top5"):
                    if row.get(key):
                        found[key] = float(row[key])
    return found


def _base_model(hparams: Any) -> Optional[str]:
    """The backbone's hub id when its weights came from timm; a local weights file may hold
    anything."""
    if not hparams.pretrained or hparams.get("weights_path"):
        return None
    cfg = timm.models.get_pretrained_cfg(hparams.backbone)
    return None if cfg is None else cfg.hf_hub_id


def _percent(value: Optional[float]) -> str:
    return NOT_RECORDED if value is None else f"{100 * value:.2f}%"


def write_model_card(path: Path, *, module: Any, count: ParameterCount,
                     checkpoint: dict[str, Any], ckpt_path: Path, license: Optional[str],
                     files: list[str]) -> str:
    """Write the card to ``path`` and return its text.

    Args:
        module: the ``ViTClassifier`` rebuilt from the checkpoint.
        count: its parameters, counted before merging.
        checkpoint: the checkpoint as ``torch.load`` returns it.
        ckpt_path: where the checkpoint was read from (its run folder holds the metrics).
        license: the licence the user gives the export; None leaves it unstated.
        files: the files the export holds.
    """
    hp = module.hparams
    adapter = module.adapter_config
    method = type(adapter).__name__.removesuffix("Config")
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    data_class = str(data.get("_class_path", NOT_RECORDED)).rpartition(".")[2]
    data_args = ", ".join(f"{k}={v}" for k, v in data.items()
                          if not k.startswith("_") and k not in LOADER_ARGS and v is not None)
    accuracy = run_accuracy(run_folder(ckpt_path) / "metrics.csv", checkpoint.get("global_step", 0))
    info = module.checkpoint_info or {}
    names = info.get("class_names")
    shown = ", ".join(map(str, (names or [])[:10])) + (", ..." if len(names or []) > 10 else "")
    command = ("wegeft-vision fit --config training_config.yaml"
               if "training_config.yaml" in files else NOT_RECORDED)
    rows = [
        ("Backbone", f"`{hp.backbone}`" + (f" ({hp.backbone_kwargs})" if hp.backbone_kwargs
                                         else "")),
        ("Method", method),
        ("Rank", getattr(adapter, "rank", "-")),
        ("Targets", f"`{getattr(adapter, 'targets', '-')}`"),
        ("Adapter settings", f"`{adapter}`"),
        ("Trainable parameters", f"{count.trainable:,} ({count.percent:.3f}% of the backbone's "
                                 f"{count.backbone:,}) + head {count.head:,}"),
        ("Data", f"{data_class}({data_args})" if data else NOT_RECORDED),
        ("Classes", f"{hp.num_classes}" + (f": {shown}" if names else "")),
        ("Test accuracy (top-1)", _percent(accuracy.get("test/acc"))),
        ("Validation accuracy (top-1)", _percent(accuracy.get("val/acc"))),
        ("Checkpoint", f"epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')}"),
        ("Training command", f"`{command}`" if command != NOT_RECORDED else command),
        ("License", license or "not stated by the exporter"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    step = checkpoint.get("global_step")
    eval_note = (f"The accuracies are the rows of the run's `metrics.csv` logged at this "
                 f"checkpoint's step ({step})." if accuracy else
                 "The run's log folder holds no accuracy logged at this checkpoint's step.")
    card_data = ModelCardData(library_name="timm", license=license, pipeline_tag=
                              "image-classification", base_model=_base_model(hp),
                              tags=["image-classification", "timm", "wegeft-vision", method])
    body = f"""
# {hp.backbone} fine-tuned with {method}

The adapter is merged into the backbone: this is a plain timm model, loaded without
wegeft-vision.

| | |
| --- | --- |
{table}

{eval_note}
`config.json` holds the preprocessing the run evaluated with, so timm's own eval transform
reproduces it:

```python
import timm
model = timm.create_model("local-dir:<this folder>", pretrained=True).eval()  # or "hf-hub:<repo>"
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
```

Files: {", ".join(f"`{f}`" for f in files)}.
"""
    text = f"---\n{card_data.to_yaml()}\n---\n{body}"
    path.write_text(text, encoding="utf-8")
    return text
