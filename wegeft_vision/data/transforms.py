"""Normalisation from the backbone's timm data config, and the benchmarks' image pipelines.

Every pipeline is split in two so decoded images can be cached: ``prepare`` (deterministic, PIL
image in, uint8 tensor out: the resize, and for evaluation also the centre crop) and ``finish``
(random augmentation if any, then float conversion and normalisation). A cached image is the
output of ``prepare``, so cached and uncached loading give identical tensors by construction.
``prepare`` resizes with PIL, as the benchmarks' reference code (NOAH, VPT) and timm's eval
transform do: torch's antialiased resize of uint8 tensors rounds differently (by up to 6 grey
levels after a bicubic downscale of a noisy image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import timm
import torch
from timm.data import resolve_data_config
from torchvision.transforms import InterpolationMode, v2

from ..errors import UserError
from .checks import optional_int
from .registry import did_you_mean

Triple = tuple[float, float, float]
# VPT's FGVC recipe at 224 px: resize the short side to 256, crop 224. Other sizes follow timm's
# rule, short side floor(size / crop_pct), so timm's own eval transform reproduces ours.
FGVC_CROP_PCT = 224 / 256


@dataclass(frozen=True)
class DataConfig:
    """Input size (height, width), normalisation and resize interpolation."""

    input_size: tuple[int, int]
    mean: Triple
    std: Triple
    interpolation: str


# The modes both PIL and timm's interpolation names know.
INTERPOLATIONS: tuple[InterpolationMode, ...] = (
    InterpolationMode.NEAREST, InterpolationMode.BILINEAR, InterpolationMode.BICUBIC,
    InterpolationMode.BOX, InterpolationMode.HAMMING, InterpolationMode.LANCZOS)


def _interpolation_mode(name: str) -> InterpolationMode:
    for mode in INTERPOLATIONS:
        if mode.value == name.lower():
            return mode
    known = ", ".join(mode.value for mode in INTERPOLATIONS)
    raise UserError(f"unknown interpolation {name!r}; use one of {known}")


def _triple(value: Optional[tuple[float, ...]], name: str) -> Optional[Triple]:
    if value is None:
        return None
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise UserError(f"{name} must hold 3 values (one per RGB channel), got {value!r}")
    if name == "std" and min(value) <= 0:
        raise UserError(f"std must be positive, got {value!r}")
    return value  # type: ignore[return-value]


def backbone_data_config(backbone: Optional[str] = None, image_size: Optional[int] = None,
                         mean: Optional[tuple[float, ...]] = None,
                         std: Optional[tuple[float, ...]] = None,
                         interpolation: Optional[str] = None) -> DataConfig:
    """Merge explicit values, the backbone's timm pretrained config and timm's defaults.

    Explicit values win over the pretrained config, which wins over timm's defaults (224 px,
    ImageNet mean/std, bicubic). ``backbone`` may carry a pretrained tag
    (``vit_base_patch16_224.augreg_in21k``); only its config is read, no weights are fetched.
    """
    pretrained_cfg = None
    if backbone is not None:
        if not timm.is_model(backbone):
            raise UserError(f"unknown timm model {backbone!r}"
                            f"{did_you_mean(backbone, timm.list_models())}")
        cfg = timm.models.get_pretrained_cfg(backbone)
        pretrained_cfg = None if cfg is None else cfg.to_dict()
    optional_int(image_size, "image_size", 1)
    args = {"img_size": image_size, "mean": _triple(mean, "mean"), "std": _triple(std, "std"),
            "interpolation": interpolation}
    resolved = resolve_data_config(args, pretrained_cfg=pretrained_cfg)
    _, height, width = resolved["input_size"]
    return DataConfig((int(height), int(width)), tuple(resolved["mean"]),  # type: ignore[arg-type]
                      tuple(resolved["std"]), _interpolation_mode(resolved["interpolation"]).value)


@dataclass(frozen=True)
class SplitTransform:
    """``prepare`` (deterministic, PIL to uint8) then ``finish`` (augment, float, normalise).

    ``crop_pct`` and ``crop_mode`` name the geometry in timm's terms: "squash" with 1.0 resizes
    to the input size; "center" resizes the short side to ``floor(size / crop_pct)`` and crops.
    """

    prepare: v2.Transform
    finish: v2.Transform
    augments: bool
    crop_pct: float = 1.0
    crop_mode: str = "squash"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.finish(self.prepare(image))


def _finish(config: DataConfig, augment: list[v2.Transform]) -> v2.Compose:
    return v2.Compose([*augment, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(config.mean), list(config.std))])


def resize_transform(config: DataConfig) -> SplitTransform:
    """VTAB-1k: resize to the input size (square for ViTs), no augmentation."""
    mode = _interpolation_mode(config.interpolation)
    return SplitTransform(v2.Compose([v2.Resize(config.input_size, interpolation=mode),
                                      v2.PILToTensor()]), _finish(config, []), augments=False)


def crop_transform(config: DataConfig, train: bool) -> SplitTransform:
    """FGVC: short side to 256/224 of the input size (floored, as timm does), then random crop +
    flip or centre crop."""
    mode = _interpolation_mode(config.interpolation)
    short_side = math.floor(min(config.input_size) / FGVC_CROP_PCT)
    resize = v2.Resize(short_side, interpolation=mode)
    geometry = {"crop_pct": FGVC_CROP_PCT, "crop_mode": "center"}
    if train:
        augment = [v2.RandomCrop(config.input_size), v2.RandomHorizontalFlip(0.5)]
        return SplitTransform(v2.Compose([resize, v2.PILToTensor()]),
                              _finish(config, augment), augments=True, **geometry)
    return SplitTransform(v2.Compose([resize, v2.CenterCrop(config.input_size), v2.PILToTensor()]),
                          _finish(config, []), augments=False, **geometry)


def timm_eval_config(config: DataConfig, transform: SplitTransform) -> dict[str, Any]:
    """A timm ``pretrained_cfg``-style dict for which
    ``timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg))`` does
    what the evaluation ``transform`` does (to within the rounding of PIL's vs torch's resize).

    Raises UserError for a centre crop to a non-square size, which timm resizes another way.
    """
    height, width = config.input_size
    if transform.crop_mode == "center" and height != width:
        raise UserError(f"timm's centre crop resizes a non-square input size {height}x{width} "
                        "differently from ours; use a square image_size")
    return {"input_size": (3, height, width), "mean": config.mean, "std": config.std,
            "interpolation": config.interpolation, "crop_pct": transform.crop_pct,
            "crop_mode": transform.crop_mode}
