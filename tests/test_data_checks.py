"""What defines a run's data (``split_files``), and hostile or broken trees found before training:
paths leaving the task folder, symlink loops, unreadable images."""
from __future__ import annotations

from pathlib import Path

import pytest

from _data_helpers import make_fewshot, make_fgvc, make_image_folder, make_vtab_task
from wegeft_vision.data import (FewShotDataModule, FGVCDataModule, ImageFolderDataModule,
                                VTAB1kDataModule)
from wegeft_vision.errors import MissingFileError, UserError

COMMON = {"image_size": 16, "batch_size": 4, "num_workers": 0}
VTAB_LABELS = {"train800": [0, 1, 2], "val200": [1], "test": [2, 0]}


def test_split_files_name_every_annotation_file_each_run_reads(tmp_path: Path) -> None:
    task = make_vtab_task(tmp_path / "vtab", "toy", VTAB_LABELS)
    dm = VTAB1kDataModule(tmp_path / "vtab", "toy", split="train800", **COMMON)
    assert dm.split_files() == [task / "train800.txt", task / "val200.txt", task / "test.txt"]
    assert dm.split_files(("train", "val")) == [task / "train800.txt", task / "val200.txt"]
    final = VTAB1kDataModule(tmp_path / "vtab", "toy", split="train800val200", **COMMON)
    assert final.split_files(("train",)) == [task / "train800val200.txt"]

    shots = make_fewshot(tmp_path / "fs", "toyshot", "images", {
        "train_meta.list.num_shot_2.seed_1": [0, 1], "val_meta.list": [0], "test_meta.list": [1]})
    dm = FewShotDataModule(tmp_path / "fs", "toyshot", shots=2, seed=1, **COMMON)
    assert dm.split_files() == [shots / "annotations" / name for name in (
        "train_meta.list.num_shot_2.seed_1", "val_meta.list", "test_meta.list")]

    # FGVC: train.json defines the label mapping of every split, so it is part of each.
    labels = {"train": {"a.jpg": 1, "b.jpg": 2}, "val": {"c.jpg": 2}, "test": {"d.jpg": 1}}
    flowers = make_fgvc(tmp_path / "OxfordFlowers", ".", labels)
    dm = FGVCDataModule(flowers, "OxfordFlowers", **COMMON)
    assert dm.split_files(("test",)) == [flowers / "train.json", flowers / "test.json"]
    assert dm.split_files(("val", "train")) == [flowers / "train.json", flowers / "val.json"]
    with_val = FGVCDataModule(flowers, "OxfordFlowers", use_val_for_train=True, **COMMON)
    assert with_val.split_files(("train",)) == [flowers / "train.json", flowers / "val.json"]

    folder = make_image_folder(tmp_path / "tree", {"train": {"cat": 1}, "val": {"cat": 1}})
    assert ImageFolderDataModule(folder, **COMMON).split_files() == []


def test_split_files_errors(tmp_path: Path) -> None:
    task = make_vtab_task(tmp_path, "toy", VTAB_LABELS)
    dm = VTAB1kDataModule(tmp_path, "toy", split="train800", **COMMON)
    (task / "test.txt").unlink()
    assert dm.split_files(("train", "val"))  # what is not asked for may be missing
    with pytest.raises(MissingFileError, match=r"VTAB-1k task 'toy': annotation file "
                       r".*/toy/test\.txt does not exist; .*/toy holds: images/, train800\.txt"):
        dm.split_files()
    with pytest.raises(UserError, match=r"unknown split\(s\) 'predict'; expected some of train, "
                       "val, test"):
        dm.split_files(("train", "predict"))
