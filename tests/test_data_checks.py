"""What defines a run's data (``split_files``), and hostile or broken trees found before training:
paths leaving the task folder, symlink loops, unreadable images."""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from tests.helpers.data import (make_fewshot, make_fgvc, make_image_folder, make_vtab_task,
                                write_image)
from wegeft_vision.data import (FewShotDataModule, FGVCDataModule, ImageDecodeError,
                                ImageFolderDataModule, VTAB1kDataModule)
from wegeft_vision.data.datasets import UNREADABLE
from wegeft_vision.data.readers import NO_LABEL, image_files
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


def listed_within(deadline_s: float, function, *args):
    """``function(*args)``, run in a daemon thread so that a walk that never ends fails the test
    (the old listing of two symlink loops) instead of hanging the suite."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", function(*args)),
                              daemon=True)
    thread.start()
    thread.join(deadline_s)
    assert not thread.is_alive(), f"listing did not finish within {deadline_s} s (a loop?)"
    return result["value"]


def loops(folder: Path, count: int) -> None:
    """``count`` symlinks in ``folder``'s sub-folders back to ``folder`` itself and its parent."""
    (folder / "a" / "up").symlink_to("..", target_is_directory=True)
    if count > 1:
        (folder / "b" / "deeper" / "top").symlink_to("../../..", target_is_directory=True)


@pytest.mark.parametrize("count", [1, 2])
def test_predict_root_with_symlink_loops_lists_each_image_once(tmp_path: Path,
                                                               count: int) -> None:
    new = tmp_path / "new"
    write_image(new / "a/1.png", 1)
    write_image(new / "b/deeper/2.png", 2)
    write_image(tmp_path / "outside.png", 3)  # in the folder holding predict_root
    loops(new, count)
    make_vtab_task(tmp_path / "vtab", "toy", VTAB_LABELS)
    dm = VTAB1kDataModule(tmp_path / "vtab", "toy", predict_root=new, **COMMON)
    listed_within(60, dm.setup, "predict")
    assert [s.path for s in dm.datasets["predict"].samples] == [new / "a/1.png",
                                                                new / "b/deeper/2.png"]


@pytest.mark.parametrize("count", [1, 2])
def test_image_folder_with_symlink_loops_reads_each_image_once(tmp_path: Path,
                                                               count: int) -> None:
    root = make_image_folder(tmp_path / "tree", {"train": {"cat": 2, "dog": 3, "eel": 1},
                                                 "val": {"cat": 1}})
    train = root / "train"
    (train / "cat" / "loop").symlink_to("..", target_is_directory=True)  # to train/ itself
    if count > 1:
        (train / "dog" / "sub").mkdir()
        (train / "dog" / "sub" / "home").symlink_to("../../..", target_is_directory=True)
        (train / "eel" / "dogs").symlink_to("../dog", target_is_directory=True)
    dm = ImageFolderDataModule(root, **COMMON)
    listed_within(60, dm.setup, "fit")
    samples = dm.datasets["train"].samples
    assert [(s.path.relative_to(train), s.label) for s in samples] == [
        (Path("cat/0.png"), 0), (Path("cat/1.png"), 0), (Path("dog/0.png"), 1),
        (Path("dog/1.png"), 1), (Path("dog/2.png"), 1), (Path("eel/0.png"), 2)]


def test_a_symlink_to_a_folder_elsewhere_is_followed_once(tmp_path: Path) -> None:
    write_image(tmp_path / "pool/x.png", 1)
    write_image(tmp_path / "new/real/y.png", 2)
    (tmp_path / "new/0link").symlink_to(tmp_path / "pool", target_is_directory=True)
    (tmp_path / "new/real/again").symlink_to(tmp_path / "pool", target_is_directory=True)
    (tmp_path / "new/1link").symlink_to(tmp_path / "new/real", target_is_directory=True)
    (tmp_path / "new/broken").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    # The real folder keeps its own path; the folder outside comes in under the first link.
    assert image_files(tmp_path / "new") == [tmp_path / "new/0link/x.png",
                                             tmp_path / "new/real/y.png"]


@pytest.mark.parametrize("line", ["/etc/passwd 0", "../other/images/0.jpg 1",
                                  "images/../../x.jpg 1", "images/a/../../.. 0"])
def test_a_list_line_leaving_the_task_folder_is_refused(tmp_path: Path, line: str) -> None:
    task = make_vtab_task(tmp_path, "toy", VTAB_LABELS)
    with (task / "train800.txt").open("a") as handle:
        handle.write(f"\n{line}\n")
    dm = VTAB1kDataModule(tmp_path, "toy", split="train800", num_classes=3, **COMMON)
    path = line.rsplit(maxsplit=1)[0]
    with pytest.raises(UserError, match=re.escape(
            f"{task / 'train800.txt'}, line 5: image path {path!r} leaves the image folder "
            f"{task} (absolute, or '..' above it); paths must be relative to it")):
        dm.setup("fit")


