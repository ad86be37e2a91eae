"""A fit stopped after an epoch and resumed from that epoch's checkpoint ends with the weights
of the uninterrupted fit: same order, same augmentation, same dropout."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.helpers.data import make_image_folder
from tests.helpers.models import vit_kwargs
from wegeft_vision import WeGeFTConfig
from wegeft_vision.data import ImageFolderDataModule
from wegeft_vision.training import ViTClassifier
from wegeft_vision.training.reproducible import EpochSeeds, SeededSamples, SeededShuffle, run_seed

TINY = vit_kwargs("narrow", proj_drop_rate=0.2)  # dropout, besides the drop path below
EPOCHS, STOP_AFTER = 3, 2


class StopAfter(Callback):
    """Stops the fit at the end of epoch ``epochs - 1``: the checkpoint callback, which runs
    after the others, still writes that epoch's last.ckpt."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epochs - 1:
            trainer.should_stop = True


def fit(data: Path, folder: Path, num_workers: int, stop_after=None, ckpt_path=None,
        **trainer_args) -> tuple[ViTClassifier, L.Trainer]:
    L.seed_everything(0)  # each process seeds as the CLI does, the resumed one too
    # 3 classes x 4 images of 20 x 28 px: FGVC's random 32 px crop of the 36 px short side and
    # a random flip; batches of 4, shuffled.
    dm = ImageFolderDataModule(data, augment=True, image_size=32, batch_size=4,
                               num_workers=num_workers)
    callbacks = [ModelCheckpoint(dirpath=folder, filename="last")]
    if stop_after:
        callbacks.append(StopAfter(stop_after))
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, precision="64-true",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, **trainer_args)  # with the sanity check
    # Built in float64: Lightning loads a checkpoint into the model before it casts the model
    # to the run's precision, so a float32-built model would round the restored weights.
    with trainer.init_module():
        model = ViTClassifier("vit_tiny_patch16_224", dm.num_classes,
                              adapter=WeGeFTConfig(rank=2, targets="all"), pretrained=False,
                              backbone_kwargs=TINY, drop_path_rate=0.2, lr=0.05, warmup_epochs=1)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer


# Persistent loader workers (2) keep their own generators from epoch to epoch: a resumed run's
# fresh workers would augment otherwise.
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_fit_ends_with_the_uninterrupted_fits_weights(tmp_path: Path,
                                                              num_workers: int) -> None:
    data = make_image_folder(tmp_path / "data", {"train": {"a": 4, "b": 4, "c": 4},
                                                 "val": {"a": 1, "b": 1, "c": 1}})
    straight, straight_run = fit(data, tmp_path / "straight", num_workers)
    _, stopped = fit(data, tmp_path / "stopped", num_workers, stop_after=STOP_AFTER)
    assert stopped.global_step == STOP_AFTER * 3
    resumed, resumed_run = fit(data, tmp_path / "resumed", num_workers,
                               ckpt_path=tmp_path / "stopped" / "last.ckpt")
    assert resumed_run.global_step == straight_run.global_step == EPOCHS * 3
    live, reference = resumed.state_dict(), straight.state_dict()
    for name in straight.trainable_names():
        assert live[name].dtype == torch.float64
        assert torch.equal(live[name], reference[name]), name


def test_shuffle_and_augmentation_follow_seed_and_epoch_only(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", {"train": {"a": 3, "b": 3}, "val": {"a": 1}})
    dm = ImageFolderDataModule(data, augment=True, image_size=32, batch_size=6, num_workers=0)
    dm.setup("fit")
    dataset = dm.datasets["train"]

    def epoch(seed: int, number: int, replicas: int = 1, rank: int = 0) -> list:
        sampler = SeededShuffle(dataset, num_replicas=replicas, rank=rank, seed=seed)
        sampler.set_epoch(number)
        return list(sampler)

    first = epoch(0, 0)
    assert sorted(index for index, _ in first) == list(range(6))  # each image once
    assert epoch(0, 0) == first and epoch(0, 1) != first and epoch(1, 0) != first
    # Across processes the same image gets the same augmentation seed in an epoch.
    split = dict(epoch(0, 0, replicas=2, rank=0) + epoch(0, 0, replicas=2, rank=1))
    assert split == dict(first)

    seeded = SeededSamples(dataset)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    index, seed = first[0]
    image, label = seeded[index, seed]
    assert torch.equal(torch.get_rng_state(), before)  # the process's stream is left alone
    assert torch.equal(seeded[index, seed][0], image) and label == dataset[index][1]
    crops = {seeded[index, s][0].sum().item() for s in range(8)}
    assert len(crops) > 1  # the seed does choose the crop and flip
    assert seeded[index][1] == label  # a plain index, from a sampler Lightning puts in


def test_overfit_batches_replaces_the_seeded_shuffle(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", {"train": {"a": 3, "b": 3}, "val": {"a": 1}})
    model, trainer = fit(data, tmp_path / "run", num_workers=0, overfit_batches=1)
    assert trainer.global_step == EPOCHS  # Lightning's SequentialSampler: one batch an epoch


def test_a_resumed_fit_continues_with_the_checkpoints_seed(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # LightningCLI's random seed, say
    monkeypatch.setenv("PL_SEED_WORKERS", "0")
    callback = EpochSeeds()
    assert callback.state_dict() == {"seed": 5}
    with pytest.warns(UserWarning, match="the checkpoint's run was seeded 3, this process 5: the "
                                         "resumed fit continues with the checkpoint's seed 3"):
        callback.load_state_dict({"seed": 3})
    assert run_seed() == 3 and callback.state_dict() == {"seed": 3}



def test_testing_after_a_fit_keeps_the_fits_epoch_seeds_without_a_notice(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # `fit --test_after_fit`, the demo's default, runs trainer.test on the fit's trainer, and
    # Lightning asks the model for its callbacks again; a second EpochSeeds made Lightning print
    # "... will override existing callbacks passed to Trainer: EpochSeeds" in every demo run.
    data = make_image_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1},
                                                 "test": {"a": 1, "b": 1}})
    lightning_log = logging.getLogger("lightning.pytorch")  # it does not propagate to the root
    lightning_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            model, trainer = fit(data, tmp_path / "run", num_workers=0)
            trainer.test(model, datamodule=ImageFolderDataModule(data, image_size=32,
                                                                 batch_size=4))
    finally:
        lightning_log.removeHandler(caplog.handler)
    assert "GPU available" in caplog.text  # Lightning's log was captured at all
    assert "will override existing callbacks" not in caplog.text
    assert sum(isinstance(c, EpochSeeds) for c in trainer.callbacks) == 1
