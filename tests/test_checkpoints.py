"""Checkpoints that can be used again: in every precision Lightning runs on the CPU, through
Lightning's own load_from_checkpoint, only on data with the classes they were trained on, and
with a summary that counts epochs as the trainer does after a resume."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.helpers.training import (class_image, make_backbone_file, make_toy_task, tiny_model,
                                    toy_data, trainer)
from wegeft_vision.adapters import LoRAConfig, frozen_fingerprint
from wegeft_vision.data import ImageFolderDataModule, VTAB1kDataModule
from wegeft_vision.errors import UserError
from wegeft_vision.training import ViTClassifier
from wegeft_vision.training.export import export_checkpoint
from wegeft_vision.training.summary import RunSummary

# Every precision plugin Lightning accepts with accelerator="cpu" ("16-mixed" falls back to
# "bf16-mixed" there; "transformer-engine" needs a GPU package).
CPU_PRECISIONS = ["32-true", "64-true", "16-true", "bf16-true", "bf16-mixed"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    make_toy_task(root / "data")
    return {"data": root / "data", "weights": make_backbone_file(root / "backbone.safetensors")}


class Crash(Callback):
    """Fails as epoch ``at`` starts, after the previous epoch's checkpoint was written."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.at:
            raise RuntimeError("simulated crash")


def fitted(files: dict[str, Path], folder: Path, epochs: int = 1, **kwargs) -> Path:
    L.seed_everything(0)
    trainer(folder, epochs, **kwargs).fit(tiny_model(files["weights"]), datamodule=toy_data(files))
    return folder / "last.ckpt"


def crashed(files: dict[str, Path], folder: Path, epochs: int, at: int, **kwargs) -> Path:
    """The checkpoint of a fit for ``epochs`` that stopped as epoch ``at`` began."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        fitted(files, folder, epochs, callbacks=(Crash(at),), **kwargs)
    return folder / "last.ckpt"


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_checkpoint_of_any_precision_tests_exports_and_resumes(files: dict[str, Path],
                                                               tmp_path: Path,
                                                               precision: str) -> None:
    ckpt = crashed(files, tmp_path / "fit", epochs=2, at=1, precision=precision)
    # The fingerprint is of the weights as loaded, whatever the run cast them to.
    loaded = tiny_model(files["weights"])
    frozen = {k: v for k, v in loaded.state_dict().items()
              if k.startswith("model.") and k not in set(loaded.trainable_names())}
    assert all(v.dtype == torch.float32 for v in frozen.values())
    stored = torch.load(ckpt, weights_only=True)["wegeft_vision"]["frozen_fingerprint"]
    assert stored == frozen_fingerprint(loaded.model)

    tester = trainer(tmp_path / "test", 1, precision=precision)
    tester.test(tiny_model(files["weights"]), datamodule=toy_data(files), ckpt_path=ckpt)
    assert 0 <= float(tester.callback_metrics["test/acc"]) <= 1

    resumed = trainer(tmp_path / "resume", 2, precision=precision)
    if precision == "16-true":
        # AdamW's eps (1e-8) is 0 in float16: the adapter diverges at the first step, export
        # refuses non-finite weights rather than writing them, and the resumed fit stops at
        # its first step, the second of the run.
        with pytest.raises(ValueError, match="non-finite weights; the adapter has diverged"):
            export_checkpoint(ckpt, tmp_path / "export")
        with pytest.raises(UserError, match=r"the training loss became nan at global step 1 "
                                            r"\(epoch 1, batch 0; counted from 0\)"):
            resumed.fit(tiny_model(files["weights"]), datamodule=toy_data(files), ckpt_path=ckpt)
        return
    assert export_checkpoint(ckpt, tmp_path / "export")[0].is_file()
    resumed.fit(tiny_model(files["weights"]), datamodule=toy_data(files), ckpt_path=ckpt)
    assert resumed.current_epoch == 2 and resumed.global_step == 2


# Lightning's load_from_checkpoint and the weights_path rename.
def test_lightning_load_from_checkpoint_takes_a_moved_weights_path(files: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    weights = tmp_path / "backbone.safetensors"
    shutil.copy(files["weights"], weights)
    trained = tiny_model(weights)
    trainer(tmp_path, 1).fit(trained, datamodule=toy_data(files))
    ckpt = tmp_path / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["weights_path"] == str(weights)

    moved = tmp_path / "moved" / "backbone.safetensors"
    moved.parent.mkdir()
    weights.rename(moved)
    with pytest.raises(FileNotFoundError, match=r"weights_path .*backbone.safetensors does not"):
        ViTClassifier.load_from_checkpoint(ckpt)
    model = ViTClassifier.load_from_checkpoint(ckpt, weights_path=str(moved))
    assert model.hparams.weights_path == str(moved)
    reference = trained.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_weights_path_is_stored_absolute(files: dict[str, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(files["weights"].parent)
    model = tiny_model("backbone.safetensors")
    assert model.hparams.weights_path == str(files["weights"].resolve())


def test_loading_needs_no_parsing_settings_and_importing_sets_none(files: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """Importing the library changes no process-wide jsonargparse setting, and Lightning's
    load_from_checkpoint rebuilds a non-default adapter from its class_path form without them."""
    L.seed_everything(0)
    trained = tiny_model(files["weights"], adapter=LoRAConfig(rank=2))
    trainer(tmp_path, 1).fit(trained, datamodule=toy_data(files))
    torch.save(trained.state_dict(), tmp_path / "reference.pt")
    script = textwrap.dedent(f"""
        import torch
        from jsonargparse import ArgumentParser
        from wegeft_vision.training import ViTClassifier
        from wegeft_vision.adapters import AdapterConfig
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--adapter", type=AdapterConfig)
        try:  # a class_path for a dataclass parses only with subclasses enabled for it
            parser.parse_args(['--adapter={{"class_path": "wegeft_vision.LoRAConfig"}}'])
            print("import enabled subclasses of AdapterConfig")
        except Exception:
            pass
        model = ViTClassifier.load_from_checkpoint({str(tmp_path / "last.ckpt")!r})
        assert type(model.adapter_config).__name__ == "LoRAConfig"
        assert model.adapter_config.rank == 2
        reference = torch.load({str(tmp_path / "reference.pt")!r})
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert result.stdout.strip() == "ok", result.stderr[-3000:]


