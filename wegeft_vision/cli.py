"""The ``wegeft-vision`` command: Lightning's fit / validate / test / predict, plus ``export``,
``protocol``, ``sweep`` and ``summarize``.

Configs compose with repeated ``--config`` (later files win); see configs/ and README.md.
The number of classes flows from the datamodule to the model, the backbone name from the
model to the datamodule (for its timm normalisation). The checks of a checkpoint against the
model and data it is used with are the model's, on loading (training/checkpoint.py).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional, Union

import lightning as L
import torch
from jsonargparse import (ActionConfigFile, ArgumentParser, Namespace, lazy_instance,
                          set_parsing_settings)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from .adapters import AdapterConfig
from .data import ImageDataModule
from .errors import UserError
from .training import PAPER_BACKBONE, ViTClassifier, check_model_name
from .training.checkpoint import (CHECKPOINT_KEY, SPECIAL_CKPT_PATHS, SaveRunConfig,
                                  check_identity, read_checkpoint, stored_hparams)
from .training.export import export_checkpoint
from .training.predictions import PredictionWriter
from .training.summary import RunSummary

DESCRIPTION = ("Fine-tune timm ViTs with WeGeFT and baselines. Subcommands: fit, validate, test, "
               "predict (Lightning); export (checkpoint -> merged plain-timm safetensors); "
               "protocol, sweep, summarize (the benchmark protocols); each has its --help.")
DEBUG_ENV = "WEGEFT_DEBUG"
# Lightning reads an int as a number of batches and a float as a fraction, and jsonargparse
# tries a Union's types in order. Written flat: typing caches Optional[Union[int, float]] by
# equality, so Trainer's own hint may be an equal Union[float, int, None] built first elsewhere,
# and "--trainer.limit_val_batches 1" would then mean 100%.
IntOrFraction = Union[int, float, None]


class Trainer(L.Trainer):
    """Lightning's Trainer, its int-or-fraction arguments typed int-first for the parser."""

    def __init__(self, *, limit_train_batches: IntOrFraction = None,
                 limit_val_batches: IntOrFraction = None,
                 limit_test_batches: IntOrFraction = None,
                 limit_predict_batches: IntOrFraction = None,
                 overfit_batches: Union[int, float] = 0.0,
                 val_check_interval: IntOrFraction = None, **kwargs: Any) -> None:
        super().__init__(limit_train_batches=limit_train_batches,
                         limit_val_batches=limit_val_batches,
                         limit_test_batches=limit_test_batches,
                         limit_predict_batches=limit_predict_batches,
                         overfit_batches=overfit_batches, val_check_interval=val_check_interval,
                         **kwargs)


