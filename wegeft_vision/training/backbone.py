"""Create the timm backbone by name, with hub weights, a local weights file or a seeded random init.

Bad names and unusable weight files fail here, before any data is read, with the closest timm
names or the mismatching tensors in the message.
"""
from __future__ import annotations

import difflib
import os
import socket
import sys
from urllib.parse import urlparse
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import timm
import torch
from torch import nn

from ..adapters.targets import head_parameter_names
from ..errors import MissingFileError, UserError

WEIGHT_SUFFIXES: tuple[str, ...] = (".npz", ".safetensors", ".pth", ".pt", ".bin")


class WeightsUnreachableError(UserError, ConnectionError):
    """timm's pretrained weights are neither cached nor downloadable here."""


def _close_names(name: str, candidates: Iterable[str], n: int = 5) -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(matches)}?" if matches else ""


def check_model_name(name: str, needs_pretrained_tag: bool) -> None:
    """Raise UserError for a name timm does not know, or a pretrained tag it has no weights for."""
    if not isinstance(name, str) or not name:
        raise UserError(f"backbone must be a timm model name, got {name!r}")
    if not timm.is_model(name):
        raise UserError(f"unknown timm backbone {name!r}"
                        f"{_close_names(name, timm.list_models() + timm.list_pretrained())}")
    if needs_pretrained_tag and "." in name and name not in timm.list_pretrained():
        arch = name.split(".", 1)[0]
        raise UserError(f"timm has no pretrained weights {name!r}"
                        f"{_close_names(name, timm.list_pretrained(arch + '*'))}")


def check_weights_file(path: Union[str, Path]) -> Path:
    """The weights file as a Path, or MissingFileError/UserError naming what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"weights_path {path} does not exist")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"weights_path {path} has suffix {path.suffix!r}; expected one of "
                        f"{', '.join(WEIGHT_SUFFIXES)}")
    return path


def _weights_cached(cfg: Any) -> bool:
    """Whether timm would find the pretrained weights on disk (huggingface_hub or torch.hub's
    cache) without going online."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else [
            "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str)
               for f in names):
            return True
    if cfg.url:
        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
                ).is_file()
    return False


def check_hub_reachable(name: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not after a minute of download retries, when timm's pretrained weights
    are neither cached nor reachable (HF_HUB_OFFLINE set, or no connection to the hub)."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        return  # timm raises its own error for a tag without weights
    if cfg is None or _weights_cached(cfg):
        return
    advice = ("download the weights file where there is internet and pass it as "
              "--model.weights_path (ViTClassifier(weights_path=...)), or set pretrained false "
              "for a random backbone")
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise WeightsUnreachableError(f"timm's pretrained weights for {name!r} are not in the "
                                      f"local cache and HF_HUB_OFFLINE is set: {advice}")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # only a download through the proxy can tell
    url = (os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.hf_hub_id
           else cfg.url)
    if not url:
        return
    host = urlparse(url)
    try:
        socket.create_connection((host.hostname, host.port or (443 if host.scheme == "https"
                                                                 else 80)), timeout).close()
    except OSError as err:
        raise WeightsUnreachableError(f"timm's pretrained weights for {name!r} are not in the "
                                      f"local cache and {host.netloc} cannot be reached ({err}): "
                                      f"{advice}") from err


def create_backbone(name: str, num_classes: int, *, pretrained: bool = True,
                    weights_path: Optional[Union[str, Path]] = None,
                    drop_path_rate: float = 0.0, init_seed: int = 0,
                    backbone_kwargs: Optional[dict[str, Any]] = None) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head.

    Args:
        name: timm model name, optionally with a pretrained tag
            (``vit_base_patch16_224.augreg_in21k``).
        num_classes: classes of the new head.
        pretrained: load timm's pretrained weights (downloaded or from the local cache).
        weights_path: load weights from this local file instead: ``.npz`` through the model's
            own npz loader (Google's ``ViT-B_16.npz``), ``.safetensors``/``.pth`` as a timm state
            dict, passed through the model's timm checkpoint filter. Every backbone tensor must
            be in the file; a classifier head in it is ignored.
        drop_path_rate: stochastic depth rate.
        init_seed: seeds the random initialisation, so that the frozen part of a checkpoint
            trained on a random backbone (``pretrained=False``) can be re-created.
        backbone_kwargs: further ``timm.create_model`` arguments (``img_size``, ``depth``, ...).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise UserError(f"num_classes must be a positive int, got {num_classes!r}")
    kwargs = dict(backbone_kwargs or {})
    path = None if weights_path is None else check_weights_file(weights_path)
    from_hub = pretrained and path is None
    check_model_name(name, needs_pretrained_tag=from_hub)
    if from_hub:
        check_hub_reachable(name)
    # .npz files go through the model's own loader, which timm calls for custom_load configs.
    overlay = dict(file=str(path), custom_load=True) if path and path.suffix == ".npz" else None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = timm.create_model(name, pretrained=from_hub or overlay is not None,
                                      num_classes=num_classes, drop_path_rate=drop_path_rate,
                                      pretrained_cfg_overlay=overlay, **kwargs)
    except TypeError as err:
        raise UserError(f"backbone_kwargs {kwargs} do not fit timm model {name!r}: "
                        f"{err}") from err
    except (RuntimeError, KeyError) as err:
        if overlay is None:
            raise
        raise UserError(f"weights {path} do not fit timm model {name!r} created with {kwargs}: "
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
        raise UserError(f"weights {path} do not fit {what}: {err}") from err
    missing = [k for k in result.missing_keys if k not in head]
    if missing or result.unexpected_keys:
        raise UserError(f"weights {path} do not fit {what}: missing {_some(missing)}, "
                        f"unexpected {_some(result.unexpected_keys)}")


def _some(keys: list[str], n: int = 6) -> str:
    return "none" if not keys else ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)"
                                                          if len(keys) > n else "")