# Class names.
def image_folder(root: Path, classes: list[str]) -> Path:
    """``root/{train,val,test}/<class>/`` with the toy task's images of class 0, 1, 2, ..."""
    for split, per_class in (("train", 3), ("val", 1), ("test", 2)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                class_image(label, 10 * index + len(split)).save(folder / f"{index}.png")
    return root


def folder_data(root: Path) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(root), augment=False, batch_size=6, num_workers=0,
                                 image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.mark.parametrize("stage", ["test", "validate", "predict", "fit"])
def test_renamed_classes_are_refused(files: dict[str, Path], tmp_path: Path, stage: str) -> None:
    trained_on = image_folder(tmp_path / "data", ["cat", "dog", "eel"])
    L.seed_everything(0)
    trainer(tmp_path / "fit", 1).fit(tiny_model(files["weights"], num_classes=3),
                                     datamodule=folder_data(trained_on))
    ckpt = tmp_path / "fit" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["wegeft_vision"]["class_names"] == [
        "cat", "dog", "eel"]
    # Renaming "cat" to "fox" gives the same images a new sorted order: dog, eel, fox.
    renamed = image_folder(tmp_path / "renamed", ["fox", "dog", "eel"])
    run = trainer(tmp_path / stage, 2)
    action = getattr(run, stage)
    with pytest.raises(ValueError, match=r"last.ckpt was trained on other classes than "
                                         r"ImageFolderDataModule at .*renamed names \(index: "
                                         r"checkpoint -> data\): 0: 'cat' -> 'dog'; "
                                         r"1: 'dog' -> 'eel'; 2: 'eel' -> 'fox'\."):
        action(tiny_model(files["weights"], num_classes=3), datamodule=folder_data(renamed),
               ckpt_path=ckpt)
    assert not any(k.startswith(("test/", "val/")) for k in run.callback_metrics)
    if stage == "test":  # the data it was trained on still tests
        run = trainer(tmp_path / "same", 1)
        run.test(tiny_model(files["weights"], num_classes=3),
                 datamodule=folder_data(trained_on), ckpt_path=ckpt)
        assert "test/acc" in run.callback_metrics


# Preprocessing.
@pytest.mark.parametrize("stage", ["test", "validate", "predict", "fit"])
def test_other_preprocessing_is_refused_unless_allowed(files: dict[str, Path], tmp_path: Path,
                                                       stage: str) -> None:
    ckpt = crashed(files, tmp_path / "fit", epochs=2, at=1)
    assert torch.load(ckpt, weights_only=True)["wegeft_vision"]["data_config"] == \
        toy_data(files).eval_data_config()
    other = VTAB1kDataModule(str(files["data"]), "toy", split="train800", num_classes=6,
                             batch_size=12, num_workers=0, image_size=32, mean=(0.0,) * 3,
                             std=(1.0,) * 3)
    run = trainer(tmp_path / stage, 2)
    with pytest.raises(UserError, match=r"last.ckpt was evaluated with other preprocessing than "
                                        r"VTAB1kDataModule gives \(checkpoint -> data\): mean "
                                        r"\[0.5, 0.5, 0.5\] -> \[0.0, 0.0, 0.0\]; std \[0.5, "
                                        r"0.5, 0.5\] -> \[1.0, 1.0, 1.0\]\. .*"
                                        r"--model.allow_other_preprocessing true"):
        getattr(run, stage)(tiny_model(files["weights"]), datamodule=other, ckpt_path=ckpt)
    assert not any(k.startswith(("test/", "val/")) for k in run.callback_metrics)
    run = trainer(tmp_path / f"{stage}_allowed", 2)
    getattr(run, stage)(tiny_model(files["weights"], allow_other_preprocessing=True),
                        datamodule=other, ckpt_path=ckpt)
    assert run.state.finished


def test_resume_with_another_schedule_length_is_refused(files: dict[str, Path],
                                                        tmp_path: Path) -> None:
    ckpt = crashed(files, tmp_path / "fit", epochs=3, at=1)
    run = trainer(tmp_path / "resume", 5)
    with pytest.raises(ValueError, match=r"last.ckpt was trained with a schedule of 3 steps "
                                         r"\(1 warm-up\), this fit has 5 \(1 warm-up\): "
                                         r"resume with the trainer.max_epochs"):
        run.fit(tiny_model(files["weights"]), datamodule=toy_data(files), ckpt_path=ckpt)


# The summary after a resume.
class ValAccuracies(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen.append((trainer.current_epoch, float(trainer.callback_metrics["val/acc"])))


def test_summary_after_resume_counts_epochs_of_the_whole_fit(files: dict[str, Path],
                                                             tmp_path: Path) -> None:
    recorder = ValAccuracies()
    L.seed_everything(0)
    first = trainer(tmp_path, 4, callbacks=(RunSummary(), recorder, Crash(2)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.fit(tiny_model(files["weights"], lr=0.05), datamodule=toy_data(files, batch_size=4))
    summary = RunSummary()
    second = trainer(tmp_path, 4, callbacks=(summary, recorder))
    model = tiny_model(files["weights"], lr=0.05)
    second.fit(model, datamodule=toy_data(files, batch_size=4), ckpt_path=tmp_path / "last.ckpt")
    assert [epoch for epoch, _ in recorder.seen] == [0, 1, 2, 3]
    best = max(range(4), key=lambda i: recorder.seen[i][1])
    line = next(x for x in summary.report(second, model).splitlines() if x.startswith("val acc"))
    assert line == (f"val acc:      best {recorder.seen[best][1]:.4f} (epoch {best + 1} of 4), "
                    f"last {recorder.seen[3][1]:.4f} (epoch 4 of 4)")
