"""``ViTClassifier``: a timm ViT with an adapter, trained as a LightningModule.

Checkpoints are slim: they hold the trainable tensors (adapter and head) and what rebuilds the
rest: the hyper-parameters name the backbone and its weights, and a fingerprint of the frozen
weights proves on loading that the re-created backbone is the one the adapter was trained on.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse import set_parsing_settings
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ..adapters import (AdapterConfig, FullFinetuneConfig, WeGeFTConfig, apply_adapter,
                        count_parameters, frozen_fingerprint, trainable_parameter_names)
from ..adapters.model import ParameterCount
from .backbone import create_backbone
from .optim import build_adamw, warmup_cosine

PAPER_BACKBONE = "vit_base_patch16_224.augreg_in21k"
CHECKPOINT_KEY = "wegeft_vision"
CHECKPOINT_FORMAT = "wegeft_vision.checkpoint/1"
MODEL_PREFIX = "model."
# jsonargparse parses a dataclass as a fixed group of fields; enabling subclasses of
# AdapterConfig lets configs choose the method (class_path: wegeft_vision.LoRAConfig) and lets
# LightningCLI and load_from_checkpoint read the class_path form stored in checkpoints.
set_parsing_settings(subclasses_enabled=[AdapterConfig])
# Hyper-parameters that must agree between a checkpoint and the model it is loaded into.
IDENTITY_HPARAMS: tuple[str, ...] = ("backbone", "num_classes", "backbone_kwargs", "adapter")


def eval_data_config(datamodule: Any) -> Optional[dict[str, Any]]:
    """What timm's eval transform needs to reproduce the datamodule's evaluation tensors: its
    ``eval_data_config()``, else its ``data_config`` in timm's form; None without a datamodule."""
    if callable(getattr(datamodule, "eval_data_config", None)):
        return datamodule.eval_data_config()
    return timm_data_config(getattr(datamodule, "data_config", None))


def timm_data_config(config: Any) -> Optional[dict[str, Any]]:
    """A datamodule's ``DataConfig`` (input_size (H, W), mean, std, interpolation) in timm's
    form, with input_size (C, H, W); None passes through."""
    if config is None:
        return None
    return {"input_size": [3, *config.input_size], "mean": list(config.mean),
            "std": list(config.std), "interpolation": config.interpolation}


