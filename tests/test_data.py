"""VTAB-1k datamodule, list-file reader, image decoding, transforms and the cache."""
from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.data import make_vtab_task, write_image, write_list
from wegeft_vision.data import (VTAB_TASKS, ImageDecodeError, VTAB1kDataModule, load_rgb,
                                read_list_file, vtab_task, vtab_tasks_in_group)

# Written out independently of the registry (REFERENCE.md section 3 and 2).
VTAB_CLASSES = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
    "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
    "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
    "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9,
}
LABELS = {"train800": [0, 5, 99, 3, 7, 1], "val200": [2, 4, 6], "test": [9, 8, 7, 6]}


def vtab(tmp_path, task="cifar", folder="cifar", labels=LABELS, **kwargs) -> VTAB1kDataModule:
    make_vtab_task(tmp_path, folder, labels)
    kwargs = {"image_size": 16, "batch_size": 4, "num_workers": 0, **kwargs}
    return VTAB1kDataModule(tmp_path, task, **kwargs)


def test_registry_matches_the_reference_tables():
    assert {name: task.num_classes for name, task in VTAB_TASKS.items()} == VTAB_CLASSES
    assert len(vtab_tasks_in_group("Natural")) == 7
    assert vtab_tasks_in_group("Specialized") == ["patch_camelyon", "eurosat", "resisc45",
                                                  "diabetic_retinopathy"]
    assert len(vtab_tasks_in_group("Structured")) == 8
    assert vtab_task("cifar100").name == "cifar"
    assert vtab_task("Oxford-Pet").name == "oxford_iiit_pet"
    with pytest.raises(ValueError, match=r"unknown VTAB-1k task 'cifr' \(did you mean 'cifar'\?\)"):
        vtab_task("cifr")
    with pytest.raises(ValueError, match="unknown VTAB-1k group 'natural'"):
        vtab_tasks_in_group("natural")


@pytest.mark.parametrize("split, train_labels", [
    ("train800", LABELS["train800"]),
    ("train800val200", LABELS["train800"] + LABELS["val200"]),
])
def test_vtab_splits_sizes_and_labels(tmp_path, split, train_labels):
    dm = vtab(tmp_path, task="cifar100", folder="cifar", split=split)  # alias -> folder "cifar"
    assert dm.num_classes == 100 and dm.class_names is None
    dm.setup("fit")
    assert dm.datasets["train"].labels == train_labels
    assert dm.datasets["val"].labels == LABELS["val200"]
    dm.setup("test")
    assert dm.datasets["test"].labels == LABELS["test"]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert len(list(dm.predict_dataloader())) == 1  # 4 test images, batch 4


def test_vtab_folder_spelled_differently(tmp_path):
    dm = vtab(tmp_path, task="oxford_iiit_pet", folder="oxford_pet",
              labels={"train800": [36, 0], "val200": [1], "test": [2]})
    dm.setup()
    assert dm.task_folder() == tmp_path / "oxford_pet"
    assert dm.datasets["train"].labels == [36, 0, 1]