def test_paths_that_stay_inside_are_read(tmp_path: Path) -> None:
    task = make_vtab_task(tmp_path, "toy", VTAB_LABELS)
    (task / "train800.txt").write_text("images/val200/../train800/000001.jpg 1\n")
    dm = VTAB1kDataModule(tmp_path, "toy", split="train800", num_classes=3, **COMMON)
    dm.setup("fit")
    assert [s.path for s in dm.datasets["train"].samples] == [
        task / "images/val200/../train800/000001.jpg"]


def test_a_json_key_leaving_the_image_folder_is_refused(tmp_path: Path) -> None:
    labels = {"train": {f"{c}.jpg": c for c in range(1, 103)}, "val": {"1.jpg": 1},
              "test": {"1.jpg": 1}}
    flowers = make_fgvc(tmp_path / "data" / "OxfordFlowers", ".", labels)
    (flowers / "test.json").write_text(json.dumps({"1.jpg": 1, "../../secret.jpg": 2}))
    dm = FGVCDataModule(flowers, "OxfordFlowers", **COMMON)
    with pytest.raises(UserError, match=re.escape(
            f"{flowers / 'test.json'}, key '../../secret.jpg': image path '../../secret.jpg' "
            f"leaves the image folder {flowers} (absolute")):
        dm.setup("test")


def test_fit_with_test_after_fit_checks_the_test_images_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from tests.helpers.training import make_backbone_file, make_toy_task, write_config
    from wegeft_vision.cli import cli_main, main

    task = make_toy_task(tmp_path / "data")
    config = write_config(tmp_path / "fit.yaml", tmp_path / "data",
                          make_backbone_file(tmp_path / "backbone.safetensors"), tmp_path / "logs")
    broken = task / "images/test/000003.png"
    broken.write_bytes(b"corrupt")
    message = (f"VTAB-1k task 'toy', test split: 1 of 8 image files cannot be read: {broken} "
               f"({task / 'test.txt'}, line 4): not an image file PIL can identify")
    with pytest.raises(ImageDecodeError, match=re.escape(message)):
        cli_main(["fit", "--config", str(config), "--test_after_fit", "true"])
    assert not list((tmp_path / "logs").rglob("*.ckpt"))  # no epoch was trained
    # The command line prints it as one line, exit code 2, no traceback.
    monkeypatch.setattr("sys.argv", ["wegeft-vision", "fit", "--config", str(config),
                                     "--test_after_fit", "true"])
    monkeypatch.delenv("WEGEFT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    # Without a test after the fit, the test split is not read.
    cli = cli_main(["fit", "--config", str(config), "--trainer.max_epochs", "1"])
    assert set(cli.datamodule.datasets) == {"train", "val"}


def test_check_images_false_checks_only_that_the_files_exist(tmp_path: Path) -> None:
    task = make_vtab_task(tmp_path, "toy", VTAB_LABELS)
    (task / "images/train800/000001.jpg").write_bytes(b"corrupt")
    dm = VTAB1kDataModule(tmp_path, "toy", split="train800", check_images=False, cache=False,
                          **COMMON)
    dm.setup("fit")
    with pytest.raises(ImageDecodeError, match="000001.jpg: cannot identify image file"):
        dm.datasets["train"][1]
    (task / "images/val200/000000.jpg").unlink()
    with pytest.raises(MissingFileError, match="val split: 1 of 1 image files do not exist"):
        VTAB1kDataModule(tmp_path, "toy", split="train800", check_images=False,
                         **COMMON).setup("fit")


@pytest.mark.parametrize("cache", [None, True])
def test_an_unreadable_new_image_is_marked_in_its_batch(tmp_path: Path, cache) -> None:
    make_vtab_task(tmp_path / "vtab", "toy", VTAB_LABELS)
    new = tmp_path / "new"
    write_image(new / "0.png", 1)
    (new / "1.png").write_bytes(b"not an image")
    (new / "2.png").symlink_to(tmp_path / "gone.png")  # a broken link
    dm = VTAB1kDataModule(tmp_path / "vtab", "toy", predict_root=new, cache=cache, **COMMON)
    dm.setup("predict")  # new images are not checked up front: the others must be predicted
    images, labels = next(iter(dm.predict_dataloader()))
    assert labels.tolist() == [NO_LABEL, UNREADABLE, UNREADABLE]
    assert images.shape == (3, 3, 16, 16)
