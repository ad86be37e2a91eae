"""Slim checkpoints: what a ``ViTClassifier`` checkpoint holds, and the checks that it fits the
model, the data and the settings it is loaded with.

A checkpoint holds the trainable tensors (adapter and head) and what rebuilds the rest: the
hyper-parameters name the backbone and its weights, and the fingerprint of the frozen weights
(:func:`wegeft_vision.adapters.frozen_fingerprint`) proves on loading that the re-created
backbone is the one the adapter was trained on. Its ``wegeft_vision`` section also records the
class names and the evaluation preprocessing, which evaluating or resuming on other data must
match. Every refusal is a :class:`~wegeft_vision.errors.UserError` naming the checkpoint and the
setting.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn

from ..adapters import AdapterConfig, FullFinetuneConfig
from ..errors import MissingFileError, RunFolderInUseError, UserError

if TYPE_CHECKING:
    import lightning as L

    from .module import ViTClassifier

CHECKPOINT_KEY = "wegeft_vision"
CHECKPOINT_FORMAT = "wegeft_vision.checkpoint/1"
MODEL_PREFIX = "model."
# Hyper-parameters that fix the trained model's shape: they must agree wherever it is loaded.
IDENTITY_HPARAMS: tuple[str, ...] = ("backbone", "num_classes", "backbone_kwargs", "adapter")
# Where the frozen weights come from: free to differ (a moved file, a cached download), since
# the fingerprint check proves the backbone is the same. Every other hyper-parameter is a
# training setting, which a resumed fit must keep (its optimizer and schedule continue).
SOURCE_HPARAMS: tuple[str, ...] = ("weights_path", "pretrained", "init_seed")
# Lightning's checkpoint paths that name no file yet.
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def read_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """A checkpoint written by this library, loaded without running code (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file it cannot unpickle
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {path} is not a file torch can read: {reason}") from err
    info = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} was not written by wegeft_vision's ViTClassifier "
                        f"(no {CHECKPOINT_FORMAT} section)")
    return checkpoint


def stored_hparams(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The model's hyper-parameters as stored (keys starting with "_" are Lightning's)."""
    return {k: v for k, v in checkpoint.get("hyper_parameters", {}).items()
            if not k.startswith("_")}


def load_module(cls: type["ViTClassifier"], path: Union[str, Path],
                **overrides: Any) -> "ViTClassifier":
    """Rebuild a model from a checkpoint of ``cls``, on the CPU, in eval mode (see
    ``ViTClassifier.from_checkpoint``)."""
    checkpoint = read_checkpoint(path)
    hparams = stored_hparams(checkpoint)
    if isinstance(AdapterConfig.from_dict(hparams["adapter"]), FullFinetuneConfig):
        # Every tensor is in the checkpoint: no need to fetch the pretrained weights.
        hparams.update(pretrained=False, weights_path=None)
    model = cls(**{**hparams, **overrides})
    model.on_load_checkpoint(checkpoint, where=f"checkpoint {path}")
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


# Saving.
def slim(module: "ViTClassifier", checkpoint: dict[str, Any]) -> None:
    """Keep only the trainable tensors in ``checkpoint`` and record what the checks need."""
    trainable = set(module.trainable_names())
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                if k in trainable}
    datamodule = module.trainer.datamodule if module._trainer is not None else None
    checkpoint[CHECKPOINT_KEY] = {
        "format": CHECKPOINT_FORMAT,
        # Kept apart from hyper_parameters, which load_from_checkpoint(**overrides) edits.
        "identity": {key: module.hparams[key] for key in IDENTITY_HPARAMS},
        "frozen_fingerprint": module.frozen_fingerprint(),
        "class_names": getattr(datamodule, "class_names", None),
        "data_config": eval_data_config(datamodule),
        "schedule": getattr(module, "schedule", None),
    }


# Loading.
def restore(module: "ViTClassifier", checkpoint: dict[str, Any],
            where: Optional[str] = None) -> dict[str, Any]:
    """Check ``checkpoint`` against ``module`` (its settings, frozen weights and the trainer's
    data), then complete its state dict with the frozen tensors; returns its wegeft_vision
    section."""
    trainer = module._trainer
    if where is None:
        where = f"checkpoint {trainer.ckpt_path}" if trainer and trainer.ckpt_path else \
            "the checkpoint"
    info = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{where} was not written by wegeft_vision's ViTClassifier")
    check_identity(info["identity"], {**module.hparams, "adapter": module.adapter_config}, where)
    if info["frozen_fingerprint"] != module.frozen_fingerprint():
        hp = module.hparams
        source = hp.weights_path or ("timm's pretrained weights" if hp.pretrained else
                                        f"a random init with init_seed={hp.init_seed}")
        raise UserError(f"{where} was trained on other frozen weights than this model's "
                        f"{hp.backbone} from {source}; load it with the backbone weights it "
                        "was trained on")
    datamodule = trainer.datamodule if trainer is not None else None
    if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
        check_resume_settings(stored_hparams(checkpoint), module, where)
    check_class_names(info.get("class_names"), datamodule, where)
    if not module.allow_other_preprocessing:
        check_preprocessing(info.get("data_config"), datamodule, where)
    # The frozen tensors come from the re-created backbone; strict loading still checks that
    # the checkpoint holds every trainable tensor.
    trainable = set(module.trainable_names())
    checkpoint["state_dict"] = {**{k: v for k, v in module.state_dict().items()
                                   if k not in trainable}, **checkpoint["state_dict"]}
    return info


def check_identity(identity: dict[str, Any], hparams: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose shape-fixing hyper-parameters differ from a model's (those of
    them in ``hparams``: the command line checks its settings before building the model)."""
    for key in IDENTITY_HPARAMS:
        if key not in hparams:
            continue
        theirs, ours = identity.get(key), hparams[key]
        if key == "adapter" and theirs is not None:
            theirs, ours = AdapterConfig.from_dict(theirs), AdapterConfig.from_dict(ours)
        if key == "backbone_kwargs":
            theirs, ours = theirs or {}, ours or {}
        if theirs != ours:
            raise UserError(f"{where} was trained with {key}={theirs!r}, but this model has "
                            f"{key}={ours!r}")


