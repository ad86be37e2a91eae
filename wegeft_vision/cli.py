"""The ``wegeft-vision`` command: Lightning's fit / validate / test / predict, plus ``export``.

Configs compose with repeated ``--config`` (later files win); see configs/ and README.md.
The number of classes flows from the datamodule to the model, the backbone name from the
model to the datamodule (for its timm normalisation).
"""
from __future__ import annotations

import copy
import inspect
import os
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from .data import ImageDataModule
from .training import PAPER_BACKBONE, ViTClassifier, check_model_name
from .training.module import CHECKPOINT_KEY, IDENTITY_HPARAMS
from .training.export import export_checkpoint
from .training.predictions import PredictionWriter
from .training.summary import RunSummary

DESCRIPTION = ("Fine-tune timm ViTs with WeGeFT and baselines. Subcommands: fit, validate, test, "
               "predict (Lightning), export (checkpoint -> merged plain-timm safetensors; "
               "see `wegeft-vision export --help`), and the paper's protocols: protocol, sweep, "
               "summarize (see `wegeft-vision protocol --help`).")


INT_OR_FRACTION_ARGS = ("limit_train_batches", "limit_val_batches", "limit_test_batches",
                        "limit_predict_batches", "overfit_batches", "val_check_interval")
# With --ckpt_path, a --model.* value (command line or config) that differs from the
# checkpoint's: paths and the frozen weights' source are honoured (the fingerprint check proves
# they give the same backbone); what fixes the trained model's shape is refused; training
# settings are refused for a resumed fit (the optimizer and schedule continue from the
# checkpoint) and honoured by test/validate/predict, where they change nothing.
HONOURED_OVERRIDES = ("weights_path", "checkpoint_path", "pretrained", "init_seed")
DEBUG_ENV = "WEGEFT_DEBUG"


def _int_first(hint: Any) -> Any:
    """``hint`` with int tried before float (jsonargparse tries a Union's types in order)."""
    args = typing.get_args(hint)
    return Union[tuple(sorted(args, key=lambda t: t is not int))] if int in args else hint


class WeGeFTCLI(LightningCLI):
    """LightningCLI with this project's links and defaults.

    Adds a ``checkpoint`` group (a ModelCheckpoint writing ``<log dir>/checkpoints/last.ckpt``
    after every epoch, so an interrupted fit resumes with ``--ckpt_path`` on it and loses at most
    one epoch) and ``--test_after_fit``.
    """

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """LightningCLI's own, with the Trainer's int-or-fraction arguments typed int-first.

        Lightning reads an int as a number of batches and a float as a fraction. The Trainer's
        hint Optional[Union[int, float]] comes from typing's cache, where it may already be
        Union[float, int, None] (equal, so shared) depending on what was imported first:
        "--trainer.limit_val_batches 1" would then mean 100%.
        """
        parser.add_class_arguments(self.trainer_class, "trainer", fail_untyped=False,
                                   instantiate=False, sub_configs=True,
                                   skip=set(INT_OR_FRACTION_ARGS))
        signature = inspect.signature(self.trainer_class.__init__).parameters
        for name in INT_OR_FRACTION_ARGS:
            parser.add_argument(f"--trainer.{name}", type=_int_first(signature[name].annotation),
                                default=signature[name].default,
                                help=f"Trainer({name}=...): an int counts batches, a float is a "
                                     "fraction")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items()
                             if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model",
                                        subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data",
                                        subclass_mode=self.subclass_mode_data)

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
        # Every subcommand's parser gets the same model arguments: what counts as "not given".
        self._model_defaults = parser.get_defaults().model

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI next replaces the model arguments with a --ckpt_path's hyper-parameters;
        # keep what the user gave, to honour or refuse it in before_instantiate_classes.
        subcommand = self.config.get("subcommand")
        self._given_model = copy.deepcopy(self.config[subcommand].model) if subcommand else None
        self._ckpt_hparams = None
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and str(ckpt_path) not in ("last", "best", "hpc"):
            self._ckpt_hparams = _read_checkpoint_hparams(Path(ckpt_path))

    def before_instantiate_classes(self) -> None:
        model = self.config[self.subcommand].model if self.subcommand else self.config.model
        if self._ckpt_hparams is not None:
            self._reconcile_with_checkpoint(model)
        # The datamodule is built first (num_classes flows from it) and reads the backbone's
        # timm config: name a bad backbone here, plainly, before either is built.
        check_model_name(model.backbone, needs_pretrained_tag=model.pretrained and not (
            model.weights_path or model.get("checkpoint_path")))

    def _reconcile_with_checkpoint(self, model: Any) -> None:
        """Apply the user's --model.* values over the checkpoint's where that is sound
        (HONOURED_OVERRIDES), and refuse the others with a message."""
        given, ckpt_path = self._given_model, self.config[self.subcommand].ckpt_path
        defaults = self._model_defaults
        refused = []
        for key in given.keys():
            value = given[key]
            if key == "num_classes" or value == model[key] or value == defaults.get(key) or (
                    key in ("weights_path", "checkpoint_path") and value is not None
                    and model[key] is not None
                    and Path(value).expanduser().resolve() == Path(model[key]).resolve()):
                continue
            if key in HONOURED_OVERRIDES or (key not in IDENTITY_HPARAMS
                                             and self.subcommand != "fit"):
                model[key] = value
                if key == "weights_path":  # the checkpoint may still hold the old name
                    model["checkpoint_path"] = None
                elif key == "checkpoint_path":
                    model["weights_path"] = None
            else:
                refused.append(f"--model.{key}={_show(value)} (checkpoint: {_show(model[key])})")
        if refused:
            reason = ("these fix the trained model's shape" if self.subcommand != "fit" else
                      "a resumed fit continues the checkpoint's model, optimizer and schedule; "
                      "start a new fit (without --ckpt_path) to change them")
            raise ValueError(f"checkpoint {ckpt_path} was trained with other settings than given "
                             f"(command line or config): {'; '.join(refused)}. {reason}; remove "
                             "or correct these values")

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


