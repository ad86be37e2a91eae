"""What every datamodule's loaders give: the normalised pixels, computed here with PIL and numpy,
on the train, val, test and predict loaders; and ``eval_data_config()``, which drives timm's own
eval transform to the same tensors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tests.helpers.data import CHECK_KINDS, CHECK_SIZES, make_datamodule, write_image
from wegeft_vision.data import DataConfig, VTAB1kDataModule, load_rgb
from wegeft_vision.data.transforms import crop_transform, timm_eval_config

MEAN, STD = (0.2, 0.4, 0.6), (0.1, 0.2, 0.3)
COMMON = {"image_size": 16, "mean": MEAN, "std": STD, "batch_size": 64, "num_workers": 0}
CENTER = {"crop_pct": 224 / 256, "crop_mode": "center"}
SQUASH = {"crop_pct": 1.0, "crop_mode": "squash"}
GEOMETRY = {"vtab": SQUASH, "fgvc": CENTER, "fewshot": CENTER, "fewshot_resize": SQUASH,
            "folder": CENTER, "folder_resize": SQUASH}


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("kind", CHECK_KINDS)
def test_timm_eval_transform_reproduces_the_test_tensors(tmp_path, kind, interpolation):
    dm = make_datamodule(kind, tmp_path, interpolation=interpolation, **COMMON)
    config = dm.eval_data_config()
    assert config == {"input_size": (3, 16, 16), "mean": MEAN, "std": STD,
                      "interpolation": interpolation, **GEOMETRY[kind]}
    # Through JSON, as an exported config.json holds it.
    transform = timm.data.create_transform(
        **timm.data.resolve_data_config(pretrained_cfg=json.loads(json.dumps(config))))
    dm.setup("test")
    images, labels = next(iter(dm.test_dataloader()))
    samples = dm.datasets["test"].samples
    expected = torch.stack([transform(load_rgb(samples[i].path)) for i in labels.tolist()])
    # Both resize with PIL: the only difference left is float32 rounding (measured: at most
    # 9.5e-7 here, 2.4e-5 of a grey level).
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)


def test_eval_config_of_a_backbone_and_of_non_square_crops(tmp_path):
    dm = VTAB1kDataModule(tmp_path, "cifar", backbone="vit_base_patch16_224.augreg_in21k")
    assert dm.eval_data_config() == {
        "input_size": (3, 224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "squash"}
    config = DataConfig((16, 24), MEAN, STD, "bilinear")
    with pytest.raises(ValueError, match=r"timm's centre crop resizes a non-square input size "
                       r"16x24 differently from ours; use a square image_size"):
        timm_eval_config(config, crop_transform(config, train=False))


def expected_pixels(path, kind: str) -> np.ndarray:
    """The uint8 pixels [H, W, 3] a split without random crop must start from, computed with PIL
    and numpy: squash kinds resize to 16x16; the others resize the short side to
    floor(16 * 256 / 224) = 18 (the long side to int(18 * long / short)) and keep it all (the
    centre crop is cut by the caller)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        if GEOMETRY[kind] is SQUASH:
            size = (16, 16)
        elif width <= height:
            size = (18, int(18 * height / width))
        else:
            size = (int(18 * width / height), 18)
        if image.size != size:
            image = image.resize(size, Image.BICUBIC)  # timm's default interpolation
        return np.asarray(image)


def normalised(pixels: np.ndarray) -> np.ndarray:
    return (pixels / 255 - np.array(MEAN)) / np.array(STD)


def centre(pixels: np.ndarray) -> np.ndarray:
    top, left = (round((n - 16) / 2) for n in pixels.shape[:2])
    return pixels[top:top + 16, left:left + 16]


def windows(pixels: np.ndarray) -> np.ndarray:
    """Every 16x16 window of ``pixels`` [H, W, 3], and each flipped left-right: [N, 16, 16, 3]."""
    views = np.lib.stride_tricks.sliding_window_view(pixels, (16, 16), axis=(0, 1))
    views = views.transpose(0, 1, 3, 4, 2).reshape(-1, 16, 16, 3)
    return np.concatenate([views, views[:, :, ::-1]])


@pytest.mark.parametrize("kind", CHECK_KINDS)
def test_every_loader_gives_the_normalised_pixels(tmp_path, kind):
    predict_root = tmp_path / "new"
    for index, size in enumerate(CHECK_SIZES):
        write_image(predict_root / f"p{index}.png", 60 + index, size=size)
    loaders = {}
    for root in (None, predict_root):
        dm = make_datamodule(kind, tmp_path / "data", predict_root=root, **COMMON)
        dm.setup()
        loaders[root] = dm
    augments = GEOMETRY[kind] is CENTER
    dm = loaders[predict_root]
    checks = [("train", dm.train_dataloader()), ("val", dm.val_dataloader()),
              ("test", dm.test_dataloader()), ("predict", dm.predict_dataloader()),
              ("test", loaders[None].predict_dataloader())]  # without predict_root: test
    for split, loader in checks:
        samples = dm.datasets[split].samples
        seen = 0
        for images, labels in loader:
            for image, label in zip(images.permute(0, 2, 3, 1).numpy(), labels.tolist()):
                sample = samples[label] if split != "predict" else samples[seen]
                pixels = expected_pixels(sample.path, kind)
                if split == "train" and augments:
                    error = np.abs(normalised(windows(pixels)) - image).max(axis=(1, 2, 3)).min()
                else:
                    pixels = centre(pixels) if GEOMETRY[kind] is CENTER else pixels
                    error = np.abs(normalised(pixels) - image).max()
                assert error < 1e-5, (split, sample.path, error)
                seen += 1
        assert seen == len(samples)
    assert [s.path.name for s in dm.datasets["predict"].samples] == [
        f"p{i}.png" for i in range(len(CHECK_SIZES))]