class ViTClassifier(L.LightningModule):
    """Image classification with a timm backbone adapted by WeGeFT, LoRA, a linear probe or
    full fine-tuning.

    Args:
        backbone: timm model name, e.g. ``vit_base_patch16_224.augreg_in21k`` (the paper's).
        num_classes: classes of the new head (the CLI takes it from the datamodule).
        adapter: which method trains: ``WeGeFTConfig`` (default: the paper's, attn.proj, r=16,
            shared), ``LoRAConfig``, ``LinearProbeConfig`` or ``FullFinetuneConfig``.
        pretrained: start from timm's pretrained weights (False: random, for tests).
        weights_path: local backbone weights (.npz, .safetensors, .pth) for machines without
            internet; used instead of downloading and implies ``pretrained``. Stored as an
            absolute path, so that the run's checkpoints work from any folder.
        backbone_kwargs: further ``timm.create_model`` arguments (``img_size``, ``depth``, ...).
        drop_path_rate: stochastic depth of the backbone.
        label_smoothing: cross-entropy label smoothing.
        lr: peak learning rate, reached after the warm-up.
        weight_decay: AdamW weight decay on matrices (not on biases or 1-D tensors).
        warmup_epochs: linear warm-up length in epochs (fractions allowed), counted in steps.
        warmup_lr: learning rate at the first step.
        min_lr: learning rate the cosine decay ends at, on the last step.
        init_seed: seed of the random initialisation when no weights are loaded.
        checkpoint_path: deprecated name of ``weights_path`` (it shadowed the first argument of
            ``load_from_checkpoint``); old checkpoints that store it still load.
    """

    def __init__(self, backbone: str, num_classes: int,
                 adapter: AdapterConfig = WeGeFTConfig(),
                 pretrained: bool = True, weights_path: Optional[str] = None,
                 backbone_kwargs: Optional[dict[str, Any]] = None, drop_path_rate: float = 0.1,
                 label_smoothing: float = 0.0, lr: float = 1e-3, weight_decay: float = 1e-4,
                 warmup_epochs: float = 10.0, warmup_lr: float = 1e-7, min_lr: float = 1e-6,
                 init_seed: int = 0, checkpoint_path: Optional[str] = None) -> None:
        super().__init__()
        if checkpoint_path is not None:
            warnings.warn("ViTClassifier(checkpoint_path=...) is deprecated: the backbone weights "
                          "file is now weights_path (--model.weights_path)", FutureWarning,
                          stacklevel=2)
            if weights_path is not None and weights_path != checkpoint_path:
                raise ValueError(f"give the backbone weights once: weights_path={weights_path!r} "
                                 f"and the deprecated checkpoint_path={checkpoint_path!r} differ")
            weights_path = checkpoint_path
        if weights_path is not None:
            weights_path = str(Path(weights_path).expanduser().resolve())
        self.adapter_config = AdapterConfig.from_dict(adapter)
        # save_hyperparameters reads the local variables: store the plain class_path form.
        adapter = self.adapter_config.to_dict()
        for name, value in (("lr", lr), ("warmup_lr", warmup_lr), ("min_lr", min_lr),
                            ("weight_decay", weight_decay), ("warmup_epochs", warmup_epochs),
                            ("drop_path_rate", drop_path_rate)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if warmup_epochs > 0 and not 0 < warmup_lr <= lr:
            raise ValueError(f"warmup_lr must be in (0, lr={lr}] for a warm-up, got {warmup_lr}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters(ignore=["checkpoint_path"])
        # Under LightningCLI, hparams are the parsed config rather than these locals: store the
        # resolved path, drop the deprecated name, and keep num_classes (a link target, which
        # Lightning 2.4 leaves out).
        self.hparams.pop("checkpoint_path", None)
        self.hparams.update(weights_path=weights_path, num_classes=num_classes)
        self.model = create_backbone(backbone, num_classes, pretrained=pretrained,
                                     weights_path=weights_path,
                                     drop_path_rate=drop_path_rate, init_seed=init_seed,
                                     backbone_kwargs=backbone_kwargs)
        apply_adapter(self.model, self.adapter_config)
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_metrics = self._eval_metrics("val")
        self.test_metrics = self._eval_metrics("test")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        # Taken now, from the weights as loaded: Lightning may later cast them to the run's
        # precision (bf16-true, 16-true, 64-true), and a checkpoint must load in any precision.
        self._frozen_fingerprint = self._fingerprint_frozen()
        self.checkpoint_info: Optional[dict[str, Any]] = None  # what on_load_checkpoint read

    def _eval_metrics(self, stage: str) -> MetricCollection:
        metrics = {"acc": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")}
        if self.num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        return MetricCollection(metrics, prefix=f"{stage}/")

    # Model.
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def trainable_names(self) -> list[str]:
        """State-dict keys (with the ``model.`` prefix) of the tensors that train."""
        return [MODEL_PREFIX + name for name in trainable_parameter_names(self.model)]

    def parameter_count(self) -> ParameterCount:
        return count_parameters(self.model)

    # Steps.
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                      ) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=len(labels), sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection,
                  loss_metric: MeanMetric, stage: str) -> None:
        images, labels = batch
        logits = self(images)
        # Mean over samples, not batches, so the epoch loss is exact under DDP too.
        loss_metric.update(F.cross_entropy(logits, labels), weight=len(labels))
        metrics.update(logits, labels)
        self.log(f"{stage}/loss", loss_metric, on_epoch=True, batch_size=len(labels))
        self.log_dict(metrics, on_epoch=True, prog_bar=True, batch_size=len(labels))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, self.val_loss, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, self.test_loss, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities [B, num_classes]; labels in the batch are ignored."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=-1)

    # Optimisation.
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = build_adamw(self.model, lr=hp.lr, weight_decay=hp.weight_decay)
        trainer = self.trainer
        total_steps = trainer.estimated_stepping_batches
        if not math.isfinite(trainer.num_training_batches):
            trainer.fit_loop.setup_data()  # a max_steps estimate skips loading the data
        batches = trainer.num_training_batches
        if not (math.isfinite(total_steps) and math.isfinite(batches)) or total_steps <= 0:
            raise ValueError("the warm-up/cosine schedule needs a finite number of training "
                             "steps: set trainer.max_epochs or trainer.max_steps, and train on a "
                             f"dataset with a length (got {batches} batches per epoch)")
        total_steps = int(total_steps)
        steps_per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
        warmup_steps = min(total_steps, round(hp.warmup_epochs * steps_per_epoch))
        self.schedule = {"warmup_steps": warmup_steps, "total_steps": total_steps}
        saved = (self.checkpoint_info or {}).get("schedule")
        if trainer.ckpt_path and saved and saved != self.schedule:
            # The restored scheduler state would run the checkpoint's schedule past its end.
            raise ValueError(f"checkpoint {trainer.ckpt_path} was trained with a schedule of "
                             f"{saved['total_steps']} steps ({saved['warmup_steps']} warm-up), "
                             f"this fit has {total_steps} ({warmup_steps} warm-up): resume with "
                             "the trainer.max_epochs / max_steps, batch size and data the run "
                             "started with, or start a new fit from its weights")
        scheduler = warmup_cosine(optimizer, warmup_lr=hp.warmup_lr, min_lr=hp.min_lr,
                                  warmup_steps=warmup_steps, total_steps=total_steps)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # Slim checkpoints.
    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], **overrides: Any) -> "ViTClassifier":
        """Rebuild a model from a checkpoint of this class, on the CPU, in eval mode.

        ``overrides`` replace stored hyper-parameters, e.g. ``weights_path`` when the backbone
        weights moved. Lightning's ``ViTClassifier.load_from_checkpoint(path, **overrides)`` works
        too; this one also rebuilds full fine-tuning checkpoints without the backbone weights.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if CHECKPOINT_KEY not in checkpoint:
            raise ValueError(f"checkpoint {path} was not written by wegeft_vision's ViTClassifier")
        # Keys starting with "_" are LightningCLI's bookkeeping (_instantiator, _class_path).
        hparams = {k: v for k, v in checkpoint["hyper_parameters"].items()
                   if not k.startswith("_")}
        if "checkpoint_path" in hparams:  # written before the rename to weights_path
            hparams["weights_path"] = hparams.pop("checkpoint_path")
        if isinstance(AdapterConfig.from_dict(hparams["adapter"]), FullFinetuneConfig):
            # Every tensor is in the checkpoint: no need to fetch the pretrained weights.
            hparams.update(pretrained=False, weights_path=None)
        model = cls(**{**hparams, **overrides})
        model.on_load_checkpoint(checkpoint, where=f"checkpoint {path}")
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()

    def frozen_fingerprint(self) -> str:
        """Fingerprint of every tensor that does not train, as created (before any cast)."""
        return self._frozen_fingerprint

    def _fingerprint_frozen(self) -> str:
        return frozen_fingerprint(self.model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = set(self.trainable_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in trainable}
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            # Kept apart from hyper_parameters, which load_from_checkpoint(**overrides) edits.
            "identity": {key: self.hparams[key] for key in IDENTITY_HPARAMS},
            "frozen_fingerprint": self.frozen_fingerprint(),
            "class_names": getattr(datamodule, "class_names", None),
            "data_config": eval_data_config(datamodule),
            "schedule": getattr(self, "schedule", None),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any], where: Optional[str] = None) -> None:
        if where is None:
            where = f"checkpoint {self._trainer.ckpt_path}" if (
                self._trainer is not None and self._trainer.ckpt_path) else "the checkpoint"
        info = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{where} was not written by wegeft_vision's ViTClassifier")
        self.check_compatible(info["identity"], where)
        if info["frozen_fingerprint"] != self.frozen_fingerprint():
            hp = self.hparams
            source = hp.weights_path or ("timm's pretrained weights" if hp.pretrained else
                                            f"a random init with init_seed={hp.init_seed}")
            raise ValueError(f"{where} was trained on other frozen weights than this model's "
                             f"{hp.backbone} from {source}; load it with the backbone weights "
                             "it was trained on")
        self.check_class_names(info.get("class_names"), where)
        self.checkpoint_info = info
        # The frozen tensors come from the re-created backbone; strict loading still checks
        # that the checkpoint holds every trainable tensor.
        state = self.state_dict()
        trainable = set(self.trainable_names())
        checkpoint["state_dict"] = {**{k: v for k, v in state.items() if k not in trainable},
                                    **checkpoint["state_dict"]}

    def check_compatible(self, identity: dict[str, Any], where: str) -> None:
        """Raise ValueError if a checkpoint's identity hyper-parameters differ from this model's."""
        for key in IDENTITY_HPARAMS:
            theirs, ours = identity.get(key), self.hparams.get(key)
            if key == "adapter" and theirs is not None:
                theirs, ours = AdapterConfig.from_dict(theirs), self.adapter_config
            if key == "backbone_kwargs":
                theirs, ours = theirs or {}, ours or {}
            if theirs != ours:
                raise ValueError(f"{where} was trained with {key}={theirs!r}, but this model has "
                                 f"{key}={ours!r}")

    def check_class_names(self, saved: Optional[list[str]], where: str) -> None:
        """Raise ValueError if the trainer's datamodule names its classes otherwise than the
        checkpoint: the head's outputs follow the order the model was trained on, so renamed or
        reordered classes would be scored and named wrongly without an error."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        current = getattr(datamodule, "class_names", None)
        if saved is None or current is None or list(saved) == list(current):
            return
        changed = [f"{i}: {a!r} -> {b!r}" for i, (a, b) in enumerate(zip(saved, current))
                   if a != b]
        changed += [f"{i}: {a!r} -> none" for i, a in enumerate(saved[len(current):],
                                                                 len(current))]
        changed += [f"{i}: none -> {b!r}" for i, b in enumerate(current[len(saved):], len(saved))]
        more = f" (+{len(changed) - 8} more)" if len(changed) > 8 else ""
        raise ValueError(f"{where} was trained on other classes than {type(datamodule).__name__} "
                         f"at {getattr(datamodule, 'root', '?')} names (index: checkpoint -> "
                         f"data): {'; '.join(changed[:8])}{more}. Evaluate on data with the "
                         "classes (folder names) the model was trained on")

    def describe(self) -> str:
        return f"{self.hparams.backbone} + {self.adapter_config}: {self.parameter_count()}"