class WeGeFTCLI(LightningCLI):
    """LightningCLI with this project's links and defaults.

    Adds a ``checkpoint`` group (a ModelCheckpoint writing ``<log dir>/checkpoints/last.ckpt``
    after every epoch, so an interrupted fit resumes with ``--ckpt_path`` on it and loses at most
    one epoch) and ``--test_after_fit``. With ``--ckpt_path``, the checkpoint's hyper-parameters
    are the defaults of ``--model.*``: what a config or the command line gives wins.
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # jsonargparse parses a dataclass as a fixed group of fields; subclasses of
        # AdapterConfig let configs choose the method (class_path: wegeft_vision.LoRAConfig).
        set_parsing_settings(subclasses_enabled=[AdapterConfig])
        return super().init_parser(**kwargs)

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

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._args = args
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """The --ckpt_path's hyper-parameters as the defaults of --model.*, under what was given
        (Lightning's own puts them over it). The model refuses, on loading, what must agree;
        the settings that fix its shape are checked here already, before building a model that
        could not load the checkpoint (or its backbone weights)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is None or str(ckpt_path) in SPECIAL_CKPT_PATHS:
            return
        checkpoint = read_checkpoint(ckpt_path)
        hparams = stored_hparams(checkpoint)
        hparams.pop("num_classes", None)  # the data's, linked
        parser = self._subcommand_parsers[subcommand]
        unknown = sorted(k for k in hparams if f"model.{k}" not in parser.get_defaults())
        if unknown:
            raise UserError(f"checkpoint {ckpt_path} has model settings this version does not "
                            f"know: {', '.join(unknown)}")
        parser.set_defaults({f"model.{k}": v for k, v in hparams.items()})
        super().parse_arguments(self.parser, self._args)
        settings = self.config[subcommand].model.as_dict()
        settings.pop("num_classes", None)
        check_identity(checkpoint[CHECKPOINT_KEY]["identity"], settings, f"checkpoint {ckpt_path}")

    def before_instantiate_classes(self) -> None:
        model = self.config[self.subcommand].model if self.subcommand else self.config.model
        # The datamodule is built first (num_classes flows from it) and reads the backbone's
        # timm config: name a bad backbone here, plainly, before either is built.
        check_model_name(model.backbone,
                         needs_pretrained_tag=model.pretrained and not model.weights_path)

    def before_fit(self) -> None:
        # A test after the fit reads the test split: check its files before training, not after.
        if self.config.fit.test_after_fit and hasattr(self.datamodule, "expect_stages"):
            self.datamodule.expect_stages("test")

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


def export_command(argv: list[str]) -> None:
    """``wegeft-vision export``: its arguments are export_checkpoint's, declared there."""
    parser = ArgumentParser(prog="wegeft-vision export",
                            description="Merge a checkpoint's adapter into its backbone and write "
                                        "a plain timm model (model.safetensors, config.json with "
                                        "the run's preprocessing, a model card README.md), "
                                        "optionally model.onnx, optionally pushed to the hub.")
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_function_arguments(export_checkpoint)
    cfg = parser.parse_args(argv)
    cfg.pop("config", None)
    written = export_checkpoint(**cfg.as_dict())
    # Only the export's own files: the folder may hold the user's others.
    print(f"wrote {', '.join(p.name for p in written)} to {written[0].parent}"
          + (f"; pushed to the hub as {cfg.push_to_hub}" if cfg.push_to_hub else ""), flush=True)


def _protocol_command(name: str) -> Callable[[list[str]], Any]:
    def command(argv: list[str]) -> Any:
        from .protocols import commands  # the protocols import the training CLI: not at import
        return getattr(commands, f"{name}_command")(argv)
    return command


# Subcommands that are not Lightning's: the first word of the command line picks one.
COMMANDS: dict[str, Callable[[list[str]], Any]] = {
    "export": export_command, **{name: _protocol_command(name)
                                 for name in ("protocol", "sweep", "summarize")}}


def cli_main(args: Optional[Union[list[str], dict[str, Any], Namespace]] = None,
             run: bool = True, cli_class: type[WeGeFTCLI] = WeGeFTCLI) -> Optional[WeGeFTCLI]:
    """Run the command line on ``args`` (default: ``sys.argv[1:]``; a dict of settings works
    too, as for LightningCLI).

    Returns the LightningCLI (``cli.trainer.callback_metrics`` holds the logged metrics), or
    None for ``export``, ``protocol``, ``sweep`` and ``summarize``. ``cli_class``: a subclass
    of WeGeFTCLI.
    """
    argv = sys.argv[1:] if args is None else args
    if run and isinstance(argv, list) and argv[:1] and argv[0] in COMMANDS:
        code = COMMANDS[argv[0]](list(argv[1:]))
        if code:
            sys.exit(code)
        return None
    cli = cli_class(
        ViTClassifier, ImageDataModule, subclass_mode_data=True, args=args, run=run,
        trainer_class=Trainer,
        trainer_defaults={"max_epochs": 100, "log_every_n_steps": 10,
                          "logger": lazy_instance(CSVLogger, save_dir="runs"),
                          "callbacks": [RunSummary(), PredictionWriter()]},
        save_config_callback=SaveRunConfig,
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
    """Console script entry point: a user error (wegeft_vision.errors) prints one line naming
    the culprit and exits with status 2; WEGEFT_DEBUG=1 shows the full traceback instead."""
    try:
        cli_main()
    except Exception as err:
        cause = _user_error(err)
        if cause is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        print(f"wegeft-vision: error: {type(cause).__name__}: {message}\n"
              f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)


def _user_error(err: Optional[BaseException]) -> Optional[UserError]:
    """The UserError ``err`` is or was raised from (jsonargparse re-raises a class's own error
    from it, with the whole config in its message); None for anything else, a bug."""
    while err is not None and not isinstance(err, UserError):
        err = err.__cause__
    return err


if __name__ == "__main__":
    main()
