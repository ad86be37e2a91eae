"""FGVC (VPT json), few-shot FGVC (NOAH lists) and ImageFolder datamodules; loader defaults."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import wegeft_vision.data.datamodules as datamodules
from tests.helpers.data import make_fewshot, make_fgvc, make_image_folder, write_image
from wegeft_vision.data import (FEWSHOT_DATASETS, FGVC_DATASETS, FewShotDataModule,
                                FGVCDataModule, ImageFolderDataModule, backbone_data_config,
                                build_label_mapping, default_num_workers, fewshot_dataset)
from wegeft_vision.data.transforms import crop_transform

COMMON = {"image_size": 16, "batch_size": 8, "num_workers": 0}


def cub_splits():
    """CUB-style string labels "001".."200"; val lacks classes 001-010 (it must not shift)."""
    train = {f"{c:03d}.Bird_{c}/train_{c}.jpg": f"{c:03d}" for c in range(1, 201)}
    val = {f"{c:03d}.Bird_{c}/val_{c}.jpg": f"{c:03d}" for c in range(11, 201, 10)}
    test = {"200.Bird_200/test.jpg": "200", "011.Bird_11/test.jpg": "011"}
    return {"train": train, "val": val, "test": test}


def test_fgvc_registry():
    assert {name: d.num_classes for name, d in FGVC_DATASETS.items()} == {
        "CUB_200_2011": 200, "nabirds": 555, "OxfordFlowers": 102, "StanfordDogs": 120,
        "StanfordCars": 196}
    assert {name: d.image_dir for name, d in FGVC_DATASETS.items()} == {
        "CUB_200_2011": "images", "nabirds": "images", "OxfordFlowers": ".",
        "StanfordDogs": "Images", "StanfordCars": "."}
    assert {name: d.num_classes for name, d in FEWSHOT_DATASETS.items()} == {
        "fgvc_aircraft": 100, "food101": 101, "oxford_flowers102": 102, "oxford_pets": 37,
        "stanford_cars": 196}
    assert fewshot_dataset("standford-cars").name == "stanford_cars"


def test_label_mapping_orders_numbers_numerically():
    assert build_label_mapping(["10", "2", "001"]) == {"001": 0, "2": 1, "10": 2}
    assert build_label_mapping([1010, 295, 300, 295]) == {295: 0, 300: 1, 1010: 2}


def test_cub_string_labels_mapped_from_train(tmp_path):
    make_fgvc(tmp_path / "CUB_200_2011", "images", cub_splits())
    dm = FGVCDataModule(tmp_path, "cub", **COMMON)  # root is the parent of the dataset folder
    assert dm.num_classes == 200 and dm.dataset == "CUB_200_2011"
    dm.setup()
    train = dm.datasets["train"]
    assert len(train) == 200 and sorted(train.labels) == list(range(200))
    # val holds only classes 11, 21, ..., 191: each keeps its train index (c - 1).
    assert dm.datasets["val"].labels == list(range(10, 200, 10))
    assert dm.datasets["test"].labels == [199, 10]
    assert dm.datasets["test"].samples[0].path == \
        tmp_path / "CUB_200_2011/images/200.Bird_200/test.jpg"


def test_nabirds_sparse_ints_val_missing_two_classes(tmp_path):
    raw = list(range(295, 295 + 2 * 555, 2))  # 555 sparse ints, 295..1403
    train = {f"{r:04d}/t{r}.jpg": r for r in raw}
    val = {f"{r:04d}/v{r}.jpg": r for r in raw[2:]}  # 553 classes, like one public copy
    folder = make_fgvc(tmp_path / "nabirds", "images",
                       {"train": train, "val": val, "test": {"0297/x.jpg": 297}})
    dm = FGVCDataModule(folder, "nabirds", use_val_for_train=True, **COMMON)
    dm.setup("fit")
    assert dm.label_mapping[295] == 0 and dm.label_mapping[1403] == 554
    assert dm.datasets["val"].labels == list(range(2, 555))  # not 0..552
    assert len(dm.datasets["train"]) == 555 + 553  # val folded into training
    assert dm.datasets["train"].labels[555:] == list(range(2, 555))


def test_fgvc_transforms_shapes_crops_and_flips(tmp_path):
    # Input 32 px: short side resized to floor(32 / (224 / 256)) = 36 (timm's rule). A 36 px high
    # image is not resized, so the centre crop is rows 2..33 and columns round((50 - 32) / 2) =
    # 9..40.
    path = write_image(tmp_path / "wide.png", seed=1, size=(50, 36))
    image = Image.open(path)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    config = backbone_data_config(image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    evaluate = crop_transform(config, train=False)
    assert torch.allclose(evaluate(image), pixels[:, 2:34, 9:41].float() / 255)
    train = crop_transform(config, train=True)
    windows = {(top, left, flip) for top in range(5) for left in range(19) for flip in (0, 1)}
    seen = set()
    torch.manual_seed(0)
    for _ in range(40):
        out = (train(image) * 255).round().to(torch.uint8)
        assert out.shape == (3, 32, 32)
        match = [(t, l, f) for t, l, f in windows
                 if torch.equal(out.flip(-1) if f else out, pixels[:, t:t + 32, l:l + 32])]
        assert match, "a training crop is not a (possibly flipped) window of the image"
        seen.update(match)
    assert {f for _, _, f in seen} == {0, 1} and len({(t, l) for t, l, _ in seen}) > 10


def test_fgvc_root_spellings_and_image_folders(tmp_path):
    labels = {c: c + 1 for c in range(120)}  # 1-based raw labels
    splits = {s: {f"n{c:03d}/{s}.jpg": raw for c, raw in labels.items()}
              for s in ("train", "val", "test")}
    make_fgvc(tmp_path / "Stanford-dogs", "Images", splits)
    dm = FGVCDataModule(tmp_path, "StanfordDogs", **COMMON)
    dm.setup("test")
    assert dm.dataset_folder() == tmp_path / "Stanford-dogs"
    assert dm.datasets["test"].labels == list(range(120))
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (8, 3, 16, 16) and labels.tolist() == list(range(8))


def test_fgvc_bad_inputs(tmp_path):
    splits = cub_splits()
    folder = make_fgvc(tmp_path / "CUB_200_2011", "images", splits)
    with pytest.raises(ValueError, match=r"unknown FGVC dataset 'CUB_200_2012' \(did you mean "
                       r"'CUB_200_2011'\?\)"):
        FGVCDataModule(tmp_path, "CUB_200_2012")
    with pytest.raises(FileNotFoundError, match=r"holds neither train.json nor a folder for "
                       r"FGVC dataset 'nabirds' \(tried: nabirds, na_birds\); it holds: "
                       r"CUB_200_2011/"):
        FGVCDataModule(tmp_path, "nabirds").setup("fit")
    (folder / "val.json").write_text(json.dumps({**splits["val"], "x/extra.jpg": "201"}))
    with pytest.raises(ValueError, match=r"val.json: 1 label\(s\) do not occur in .*train.json "
                       r"\(the label mapping is built from it\): 'x/extra.jpg': '201'"):
        FGVCDataModule(folder, "cub").setup("validate")
    (folder / "val.json").write_text('{"a.jpg": "001",\n "b.jpg": }')
    with pytest.raises(ValueError, match=r"val.json, line 2: invalid json"):
        FGVCDataModule(folder, "cub").setup("validate")
    (folder / "val.json").write_text('{"a.jpg": "001", "a.jpg": "002"}')
    with pytest.raises(ValueError, match=r"val.json: duplicate key 'a.jpg'"):
        FGVCDataModule(folder, "cub").setup("validate")
    (folder / "val.json").write_text('{"a.jpg": 1.5}')
    with pytest.raises(ValueError, match=r"key 'a.jpg' has label 1.5; labels must be ints"):
        FGVCDataModule(folder, "cub").setup("validate")
    (folder / "test.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"json file .*test.json does not exist"):
        FGVCDataModule(folder, "cub").setup("test")
    (folder / "train.json").write_text(json.dumps(dict(list(splits["train"].items())[:199])))
    with pytest.raises(ValueError, match=r"train.json: 199 distinct labels, but FGVC dataset "
                       r"'CUB_200_2011' has 200 classes"):
        FGVCDataModule(folder, "cub").setup("fit")


def test_fgvc_missing_images(tmp_path):
    folder = make_fgvc(tmp_path / "CUB_200_2011", "images", cub_splits())
    (folder / "images/011.Bird_11/test.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"FGVC dataset 'CUB_200_2011', test split: 1 of "
                       r"2 image files do not exist: .*011.Bird_11/test.jpg \(.*test.json, key "
                       r"'011.Bird_11/test.jpg'\)$"):
        FGVCDataModule(folder, "cub").setup("test")
    (folder / "images").rename(folder / "pictures")
    with pytest.raises(FileNotFoundError, match=r"FGVC dataset 'CUB_200_2011' image folder "
                       r".*CUB_200_2011/images does not exist; .* holds: pictures/, test.json, "
                       r"train.json, val.json"):
        FGVCDataModule(folder, "cub").setup("test")


def fewshot_lists(shots=2, seed=1):
    return {f"train_meta.list.num_shot_{shots}.seed_{seed}": [0, 0, 1, 1, 99, 99],
            "val_meta.list": [0, 1, 99], "test_meta.list": [1, 99, 5, 0]}


def test_fewshot_layouts_and_spellings(tmp_path):
    make_fewshot(tmp_path, "fgvc-aircraft", "images", fewshot_lists())
    make_fewshot(tmp_path, "standford-cars", ".", fewshot_lists())
    aircraft = FewShotDataModule(tmp_path, "fgvc_aircraft", shots=2, seed=1, **COMMON)
    cars = FewShotDataModule(tmp_path, "stanford_cars", shots=2, seed=1, **COMMON)
    assert (aircraft.num_classes, cars.num_classes) == (100, 196)
    for dm, image_dir in ((aircraft, tmp_path / "fgvc-aircraft/images"),
                          (cars, tmp_path / "standford-cars")):
        dm.setup()
        assert dm.datasets["train"].labels == [0, 0, 1, 1, 99, 99]
        assert dm.datasets["val"].labels == [0, 1, 99]
        assert dm.datasets["test"].labels == [1, 99, 5, 0]
        assert dm.datasets["train"].samples[0].path == image_dir / "class_0/train_meta_0.jpg"
        assert dm.datasets["train"].transform.augments and dm.datasets["train"].cache is None
        images, labels = next(iter(dm.train_dataloader()))
        assert images.shape == (6, 3, 16, 16) and sorted(labels.tolist()) == [0, 0, 1, 1, 99, 99]


def test_fewshot_bad_inputs(tmp_path):
    make_fewshot(tmp_path, "oxford_pets", "images", fewshot_lists())
    with pytest.raises(FileNotFoundError, match=r"list file .*train_meta.list.num_shot_4.seed_1 "
                       r"does not exist; .*annotations holds: test_meta.list, "
                       r"train_meta.list.num_shot_2.seed_1, val_meta.list"):
        FewShotDataModule(tmp_path, "pets", shots=4, seed=1).setup("fit")
    with pytest.raises(ValueError, match=r"test_meta.list, line 2: label 99 is out of range for "
                       r"37 classes"):
        FewShotDataModule(tmp_path, "oxford_pets", shots=2, seed=1).setup("test")
    with pytest.raises(ValueError, match=r"unknown few-shot dataset 'food102' \(did you mean "
                       r"'food101'\?\) and no folder"):
        FewShotDataModule(tmp_path, "food102", shots=2)
    with pytest.raises(FileNotFoundError, match=r"no folder for few-shot dataset 'food101' .*"
                       r"\(tried: food101, food\); .* holds: oxford_pets/"):
        FewShotDataModule(tmp_path, "food101", shots=2).setup("fit")
    with pytest.raises(ValueError, match="shots must be a positive int, got 0"):
        FewShotDataModule(tmp_path, "oxford_pets", shots=0)


def test_fewshot_custom_dataset_infers_num_classes(tmp_path):
    make_fewshot(tmp_path, "digits", "images", {"train_meta.list.num_shot_1.seed_0": [0, 4],
                                                "val_meta.list": [3], "test_meta.list": [2]})
    dm = FewShotDataModule(tmp_path, "digits", shots=1, augment=False, **COMMON)
    assert dm.num_classes == 5
    dm.setup("fit")
    assert dm.datasets["train"].cache is not None  # no augmentation: cached automatically


def test_image_folder(tmp_path):
    make_image_folder(tmp_path, {"train": {"cat": 2, "dog": 3, "ant": 1},
                                 "val": {"dog": 1, "ant": 1}, "test": {"cat": 1}})
    (tmp_path / "train/dog/readme.txt").write_text("not an image")
    dm = ImageFolderDataModule(tmp_path, augment=False, **COMMON)
    assert dm.class_names == ["ant", "cat", "dog"] and dm.num_classes == 3
    dm.setup()
    assert sorted(dm.datasets["train"].labels) == [0, 1, 1, 2, 2, 2]
    assert sorted(dm.datasets["val"].labels) == [0, 2]
    assert dm.datasets["test"].labels == [1]
    images, _ = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 16, 16)
    (tmp_path / "val/bee").mkdir()
    with pytest.raises(ValueError, match=r"val holds class folders that train/ lacks: bee"):
        ImageFolderDataModule(tmp_path).setup("validate")
    with pytest.raises(FileNotFoundError, match=r"ImageFolder train folder .*/elsewhere/train "
                       r"does not exist"):
        ImageFolderDataModule(tmp_path / "elsewhere")


def test_loader_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(datamodules, "available_cpus", lambda: 2)
    assert default_num_workers() == 1  # a 2-core laptop: one worker, one trainer
    monkeypatch.setattr(datamodules, "available_cpus", lambda: 32)
    assert default_num_workers() == 8
    make_image_folder(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1}})
    dm = ImageFolderDataModule(tmp_path, augment=False, image_size=8)
    dm.setup("fit")
    assert dm.num_workers == 8 and dm.pin_memory == torch.cuda.is_available()
    cached = dm.val_dataloader()  # cached split: a batch only needs normalising, no workers
    assert cached.num_workers == 0 and not cached.persistent_workers
    explicit = ImageFolderDataModule(tmp_path, image_size=8, num_workers=2, pin_memory=True)
    explicit.setup("fit")
    loader = explicit.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers and loader.pin_memory
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        ImageFolderDataModule(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="unknown timm model 'vit_base_patch16_22' "
                       r"\(did you mean 'vit_base_patch16_224'\?\)"):
        ImageFolderDataModule(tmp_path, backbone="vit_base_patch16_22")
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'; use one of nearest, "
                       "bilinear, bicubic, box, hamming, lanczos"):
        ImageFolderDataModule(tmp_path, interpolation="cubic")
    assert ImageFolderDataModule(tmp_path, interpolation="BILINEAR").data_config.interpolation \
        == "bilinear"
    with pytest.raises(ValueError, match=r"mean must hold 3 values"):
        ImageFolderDataModule(tmp_path, mean=(0.5, 0.5))


def test_image_folder_skips_hidden_folders_and_files(tmp_path):
    make_image_folder(tmp_path, {"train": {"cat": 2, "dog": 1}, "val": {"dog": 1},
                                 "test": {"cat": 1}})
    hidden_images = ["train/.ipynb_checkpoints/0-checkpoint.png", "train/cat/._0.png",
                     "train/cat/.ipynb_checkpoints/0-checkpoint.png",
                     "val/.ipynb_checkpoints/x.png", "test/cat/.hidden.png"]
    for rel in hidden_images:
        write_image(tmp_path / rel, 9)
    (tmp_path / "train/cat/._1.png").write_bytes(b"macOS resource fork, not a PNG")
    for rel in ("train/.DS_Store", "train/cat/.DS_Store", "val/.DS_Store"):
        (tmp_path / rel).write_bytes(b"\x00\x00\x00\x01Bud1")
    write_image(tmp_path / "train/dog/more/1.png", 10)  # a class's images may be nested
    dm = ImageFolderDataModule(tmp_path, augment=False, **COMMON)
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    dm.setup()
    paths = {split: [s.path.relative_to(tmp_path).as_posix() for s in dm.datasets[split].samples]
             for split in ("train", "val", "test")}
    assert paths == {"train": ["train/cat/0.png", "train/cat/1.png", "train/dog/0.png",
                               "train/dog/more/1.png"],
                     "val": ["val/dog/0.png"], "test": ["test/cat/0.png"]}
    assert dm.datasets["train"].labels == [0, 0, 1, 1]
    (tmp_path / "train/dog/0.png").unlink()
    (tmp_path / "train/dog/more/1.png").unlink()
    with pytest.raises(ValueError, match=r"train: class folder\(s\) dog hold no images with "
                       r"extensions \.jpg"):
        ImageFolderDataModule(tmp_path).setup("fit")
    (tmp_path / "other/train/.ipynb_checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"ImageFolder train folder .*/other/train holds no class "
                       r"folders; it holds: \.ipynb_checkpoints/"):
        ImageFolderDataModule(tmp_path / "other")