def test_batches_are_the_normalised_pixels(tmp_path):
    # PNG is lossless and the input size equals the image size, so the batch must equal the
    # decoded pixels normalised by hand.
    task = tmp_path / "eurosat"
    for name in ("train800", "val200", "train800val200", "test"):
        write_image(task / f"images/{name}/0.png", seed=7, size=(12, 12))
        write_list(task / f"{name}.txt", [(f"images/{name}/0.png", 3)])
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    dm = VTAB1kDataModule(tmp_path, "eurosat", image_size=12, mean=mean, std=std, num_workers=0)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    pixels = np.asarray(Image.open(task / "images/train800val200/0.png"), dtype=np.float64) / 255
    expected = (pixels - np.array(mean)) / np.array(std)
    assert labels.tolist() == [3]
    np.testing.assert_allclose(images[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_backbone_config_sets_size_and_normalisation(tmp_path):
    dm = vtab(tmp_path, backbone="vit_base_patch16_224.augreg_in21k", image_size=None)
    assert dm.data_config.input_size == (224, 224)
    assert dm.data_config.mean == (0.5, 0.5, 0.5) and dm.data_config.interpolation == "bicubic"
    dm.setup("validate")
    images, _ = next(iter(dm.val_dataloader()))
    assert images.shape == (3, 3, 224, 224)
    assert images.min() >= -1 and images.max() <= 1  # mean/std 0.5 maps [0, 1] onto [-1, 1]


@pytest.mark.parametrize("modes", [("L", "P", "RGBA", "CMYK")])
def test_any_image_mode_becomes_rgb(tmp_path, modes):
    for mode in modes:
        path = write_image(tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}", 3,
                           mode=mode)
        with Image.open(path) as original:
            assert original.mode == mode
            expected = np.asarray(original.convert("RGB"))
        image = load_rgb(path)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_corrupt_image_error_names_its_path(tmp_path):
    dm = vtab(tmp_path, cache=False)
    broken = tmp_path / "cifar/images/train800val200/000001.jpg"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated JPEG
    (tmp_path / "cifar/images/train800val200/000002.jpg").write_bytes(b"not an image")
    dm.setup("fit")  # the files exist: decoding is what fails, when the image is read
    with pytest.raises(ImageDecodeError, match=re.escape(str(broken))):
        dm.datasets["train"][1]
    with pytest.raises(ImageDecodeError, match="000002.jpg: cannot identify image file"):
        dm.datasets["train"][2]
    # With the cache on, setup() decodes the split and fails there, before training.
    with pytest.raises(ImageDecodeError, match=re.escape(str(broken))):
        VTAB1kDataModule(tmp_path, "cifar", image_size=8, num_workers=0).setup("fit")


def test_cached_and_uncached_give_identical_tensors(tmp_path):
    make_vtab_task(tmp_path, "dtd", {"train800": [1, 2, 3, 4, 5], "val200": [6, 7],
                                     "test": [8, 9, 10]}, size=(37, 23))
    common = {"image_size": 24, "batch_size": 3, "num_workers": 0}
    cached = VTAB1kDataModule(tmp_path, "dtd", cache=True, **common)
    plain = VTAB1kDataModule(tmp_path, "dtd", cache=False, **common)
    cached.setup()
    plain.setup()
    for split in ("train", "val", "test"):
        assert cached.datasets[split].cache is not None and plain.datasets[split].cache is None
        for (a, la), (b, lb) in zip(cached._loader(split, False), plain._loader(split, False)):
            assert torch.equal(a, b) and torch.equal(la, lb)
    # Loader workers started with "spawn" (macOS, Windows) receive the dataset pickled.
    copy = pickle.loads(pickle.dumps(plain.datasets["train"]))
    assert torch.equal(copy[4][0], cached.datasets["train"][4][0])


def test_auto_cache_keeps_train_and_val_within_the_budget(tmp_path):
    dm = vtab(tmp_path)
    dm.setup()
    assert dm.datasets["train"].cache.shape == (9, 3, 16, 16)
    assert dm.datasets["val"].cache.dtype == torch.uint8
    assert dm.datasets["test"].cache is None  # read once: not worth decoding up front
    # 9 train images of 3x16x16 bytes fit in a budget of 9*768 bytes; val's 3 more do not.
    small = vtab(tmp_path, cache_budget_gb=9 * 768 / 2**30)
    small.setup("fit")
    assert small.datasets["train"].cache is not None and small.datasets["val"].cache is None


def test_list_reader_tolerates_crlf_blank_lines_and_spaces_in_paths(tmp_path):
    listing = tmp_path / "train800.txt"
    listing.write_bytes(b"\xef\xbb\xbfimages/a b/one two.jpg 3\r\nimages/c.jpg\t 1\r\n\r\n\n  \n")
    samples = read_list_file(listing, tmp_path, num_classes=4)
    assert [(s.path, s.label) for s in samples] == [
        (tmp_path / "images/a b/one two.jpg", 3), (tmp_path / "images/c.jpg", 1)]
    assert samples[1].source == f"{listing}, line 2"


@pytest.mark.parametrize("content, message", [
    ("a.jpg 1\nimages/only_a_path.jpg\n", r"train800.txt, line 2: expected 'relative/path label'"),
    ("a.jpg 1\nb.jpg seven\n", r"train800.txt, line 2: label 'seven' is not an integer"),
    ("a.jpg 100\n", r"train800.txt, line 1: label 100 is out of range for 100 classes \(0..99\)"),
    ("a.jpg -1\n", r"train800.txt, line 1: label -1 is out of range"),
    ("\n\n", r"list file .*train800.txt holds no samples"),
])
def test_malformed_list_files(tmp_path, content, message):
    dm = vtab(tmp_path, split="train800")
    (tmp_path / "cifar/train800.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        dm.setup("fit")


def test_missing_images_are_counted_and_the_first_shown(tmp_path):
    labels = {"train800": list(range(8)), "val200": [0], "test": [0]}
    dm = vtab(tmp_path, split="train800", labels=labels)
    for index in range(7):
        (tmp_path / f"cifar/images/train800/{index:06d}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"VTAB-1k task 'cifar', train split: 7 of 8 "
                       r"image files do not exist: .*000000.jpg \(.*train800.txt, line 1\).*"
                       r"000004.jpg.*; and 2 more") as info:
        dm.setup("fit")
    assert "000005.jpg" not in str(info.value)


def test_missing_root_task_folder_and_list_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"root folder {tmp_path}/nowhere does not exist; "
                       rf"{tmp_path} holds: \(nothing\)"):
        VTAB1kDataModule(tmp_path / "nowhere", "cifar").setup("fit")
    make_vtab_task(tmp_path, "dtd", LABELS)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"no folder for VTAB-1k task 'cifar' under .* "
                       r"\(tried: cifar, cifar100, cifar_100\); .* holds: dtd/, notes.txt"):
        VTAB1kDataModule(tmp_path, "cifar").setup("fit")
    (tmp_path / "dtd/val200.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"list file .*dtd/val200.txt does not exist; "
                       r".*dtd holds: images/, test.txt, train800.txt, train800val200.txt"):
        VTAB1kDataModule(tmp_path, "dtd").setup("validate")