def _show(value: Any) -> str:
    return repr(value.as_dict() if hasattr(value, "as_dict") else value)


def _read_checkpoint_hparams(path: Path) -> dict[str, Any]:
    """A --ckpt_path's hyper-parameters, or an error naming the file and what is wrong with it."""
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file it cannot unpickle
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--ckpt_path {path} is not a checkpoint torch can read: "
                         f"{reason}") from err
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"--ckpt_path {path} was not written by wegeft-vision fit "
                         "(no wegeft_vision section)")
    return checkpoint.get("hyper_parameters", {})


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
    written = export_checkpoint(**cfg.as_dict())  # only the export's files, not the folder's
    print(f"wrote {', '.join(p.name for p in written)} to {written[0].parent}"
          + (f"; pushed to the hub as {cfg.push_to_hub}" if cfg.push_to_hub else ""), flush=True)


def cli_main(args: Optional[Union[list[str], dict[str, Any]]] = None, run: bool = True,
             cli_class: type[WeGeFTCLI] = WeGeFTCLI) -> Optional[WeGeFTCLI]:
    """Run the command line on ``args`` (default: ``sys.argv[1:]``).

    Returns the LightningCLI (``cli.trainer.callback_metrics`` holds the logged metrics), or
    None for ``export``. ``cli_class``: a subclass of WeGeFTCLI (the protocols build runs with
    their own, from settings rather than a command line).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if run and argv[:1] == ["export"]:
        _export_main(argv[1:])
        return None
    if run and argv[:1] in (["protocol"], ["sweep"], ["summarize"]):
        from .protocols import commands  # it builds runs with this module: loaded when used
        code = getattr(commands, f"{argv[0]}_command")(argv[1:])
        if code:
            sys.exit(code)
        return None
    cli = cli_class(
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


# What a user's input raises (a path, a name, a value); anything else is a bug worth a traceback.
USER_ERRORS = (ValueError, OSError, KeyError, TypeError)


def main() -> None:
    """Console script entry point: a user error prints one line naming the culprit and exits
    with status 2; WEGEFT_DEBUG=1 shows the full traceback instead."""
    try:
        cli_main()
    except Exception as err:
        cause = _root_cause(err)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0") or not isinstance(cause, USER_ERRORS):
            raise
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        print(f"wegeft-vision: error: {type(cause).__name__}: {message}\n"
              f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)


def _root_cause(err: BaseException) -> BaseException:
    """The error itself, not jsonargparse's wrappers around a class's own error (raised from
    it, with "Does not validate against any of the Union subtypes" and the whole config)."""
    while _raised_in(err, "jsonargparse"):
        inner = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if inner is None:
            break
        err = inner
    return err


def _raised_in(err: BaseException, package: str) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith(package)


if __name__ == "__main__":
    main()
