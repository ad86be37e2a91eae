"""Create the timm backbone by name, with hub weights, a local weights file or a seeded random init.

Bad names and unusable weight files fail here, before any data is read, with the closest timm
names or the mismatching tensors in the message.
"""
from __future__ import annotations

import difflib
import hashlib
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import timm
import torch
from torch import nn

from ..adapters.model import head_parameter_names

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
        checkpoint_path: load weights from this local file instead: ``.npz`` through the model's
            own npz loader (Google's ``ViT-B_16.npz``), ``.safetensors``/``.pth`` as a timm state
            dict, passed through the model's timm checkpoint filter. Every backbone tensor must
            be in the file; a classifier head in it is ignored.
        drop_path_rate: stochastic depth rate.
        init_seed: seeds the random initialisation, so that the frozen part of a checkpoint
            trained on a random backbone (``pretrained=False``) can be re-created.
        backbone_kwargs: further ``timm.create_model`` arguments (``img_size``, ``depth``, ...).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    kwargs = dict(backbone_kwargs or {})
    path = None if checkpoint_path is None else check_weights_file(checkpoint_path)
    from_hub = pretrained and path is None
    check_model_name(name, needs_pretrained_tag=from_hub)
    # .npz files go through the model's own loader, which timm calls for custom_load configs.
    overlay = dict(file=str(path), custom_load=True) if path and path.suffix == ".npz" else None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = timm.create_model(name, pretrained=from_hub or overlay is not None,
                                      num_classes=num_classes, drop_path_rate=drop_path_rate,
                                      pretrained_cfg_overlay=overlay, **kwargs)
    except TypeError as err:
        raise ValueError(f"backbone_kwargs {kwargs} do not fit timm model {name!r}: {err}") from err
    except (RuntimeError, KeyError) as err:
        if overlay is None:
            raise
        raise ValueError(f"weights {path} do not fit timm model {name!r} created with {kwargs}: "
                         f"{err!r}") from err
    if path is not None and overlay is None:
        _load_weights_file(model, path, f"timm model {name!r} created with {kwargs}")
    return model


def _load_weights_file(model: nn.Module, path: Path, what: str) -> None:
    """Load a state-dict file strictly, except for the classifier head.

    timm's own file loading turns strict checking off whenever the class count differs from the
    pretrained config's, so a file of another architecture would load partly and silently.
    """
    state = timm.models.load_state_dict(str(path), weights_only=True)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    head = set(head_parameter_names(model))
    state = {k: v for k, v in state.items() if k not in head}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"weights {path} do not fit {what}: {err}") from err
    missing = [k for k in result.missing_keys if k not in head]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights {path} do not fit {what}: missing {_some(missing)}, "
                         f"unexpected {_some(result.unexpected_keys)}")


def _some(keys: list[str], n: int = 6) -> str:
    return "none" if not keys else ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)"
                                                          if len(keys) > n else "")


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes: tells two sets of frozen weights apart."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensors[name].shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
