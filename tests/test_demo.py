"""The shipped demo data and backbone: VTAB-1k layout and content, plain-timm loading, rebuilds."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from sklearn.datasets import load_digits

from wegeft_vision.data import VTAB1kDataModule

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "digits_vtab"
BACKBONE = ROOT / "data" / "demo_backbone.safetensors"
BACKBONE_JSON = ROOT / "data" / "demo_backbone.json"
KWARGS = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3)

TARGET_SIZES = {"train800": 200, "val200": 100, "train800val200": 300, "test": 596}
SOURCE_SIZES = {"train800": 600, "val200": 100, "train800val200": 700, "test": 201}
SHOTS, SEEDS = (1, 2, 4, 8, 16), (0, 1, 2)


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def read_list(task_dir: Path, split: str) -> list[tuple[str, int]]:
    lines = (task_dir / f"{split}.txt").read_text(encoding="utf-8").splitlines()
    return [(path, int(label)) for path, label in (line.rsplit(" ", 1) for line in lines)]


def read_images(task_dir: Path, items: list[tuple[str, int]]) -> np.ndarray:
    arrays = []
    for path, _ in items:
        with Image.open(task_dir / path) as image:
            assert image.mode == "RGB" and image.size == (32, 32), (path, image.mode, image.size)
            arrays.append(np.asarray(image))
    return np.stack(arrays)


def digits_index(path: str) -> int:
    return int(Path(path).stem)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """load_digits upsampled to 32x32 by PIL (independently of the script's torch resize)."""
    data = load_digits()
    scaled = data.images.astype(np.float32) / 16.0
    big = np.stack([np.asarray(Image.fromarray(x).resize((32, 32), Image.BILINEAR))
                    for x in scaled])
    return np.clip(np.round(big * 255.0), 0, 255).astype(np.uint8), data.target


@pytest.mark.parametrize("task, sizes, digit_offset", [
    ("digits", TARGET_SIZES, 5),
    ("digits_source", SOURCE_SIZES, 0),
])
def test_shipped_task_is_vtab1k_and_matches_sklearn(task, sizes, digit_offset, digits):
    expected_images, targets = digits
    task_dir = DATA / task
    lists = {split: read_list(task_dir, split) for split in sizes}
    for split, items in lists.items():
        assert len(items) == sizes[split], split
        assert all(path.startswith(f"images/{split}/") and path.endswith(".png")
                   for path, _ in items)
        labels = np.array([label for _, label in items])
        assert set(labels) == set(range(5))
        indices = [digits_index(path) for path, _ in items]
        # Each image is load_digits()[index], relabelled: digit 5 -> 0 for the target task.
        np.testing.assert_array_equal(labels, targets[indices] - digit_offset)
        images = read_images(task_dir, items)
        np.testing.assert_allclose(images.astype(int), expected_images[indices][..., None]
                                   .repeat(3, -1).astype(int), atol=1)
    train, val, test = ({digits_index(p) for p, _ in lists[s]}
                        for s in ("train800", "val200", "test"))
    assert not (train & val or train & test or val & test)
    assert {digits_index(p) for p, _ in lists["train800val200"]} == train | val
    assert len(train | val | test) == int(np.isin(targets, range(digit_offset,
                                                                    digit_offset + 5)).sum())


def test_fewshot_lists_have_k_per_class_from_train800():
    train = set(read_list(DATA / "digits", "train800"))
    for seed in SEEDS:
        previous: set = set()
        for shots in SHOTS:
            items = read_list(DATA / "digits", f"train_shot{shots}_seed{seed}")
            assert np.bincount([label for _, label in items]).tolist() == [shots] * 5
            assert set(items) <= train
            assert previous <= set(items)  # nested within a seed
            previous = set(items)
    assert (set(read_list(DATA / "digits", "train_shot16_seed0"))
            != set(read_list(DATA / "digits", "train_shot16_seed1")))


@pytest.mark.parametrize("split, train_size", [("train800", 200), ("train_shot4_seed1", 20)])
def test_vtab1k_datamodule_reads_the_demo_task(split, train_size):
    dm = VTAB1kDataModule(DATA, "digits", split=split, batch_size=1000, num_workers=0,
                          image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert dm.num_classes == 5
    dm.setup("fit")
    dm.setup("test")
    expected = {"train": train_size, "val": 100, "test": 596}
    for name, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader()),
                         ("test", dm.test_dataloader())):
        images, labels = next(iter(loader))
        assert images.shape == (expected[name], 3, 32, 32) and images.dtype == torch.float32
        assert -1.0 <= images.min() < images.max() <= 1.0  # mean/std 0.5 maps [0, 255] to [-1, 1]
        assert sorted(set(labels.tolist())) == list(range(5))


def test_backbone_loads_in_plain_timm_and_knows_the_source_digits():
    info = json.loads(BACKBONE_JSON.read_text())
    assert info["timm_model"] == "vit_tiny_patch16_224" and info["model_kwargs"] == KWARGS
    model = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(BACKBONE)), **KWARGS)
    state = model.state_dict()
    with safe_open(str(BACKBONE), framework="pt") as f:
        assert set(f.keys()) == set(state) - {"head.weight", "head.bias"}
        for key in f.keys():
            torch.testing.assert_close(state[key], f.get_tensor(key), rtol=0, atol=0)

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        items = read_list(DATA / "digits_source", split)
        images = torch.from_numpy(read_images(DATA / "digits_source", items)).permute(0, 3, 1, 2)
        x = (images.float() / 255.0 - 0.5) / 0.5
        with torch.no_grad():
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
        return feats, torch.tensor([label for _, label in items])

    # A nearest-class-mean classifier on frozen features: no training, no head needed.
    model.eval()
    train_x, train_y = features("train800val200")
    test_x, test_y = features("test")
    means = torch.stack([train_x[train_y == c].mean(0) for c in range(5)])
    predictions = torch.cdist(test_x, means).argmin(1)
    assert (predictions == test_y).float().mean() > 0.85  # chance is 0.2


def test_make_demo_data_is_reproducible(tmp_path):
    script = load_script("make_demo_data")
    script.main(["--out", str(tmp_path)])
    for task in ("digits", "digits_source"):
        shipped = sorted(p.relative_to(DATA / task) for p in (DATA / task).rglob("*.*"))
        assert shipped == sorted(p.relative_to(tmp_path / task)
                                 for p in (tmp_path / task).rglob("*.*"))
        for name in shipped:
            if name.suffix == ".txt":
                assert (tmp_path / task / name).read_bytes() == (DATA / task / name).read_bytes()
            else:
                with Image.open(tmp_path / task / name) as rebuilt:
                    with Image.open(DATA / task / name) as original:
                        np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(original))
    with pytest.raises(FileExistsError, match=r"digits exists and is not empty.*--overwrite"):
        script.main(["--out", str(tmp_path)])
