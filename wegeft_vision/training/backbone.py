"""Create the timm backbone by name, with hub weights, a local weights file or a seeded random init.

Bad names and unusable weight files fail here, before any data is read, with the closest timm
names or the mismatching tensors in the message.
"""
from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import timm
import torch
from torch import nn

WEIGHT_SUFFIXES: tuple[str, ...] = (".npz", ".safetensors", ".pth", ".pt", ".bin")


def _close_names(name: str, candidates: Iterable[str], n: int = 5) -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(matches)}?" if matches else ""


def check_model_name(name: str, needs_pretrained_tag: bool) -> None:
    """Raise ValueError for a name timm does not know, or a pretrained tag it has no weights for."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone must be a timm model name, got {name!r}")
    if not timm.is_model(name):
        raise ValueError(f"unknown timm backbone {name!r}"
                         f"{_close_names(name, timm.list_models() + timm.list_pretrained())}")
    if needs_pretrained_tag and "." in name and name not in timm.list_pretrained():
        arch = name.split(".", 1)[0]
        raise ValueError(f"timm has no pretrained weights {name!r}"
                         f"{_close_names(name, timm.list_pretrained(arch + '*'))}")


def check_weights_file(path: Union[str, Path]) -> Path:
    """The weights file as a Path, or FileNotFoundError/ValueError naming what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint_path {path} does not exist")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"checkpoint_path {path} has suffix {path.suffix!r}; expected one of "
                         f"{', '.join(WEIGHT_SUFFIXES)}")
    return path


def create_backbone(name: str, num_classes: int, *, pretrained: bool = True,
                    checkpoint_path: Optional[Union[str, Path]] = None,
                    drop_path_rate: float = 0.0, init_seed: int = 0,
                    backbone_kwargs: Optional[dict[str, Any]] = None) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head.

    Args:
        name: timm model name, optionally with a pretrained tag
            (``vit_base_patch16_224.augreg_in21k``).
        num_classes: classes of the new head.
        pretrained: load timm's pretrained weights (downloaded or from the local cache).
        checkpoint_path: load weights from this local file instead (``.npz`` through the model's
            own npz loader, e.g. Google's ``ViT-B_16.npz``; ``.safetensors``/``.pth`` as a timm
            state dict). A classifier head in the file is dropped when its size differs.
        drop_path_rate: stochastic depth rate.
        init_seed: seeds the random initialisation when no weights are loaded, so that the frozen
            part of a checkpoint trained on a random backbone can be re-created.
        backbone_kwargs: further ``timm.create_model`` arguments (``img_size``, ``depth``, ...).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    kwargs = dict(backbone_kwargs or {})
    overlay: Optional[dict[str, Any]] = None
    if checkpoint_path is not None:
        path = check_weights_file(checkpoint_path)
        # custom_load routes a file to the model's own loader, which is what reads .npz.
        overlay = dict(file=str(path), custom_load=path.suffix == ".npz")
    check_model_name(name, needs_pretrained_tag=pretrained and overlay is None)
    load = pretrained or overlay is not None
    source = f"weights {checkpoint_path}" if overlay is not None else "timm's pretrained weights"
    try:
        with torch.random.fork_rng(devices=[], enabled=not load):
            if not load:
                torch.manual_seed(init_seed)
            return timm.create_model(name, pretrained=load, num_classes=num_classes,
                                     drop_path_rate=drop_path_rate,
                                     pretrained_cfg_overlay=overlay, **kwargs)
    except TypeError as err:
        raise ValueError(f"backbone_kwargs {kwargs} do not fit timm model {name!r}: {err}") from err
    except RuntimeError as err:
        if not load:
            raise
        raise ValueError(f"{source} do not fit timm model {name!r} created with {kwargs}: "
                         f"{err}") from err


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes: tells two sets of frozen weights apart."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensors[name].shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