def check_resume_settings(stored: dict[str, Any], module: "ViTClassifier", where: str) -> None:
    """Refuse a resumed fit whose training settings differ from the checkpoint's."""
    changed = [f"{key}={module.hparams[key]!r} (checkpoint: {value!r})"
               for key, value in stored.items()
               if key not in IDENTITY_HPARAMS + SOURCE_HPARAMS and key in module.hparams
               and module.hparams[key] != value]
    if changed:
        raise UserError(f"{where} was trained with other settings than this fit's: "
                        f"{'; '.join(changed)}. A resumed fit continues the checkpoint's model, "
                        "optimizer and schedule: resume with its settings, or start a new fit "
                        "(without --ckpt_path) to change them")


def check_class_names(saved: Optional[list[str]], datamodule: Any, where: str) -> None:
    """Refuse data that names its classes otherwise than the checkpoint: the head's outputs
    follow the order the model was trained on, so renamed or reordered classes would be scored
    and named wrongly without an error."""
    current = getattr(datamodule, "class_names", None)
    if saved is None or current is None or list(saved) == list(current):
        return
    changed = [f"{i}: {a!r} -> {b!r}" for i, (a, b) in enumerate(zip(saved, current)) if a != b]
    changed += [f"{i}: {a!r} -> none" for i, a in enumerate(saved[len(current):], len(current))]
    changed += [f"{i}: none -> {b!r}" for i, b in enumerate(current[len(saved):], len(saved))]
    more = f" (+{len(changed) - 8} more)" if len(changed) > 8 else ""
    raise UserError(f"{where} was trained on other classes than {type(datamodule).__name__} at "
                    f"{getattr(datamodule, 'root', '?')} names (index: checkpoint -> data): "
                    f"{'; '.join(changed[:8])}{more}. Evaluate on data with the classes "
                    "(folder names) the model was trained on")


def check_preprocessing(saved: Optional[dict[str, Any]], datamodule: Any, where: str) -> None:
    """Refuse data preprocessed otherwise (size, crop, interpolation, mean, std) than the run
    evaluated with: the model would score other inputs than it learnt on, silently worse."""
    current = eval_data_config(datamodule)
    if saved is None or current is None:
        return
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    changed = [f"{key} {saved.get(key)!r} -> {current.get(key)!r}"
               for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if changed:
        raise UserError(f"{where} was evaluated with other preprocessing than "
                        f"{type(datamodule).__name__} gives (checkpoint -> data): "
                        f"{'; '.join(changed)}. Use the run's --data.init_args settings "
                        "(image_size, mean, std, ...), or pass --model.allow_other_preprocessing "
                        "true to use this preprocessing on purpose")


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


# Run folders.
class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's config.yaml writer for a run folder that belongs to one run.

    A fit into a folder that already holds a run (its config.yaml or a checkpoint) is refused
    with RunFolderInUseError, unless it resumes a checkpoint of that folder; an earlier run's
    config.yaml is never rewritten (a resumed fit keeps its run's, and an evaluation into a
    folder that has one writes none), so ``export`` always ships the command that trained the
    checkpoint. A fit is checked at its start, once Lightning knows the checkpoint it resumes
    (after setup) and before anything is written into the folder (hparams.yaml, checkpoints).
    """

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            self._save_once(trainer, pl_module, stage)

    def on_fit_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._save_once(trainer, pl_module, "fit")

    def _save_once(self, trainer: "L.Trainer", pl_module: "L.LightningModule",
                   stage: str) -> None:
        if self.already_saved:
            return
        log_dir = Path(trainer.log_dir)  # collective: every rank calls it
        config = log_dir / self.config_filename
        used = None
        if trainer.is_global_zero and stage == "fit":
            used = self._other_run(trainer, config, trainer.ckpt_path or self.config.get(
                "ckpt_path"))
        used = trainer.strategy.broadcast(used)
        if used:
            raise RunFolderInUseError(
                f"run folder {log_dir} already holds another run ({used}): a new fit would mix "
                "its files with that run's. Give this run its own folder (another "
                "--trainer.default_root_dir, or a logger name/version), or resume that run with "
                "--ckpt_path on its checkpoint")
        if trainer.is_global_zero:
            if not config.exists():
                log_dir.mkdir(parents=True, exist_ok=True)
                self.parser.save(self.config, str(config), skip_none=False,
                                 multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)

    @staticmethod
    def _other_run(trainer: "L.Trainer", config: Path, ckpt_path: Any) -> Optional[str]:
        """What shows that another run used the folder; None if free or resumed."""
        # A ModelCheckpoint without a dirpath writes into <log dir>/checkpoints.
        folders = {config.parent, *(Path(c.dirpath or config.parent / "checkpoints")
                                    for c in trainer.checkpoint_callbacks)}
        resumed = Path(ckpt_path).resolve() if ckpt_path else None
        if resumed is not None and any(f.resolve() in resumed.parents for f in folders):
            return None  # the run continues in its own folder
        found = [config] if config.exists() else []
        found += sorted(p for f in folders if f.is_dir() for p in f.glob("*.ckpt"))
        return ", ".join(str(p) for p in found[:3]) or None
