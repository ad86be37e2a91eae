"""``predict`` on new images: ``--data.predict_root DIR`` classifies every image under DIR."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.helpers.data import CHECK_KINDS, make_datamodule, write_image
from tests.helpers.training import NUM_CLASSES, make_backbone_file, make_toy_task, write_config
from wegeft_vision.cli import cli_main

# Relative paths under the predict folder, in the order predictions.csv must list them: sorted
# by path components ("a/10.png" < "a/2.png" as text; "a/..." < "a-b/..." < "b.JPG").
IMAGES = ["a/10.png", "a/2.png", "a/deeper/x.jpeg", "a-b/c.png", "b.JPG", "z.bmp"]
# Hidden entries and other files: none of them is an image to classify.
NOT_IMAGES = [".ipynb_checkpoints/b-checkpoint.png", ".DS_Store", "a/._2.png",
              ".hidden/x.png", "a/.cache/y.png", "notes.txt", "a/labels.csv"]


def write_new_images(folder: Path) -> None:
    sizes = [(32, 32), (40, 27), (20, 31), (32, 32), (64, 64), (13, 32)]
    for index, (rel, size) in enumerate(zip(IMAGES, sizes)):
        write_image(folder / rel, 700 + index, size=size,
                    fmt={".jpeg": "JPEG", ".JPG": "JPEG", ".bmp": "BMP"}.get(Path(rel).suffix,
                                                                            "PNG"))
    for rel in NOT_IMAGES:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".png":
            write_image(path, 900, size=(32, 32))
        else:
            path.write_bytes(b"\x00not an image")


def expected_input(path: Path) -> torch.Tensor:
    """The model input computed with PIL and numpy: bicubic resize to 32 px (timm's default
    interpolation), then (pixels / 255 - 0.5) / 0.5."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (32, 32):
            image = image.resize((32, 32), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.float64) / 255
    return torch.from_numpy((pixels - 0.5) / 0.5).permute(2, 0, 1).float()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("predict")
    make_toy_task(root / "data")
    weights = make_backbone_file(root / "backbone.safetensors")
    config = write_config(root / "fit.yaml", root / "data", weights, root / "logs")
    write_new_images(root / "new")
    return {"root": root, "config": config}


def read_csv(cli) -> tuple[list[str], list[dict[str, str]]]:
    with open(Path(cli.trainer.log_dir) / "predictions.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def check_rows(cli, rows: list[dict[str, str]], folder: Path, class_names: list[str]) -> None:
    assert [row["image"] for row in rows] == [str(folder / rel) for rel in IMAGES]
    assert [int(row["index"]) for row in rows] == list(range(len(IMAGES)))
    model = cli.model.eval()
    with torch.no_grad():
        probs = model(torch.stack([expected_input(folder / rel) for rel in IMAGES])).softmax(-1)
    written = torch.tensor([[float(row[f"p{c}"]) for c in range(NUM_CLASSES)] for row in rows])
    torch.testing.assert_close(written, probs, rtol=0, atol=1e-6)
    predicted = probs.argmax(1)
    assert [int(row["prediction"]) for row in rows] == predicted.tolist()
    assert [float(row["probability"]) for row in rows] == pytest.approx(
        probs.max(1).values.tolist(), abs=1e-7)
    assert [row["class_name"] for row in rows] == (
        [class_names[i] for i in predicted] if class_names else [""] * len(rows))


def test_predict_root_classifies_every_image_in_sorted_order(setup: dict) -> None:
    folder = setup["root"] / "new"
    cli = cli_main(["predict", "--config", str(setup["config"]),
                    "--data.predict_root", str(folder)])
    columns, rows = read_csv(cli)
    assert columns == ["index", "image", "prediction", "class_name", "probability",
                       *(f"p{c}" for c in range(NUM_CLASSES))]
    check_rows(cli, rows, folder, [])


def test_predict_root_of_an_image_folder_names_the_classes(setup: dict) -> None:
    root, folder = setup["root"], setup["root"] / "new"
    classes = ["ant", "bee", "cat", "dog", "eel", "fox"]
    for index, name in enumerate(classes):
        write_image(root / "tree/train" / name / "0.png", index, size=(32, 32))
    config = yaml.safe_load(setup["config"].read_text())
    config["data"] = {"class_path": "wegeft_vision.data.ImageFolderDataModule",
                      "init_args": {"root": str(root / "tree"), "augment": False,
                                    "batch_size": 4, "num_workers": 0, "image_size": 32,
                                    "mean": [0.5] * 3, "std": [0.5] * 3,
                                    "predict_root": str(folder)}}
    path = root / "folder.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = cli_main(["predict", "--config", str(path)])
    _, rows = read_csv(cli)
    check_rows(cli, rows, folder, classes)


def test_labelled_predict_keeps_the_label_column(setup: dict) -> None:
    cli = cli_main(["predict", "--config", str(setup["config"])])
    columns, rows = read_csv(cli)
    assert columns[:6] == ["index", "image", "label", "prediction", "class_name", "probability"]
    test = cli.datamodule.datasets["test"]
    assert [int(row["label"]) for row in rows] == test.labels
    assert [row["image"] for row in rows] == [str(s.path) for s in test.samples]


@pytest.mark.parametrize("kind", CHECK_KINDS)
def test_every_datamodule_takes_predict_root(tmp_path: Path, kind: str) -> None:
    write_new_images(tmp_path / "new")
    dm = make_datamodule(kind, tmp_path / "data", image_size=16, num_workers=0, batch_size=64,
                         predict_root=tmp_path / "new")
    dm.setup("predict")
    assert set(dm.datasets) == {"predict"}  # no labelled split is read
    dataset = dm.datasets["predict"]
    assert [s.path for s in dataset.samples] == [tmp_path / "new" / rel for rel in IMAGES]
    assert not dataset.labelled and dataset.labels == [-1] * len(IMAGES)
    assert not dataset.transform.augments and dataset.cache is None
    images, _ = next(iter(dm.predict_dataloader()))
    assert images.shape == (len(IMAGES), 3, 16, 16)
    assert dm.hparams["predict_root"] == str(tmp_path / "new")


def test_predict_root_errors(tmp_path: Path) -> None:
    make_toy_task(tmp_path / "data")
    kwargs = {"num_classes": NUM_CLASSES, "num_workers": 0}
    from wegeft_vision.data import VTAB1kDataModule
    with pytest.raises(FileNotFoundError, match=r"predict_root folder .*/missing does not exist; "
                       rf"{tmp_path} holds: data/"):
        VTAB1kDataModule(tmp_path / "data", "toy", predict_root=tmp_path / "missing",
                         **kwargs).setup("predict")
    for rel in NOT_IMAGES:
        (tmp_path / "empty" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "empty" / rel).write_bytes(b"")
    with pytest.raises(ValueError, match=r"predict_root .*/empty holds no images with extensions "
                       r"\.jpg, .*\(hidden files and folders are skipped\); it holds: "
                       r"\.DS_Store, \.hidden/, \.ipynb_checkpoints/, a/, notes.txt"):
        VTAB1kDataModule(tmp_path / "data", "toy", predict_root=tmp_path / "empty",
                         **kwargs).setup("predict")