def test_custom_task_num_classes_given_or_inferred(tmp_path):
    make_vtab_task(tmp_path, "digits", {"train800": [0, 4, 2], "val200": [1], "test": [3]})
    assert VTAB1kDataModule(tmp_path, "digits").num_classes == 5  # 1 + largest train label
    dm = VTAB1kDataModule(tmp_path, "digits", num_classes=7, image_size=8, num_workers=0)
    assert dm.num_classes == 7
    dm.setup()
    assert dm.datasets["test"].labels == [3]
    with pytest.raises(ValueError, match=r"num_classes=10 contradicts VTAB-1k task 'cifar', "
                       "which has 100 classes"):
        VTAB1kDataModule(tmp_path, "cifar", num_classes=10)
    with pytest.raises(ValueError, match=r"label 4 is out of range for 3 classes"):
        VTAB1kDataModule(tmp_path, "digits", num_classes=3).setup("fit")


def test_unknown_task_without_a_folder_suggests_the_closest(tmp_path):
    make_vtab_task(tmp_path, "svhn", LABELS)
    with pytest.raises(ValueError, match=r"unknown VTAB-1k task 'smallnorb_az' \(did you mean "
                       r"'smallnorb_azi'\?\) and no folder .* holds: svhn/"):
        VTAB1kDataModule(tmp_path, "smallnorb_az")
    with pytest.raises(ValueError, match="split names the training list, e.g. 'train800' or "
                       "'train800val200'; got 'test'"):
        VTAB1kDataModule(tmp_path, "svhn", split="test")


def test_vtab_other_training_lists(tmp_path):
    folder = make_vtab_task(tmp_path, "digits", {"train800": [0, 1, 2, 3], "val200": [1],
                                                 "test": [2], "train_shot1_seed0": [3, 0]})
    dm = VTAB1kDataModule(tmp_path, "digits", split="train_shot1_seed0", image_size=8)
    assert dm.num_classes == 4  # inferred from the training list actually used
    dm.setup("fit")
    assert dm.datasets["train"].labels == [3, 0]
    assert dm.datasets["train"].samples[0].path == folder / "images/train_shot1_seed0/000000.jpg"
    with pytest.raises(FileNotFoundError, match=r"list file .*digits/train_shot9_seed0.txt does "
                       r"not exist; .* holds: images/, test.txt, train800.txt, "
                       r"train800val200.txt, train_shot1_seed0.txt, val200.txt"):
        VTAB1kDataModule(tmp_path, "digits", split="train_shot9_seed0", num_classes=5).setup()


def test_trainer_runs_the_datamodule_end_to_end(tmp_path):
    import lightning as L
    from jsonargparse import ArgumentParser

    class Probe(L.LightningModule):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.head = torch.nn.Linear(3 * 8 * 8, num_classes)

        def training_step(self, batch, _):
            images, labels = batch
            return torch.nn.functional.cross_entropy(self.head(images.flatten(1)), labels)

        def validation_step(self, batch, _):
            self.log("val/loss", self.training_step(batch, _))

        def predict_step(self, batch, _):
            return self.head(batch[0].flatten(1)).argmax(1)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    make_vtab_task(tmp_path, "digits", {"train800": [0, 1, 2, 3, 4], "val200": [4, 3],
                                        "test": [0, 1, 2]})
    # The CLI sees the common arguments through **common, as LightningCLI would.
    parser = ArgumentParser()
    parser.add_class_arguments(VTAB1kDataModule, "data")
    config = parser.parse_args(["--data.root", str(tmp_path), "--data.task", "digits",
                                "--data.image_size", "8", "--data.batch_size", "4",
                                "--data.num_workers", "0"])
    dm = parser.instantiate(config).data
    assert dm.num_classes == 5 and dm.batch_size == 4
    # A logger makes Lightning compare the model's and the datamodule's hyperparameters: the
    # datamodule must report the num_classes it inferred, not the None it was given.
    trainer = L.Trainer(max_epochs=1, logger=L.pytorch.loggers.CSVLogger(tmp_path / "logs"),
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    model = Probe(dm.num_classes)
    trainer.fit(model, datamodule=dm)
    assert "val/loss" in trainer.callback_metrics
    predictions = torch.cat(trainer.predict(model, datamodule=dm))
    assert predictions.shape == (3,)


def test_hyperparameters_load_with_weights_only(tmp_path):
    # Lightning stores the datamodule's hparams in checkpoints and resumes with weights_only=True,
    # which refuses pathlib objects.
    dm = vtab(tmp_path)
    torch.save({"datamodule_hyper_parameters": dict(dm.hparams)}, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)["datamodule_hyper_parameters"]
    assert loaded["root"] == str(tmp_path) and loaded["task"] == "cifar"
