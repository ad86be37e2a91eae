"""Evaluation preprocessing: every datamodule's ``eval_data_config()`` drives timm's own eval
transform to the datamodule's test tensors."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from _data_helpers import CHECK_KINDS, make_datamodule
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
