"""The ``wegeft-vision`` command: Lightning's fit / validate / test / predict, plus ``export``.

Configs compose with repeated ``--config`` (later files win); see configs/ and README.md.
The number of classes flows from the datamodule to the model, the backbone name from the
model to the datamodule (for its timm normalisation).
"""
from __future__ import annotations

import sys
from typing import Optional, Union

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from .data import ImageDataModule
from .training import PAPER_BACKBONE, ViTClassifier, check_model_name
from .training.export import export_checkpoint
from .training.predictions import PredictionWriter
from .training.summary import RunSummary

DESCRIPTION = ("Fine-tune timm ViTs with WeGeFT and baselines. Subcommands: fit, validate, test, "
               "predict (Lightning) and export (checkpoint -> merged plain-timm safetensors; "
               "see `wegeft-vision export --help`).")


INT_OR_FRACTION_ARGS = {f"trainer.{name}" for name in (
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
    "overfit_batches", "val_check_interval")}


class WeGeFTCLI(LightningCLI):
    """LightningCLI with this project's links and defaults.

    Adds a ``checkpoint`` group (a ModelCheckpoint writing ``<log dir>/checkpoints/last.ckpt``
    after every epoch, so an interrupted fit resumes with ``--ckpt_path`` on it and loses at most
    one epoch) and ``--test_after_fit``.
    """

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_core_arguments_to_parser(parser)
        # Lightning reads an int as a number of batches and a float as a fraction. The Trainer's
        # hint Optional[Union[int, float]] comes from typing's cache, where it may already be
        # Union[float, int, None] (equal, so shared) depending on what was imported first:
        # "--trainer.limit_val_batches 1" would then mean 100%. Spell the order out.
        int_first = Union[int, float, None]
        for action in parser._actions:
            if action.dest in INT_OR_FRACTION_ARGS:
                action._typehint = int_first

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.backbone", "data.init_args.backbone")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # One file, rewritten every epoch: Lightning only refreshes save_last's last.ckpt when a
        # monitored top-k file is saved, which would let a resume lose many epochs.
        parser.set_defaults({"model.backbone": PAPER_BACKBONE, "checkpoint.filename": "last",
                             "checkpoint.monitor": None, "checkpoint.save_top_k": 1})
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after fit, test the final weights (the VTAB-1k protocol "
                                 "reports the last epoch); other subcommands ignore it, so one "
                                 "config serves them all")

    def before_instantiate_classes(self) -> None:
        # The datamodule is built first (num_classes flows from it) and reads the backbone's
        # timm config: name a bad backbone here, plainly, before either is built.
        model = self.config[self.subcommand].model if self.subcommand else self.config.model
        check_model_name(model.backbone,
                         needs_pretrained_tag=model.pretrained and not model.checkpoint_path)

    def after_fit(self) -> None:
        if self.config.fit.test_after_fit:
            fit_metrics = dict(self.trainer.callback_metrics)
            self.trainer.test(self.model, datamodule=self.datamodule)
            # Testing resets callback_metrics; keep the fit's train/val values beside test's.
            for name, value in fit_metrics.items():
                self.trainer.callback_metrics.setdefault(name, value)
        self._report()

    def after_validate(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()

    def after_predict(self) -> None:
        writer = next(c for c in self.trainer.callbacks if isinstance(c, PredictionWriter))
        for path in writer.paths:
            print(f"predictions: {path}", flush=True)

    def _report(self) -> None:
        summary = next(c for c in self.trainer.callbacks if isinstance(c, RunSummary))
        text = summary.report(self.trainer, self.model)  # on every rank: log_dir is collective
        if self.trainer.is_global_zero:
            print(text, flush=True)


def _export_main(args: list[str]) -> None:
    parser = ArgumentParser(prog="wegeft-vision export",
                            description="Merge a checkpoint's adapter into its backbone and write "
                                        "a plain timm model (model.safetensors, config.json with "
                                        "the run's preprocessing, a model card README.md), "
                                        "optionally model.onnx, optionally pushed to the hub.")
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_function_arguments(export_checkpoint)
    cfg = parser.parse_args(args)
    cfg.pop("config", None)
    weights = export_checkpoint(**cfg.as_dict())
    print(f"wrote {', '.join(sorted(p.name for p in weights.parent.iterdir()))} to "
          f"{weights.parent}" + (f"; pushed to the hub as {cfg.push_to_hub}"
                                 if cfg.push_to_hub else ""), flush=True)


def cli_main(args: Optional[list[str]] = None, run: bool = True) -> Optional[WeGeFTCLI]:
    """Run the command line on ``args`` (default: ``sys.argv[1:]``).

    Returns the LightningCLI (``cli.trainer.callback_metrics`` holds the logged metrics), or
    None for ``export``.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if run and argv[:1] == ["export"]:
        _export_main(argv[1:])
        return None
    cli = WeGeFTCLI(
        ViTClassifier, ImageDataModule, subclass_mode_data=True, args=args, run=run,
        trainer_defaults={"max_epochs": 100, "log_every_n_steps": 10,
                          "logger": lazy_instance(CSVLogger, save_dir="runs"),
                          "callbacks": [RunSummary(), PredictionWriter()]},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
    )
    _close_process_group()
    return cli


def _close_process_group() -> None:
    """End a multi-process run on all ranks together. Left to interpreter exit, a rank whose
    peer has already gone can abort in gloo's teardown ("terminate called without an active
    exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main() -> None:
    """Console script entry point."""
    cli_main()


if __name__ == "__main__":
    main()
