"""``ViTClassifier``: a timm ViT with an adapter, trained as a LightningModule.

Checkpoints are slim (the trainable tensors and what rebuilds the rest); what they hold and the
checks on loading them are in :mod:`wegeft_vision.training.checkpoint`.
"""
from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ..adapters import (AdapterConfig, WeGeFTConfig, apply_adapter, count_parameters,
                        frozen_fingerprint, trainable_parameter_names)
from ..adapters.model import ParameterCount
from ..errors import UserError
from . import checkpoint as slim_checkpoint
from .backbone import create_backbone
from .checkpoint import MODEL_PREFIX
from .optim import build_adamw, warmup_cosine
from .reproducible import EpochSeeds

PAPER_BACKBONE = "vit_base_patch16_224.augreg_in21k"


def compile_options(compile: bool, kwargs: Optional[dict[str, Any]]
                    ) -> Optional[dict[str, Any]]:
    """The ``torch.compile`` options for ``--model.compile`` (None: no compilation), checked."""
    if not compile:
        if kwargs:
            raise UserError("compile_kwargs given, but compile is off: add --model.compile true")
        return None
    known = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    unknown = sorted(set(kwargs or {}) - set(known))
    if unknown:
        raise UserError(f"compile_kwargs: {', '.join(unknown)} is not a torch.compile option "
                        f"(it takes {', '.join(known)})")
    return dict(kwargs or {})


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
        schedule_epochs: length of the warm-up/cosine schedule in epochs; None: the fit's own
            length. A fit stopped earlier (``trainer.max_epochs`` below it) trains the first
            epochs of the longer schedule, as the paper's hyper-parameter search does (the
            100-epoch schedule stopped after epoch 50), so its lr is still high at the end.
        compile: compile the backbone with ``torch.compile`` for training and evaluation, in
            place (``nn.Module.compile``: state-dict keys, checkpoints, resume and export are
            those of the uncompiled model). The first training step and the first evaluation
            step each pay the compilation (docs/performance.md).
        compile_kwargs: ``torch.compile`` options, e.g. ``{"mode": "max-autotune"}`` or
            ``{"backend": "aot_eager"}``.
        allow_other_preprocessing: evaluate or resume a checkpoint on data preprocessed
            otherwise (image size, crop, mean, std) than the run evaluated with, which is
            refused by default. Not a hyper-parameter: a checkpoint never carries it.
    """

    def __init__(self, backbone: str, num_classes: int,
                 adapter: AdapterConfig = WeGeFTConfig(),
                 pretrained: bool = True, weights_path: Optional[str] = None,
                 backbone_kwargs: Optional[dict[str, Any]] = None, drop_path_rate: float = 0.1,
                 label_smoothing: float = 0.0, lr: float = 1e-3, weight_decay: float = 1e-4,
                 warmup_epochs: float = 10.0, warmup_lr: float = 1e-7, min_lr: float = 1e-6,
                 init_seed: int = 0, schedule_epochs: Optional[int] = None,
                 compile: bool = False, compile_kwargs: Optional[dict[str, Any]] = None,
                 allow_other_preprocessing: bool = False) -> None:
        super().__init__()
        self._compile_options = compile_options(compile, compile_kwargs)
        self._compiled = False
        if weights_path is not None:
            weights_path = str(Path(weights_path).expanduser().resolve())
        self.adapter_config = AdapterConfig.from_dict(adapter)
        # save_hyperparameters reads the local variables: store the plain class_path form.
        adapter = self.adapter_config.to_dict()
        for name, value in (("lr", lr), ("warmup_lr", warmup_lr), ("min_lr", min_lr),
                            ("weight_decay", weight_decay), ("warmup_epochs", warmup_epochs),
                            ("drop_path_rate", drop_path_rate)):
            if not value >= 0:
                raise UserError(f"{name} must be >= 0, got {value}")
        if lr <= 0:
            raise UserError(f"lr must be positive, got {lr}")
        if warmup_epochs > 0 and not 0 < warmup_lr <= lr:
            raise UserError(f"warmup_lr must be in (0, lr={lr}] for a warm-up, got {warmup_lr}")
        if schedule_epochs is not None and (isinstance(schedule_epochs, bool)
                                            or not isinstance(schedule_epochs, int)
                                            or schedule_epochs <= 0):
            raise UserError(f"schedule_epochs must be a positive int or None, got "
                            f"{schedule_epochs!r}")
        if not 0 <= label_smoothing < 1:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters(ignore=["allow_other_preprocessing"])
        # Under LightningCLI, hparams are the parsed config: store the resolved path and the
        # registered adapter class, keep num_classes (a link target), and drop Lightning's
        # _instantiator, a module load_from_checkpoint would import (checkpoints name no code).
        self.hparams.pop("_instantiator", None)
        self.hparams.update(weights_path=weights_path, num_classes=num_classes, adapter=adapter)
        self.allow_other_preprocessing = allow_other_preprocessing
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
        self._frozen_fingerprint = frozen_fingerprint(self.model)
        self.checkpoint_info: Optional[dict[str, Any]] = None  # what on_load_checkpoint read

    def setup(self, stage: str) -> None:
        check_input_size(self, self.trainer.datamodule)

    def configure_model(self) -> None:
        # Lightning calls this for every fit, validate, test and predict: compile once.
        if self._compile_options is not None and not self._compiled:
            self.model.compile(**self._compile_options)
            self._compiled = True

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
        # Every process decides together: one raising alone would leave the others waiting.
        if not self.trainer.strategy.reduce_boolean_decision(bool(loss.isfinite()), all=True):
            raise UserError(f"the training loss became {loss.item()} at global step "
                            f"{self.global_step} (epoch {self.current_epoch}, batch {batch_idx}; "
                            f"counted from 0): training diverged. Lower --model.lr (now "
                            f"{self.hparams.lr}) or the warm-up's, or check the data")
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

    def configure_callbacks(self) -> list[L.Callback]:
        # Every fit, CLI or not: a resumed fit draws the rest of its dropout as uninterrupted.
        # Only a fit: it seeds training epochs, and a test on the fit's trainer (test_after_fit)
        # would replace the fit's copy, with a notice from Lightning each time.
        return [EpochSeeds()] if self.trainer.state.fn == TrainerFn.FITTING else []

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
            raise UserError("the warm-up/cosine schedule needs a finite number of training "
                             "steps: set trainer.max_epochs or trainer.max_steps, and train on a "
                             f"dataset with a length (got {batches} batches per epoch)")
        total_steps = int(total_steps)
        steps_per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
        if hp.get("schedule_epochs") is not None:
            if trainer.max_epochs is None or not 0 < trainer.max_epochs <= hp.schedule_epochs:
                raise UserError(f"schedule_epochs={hp.schedule_epochs} needs trainer.max_epochs "
                                f"between 1 and it (the fit stops within the schedule), got "
                                f"{trainer.max_epochs}")
            total_steps = hp.schedule_epochs * steps_per_epoch
        warmup_steps = min(total_steps, round(hp.warmup_epochs * steps_per_epoch))
        self.schedule = {"warmup_steps": warmup_steps, "total_steps": total_steps}
        saved = (self.checkpoint_info or {}).get("schedule")
        if trainer.ckpt_path and saved and saved != self.schedule:
            # The restored scheduler state would run the checkpoint's schedule past its end.
            raise UserError(f"checkpoint {trainer.ckpt_path} was trained with a schedule of "
                             f"{saved['total_steps']} steps ({saved['warmup_steps']} warm-up), "
                             f"this fit has {total_steps} ({warmup_steps} warm-up): resume with "
                             "the trainer.max_epochs / max_steps, batch size and data the run "
                             "started with, or start a new fit from its weights")
        scheduler = warmup_cosine(optimizer, warmup_lr=hp.warmup_lr, min_lr=hp.min_lr,
                                  warmup_steps=warmup_steps, total_steps=total_steps)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # Slim checkpoints (training/checkpoint.py).
    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], **overrides: Any) -> "ViTClassifier":
        """Rebuild a model from a checkpoint of this class, on the CPU, in eval mode.

        ``overrides`` replace stored hyper-parameters, e.g. ``weights_path`` when the backbone
        weights moved. Lightning's ``ViTClassifier.load_from_checkpoint(path, **overrides)`` works
        too; this one also rebuilds full fine-tuning checkpoints without the backbone weights.
        """
        return slim_checkpoint.load_module(cls, path, **overrides)

    def frozen_fingerprint(self) -> str:
        """Fingerprint of every tensor that does not train, as created (before any cast)."""
        return self._frozen_fingerprint

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        slim_checkpoint.slim(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any], where: Optional[str] = None) -> None:
        self.checkpoint_info = slim_checkpoint.restore(self, checkpoint, where)

    def describe(self) -> str:
        return f"{self.hparams.backbone} + {self.adapter_config}: {self.parameter_count()}"


def check_input_size(module: ViTClassifier, datamodule: Any) -> None:
    """Refuse data of another image size than the backbone takes, naming both settings (timm
    would stop at the first batch with a bare AssertionError)."""
    embed = getattr(module.model, "patch_embed", None)
    expected = getattr(embed, "img_size", None)
    config = slim_checkpoint.eval_data_config(datamodule)
    if (expected is None or config is None or getattr(embed, "dynamic_img_size", False)
            or not getattr(embed, "strict_img_size", True)):
        return
    given = tuple(config["input_size"][1:])
    if given != tuple(expected):
        kwargs = module.hparams.backbone_kwargs or {}
        source = (f"--model.backbone_kwargs img_size={kwargs['img_size']!r}"
                  if "img_size" in kwargs else f"the default of {module.hparams.backbone}")
        raise UserError(f"the data's image size {'x'.join(map(str, given))} "
                        f"({type(datamodule).__name__}, --data.init_args.image_size) differs from "
                        f"the backbone's input size {'x'.join(map(str, expected))} ({source}): "
                        "set them equal")
