"""Put an adapter on a timm model, fold it in and out, take it off, save and load it, count it.

The verbs work on any registered method (:mod:`.base`). The adapter's own tensors live in one
place, the container ``model.adapter``; which parameters train, what an adapter file holds and
what merging folds in all derive from that container and the method's config.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import MissingFileError, UserError
from .base import AdapterConfig, AdapterLayer
from .targets import head_parameter_names, replace_module

ADAPTER_ATTR = "adapter"
FILE_FORMAT = "wegeft_vision.adapter/3"


class AdapterContainer(nn.Module):
    """The adapter's config and its trainable modules, each registered exactly once."""

    def __init__(self, config: AdapterConfig, edits: dict[str, nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.edits = nn.ModuleDict(edits)
        self.merged = False

    def extra_repr(self) -> str:
        return f"config={self.config}" + (", merged" if self.merged else "")


def get_adapter(model: nn.Module) -> Optional[AdapterContainer]:
    container = getattr(model, ADAPTER_ATTR, None)
    return container if isinstance(container, AdapterContainer) else None


def _require_adapter(model: nn.Module, action: str, unmerged: bool = False) -> AdapterContainer:
    container = get_adapter(model)
    if container is None:
        raise UserError(f"cannot {action}: {type(model).__name__} has no adapter "
                        "(call apply_adapter first)")
    if unmerged and container.merged:
        raise UserError(f"cannot {action}: the adapter is merged into the weights; call "
                        "unmerge_adapter(model) first")
    return container


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """The modules a method put into the model, by path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """The parameters an adapter trains: its container's, the head's and the method's extras."""
    container = _require_adapter(model, "list trainable parameters")
    names = [f"{ADAPTER_ATTR}.{n}" for n, _ in container.named_parameters()]
    names += head_parameter_names(model) + container.config.extra_trainable(model)
    return list(dict.fromkeys(names))


def apply_adapter(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Adapt ``model`` in place: freeze the backbone, attach the adapter, keep the head trainable.

    Adapted layers stay at their module paths (``blocks.3.attn.qkv``) and keep the original
    module as ``base_layer``.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an adapter config (e.g. WeGeFTConfig), got "
                        f"{type(config).__name__}")
    existing = get_adapter(model)
    if existing is not None:
        raise UserError(f"{type(model).__name__} already has an adapter ({existing.config}); "
                        "merge_adapter or remove_adapter it first")
    if hasattr(model, ADAPTER_ATTR):
        raise UserError(f"{type(model).__name__} already has an attribute {ADAPTER_ATTR!r}")
    edits = config.inject(model)
    setattr(model, ADAPTER_ATTR, AdapterContainer(config, edits))
    model.train(model.training)  # the new modules in the model's mode (eval stays eval)
    trainable = set(trainable_parameter_names(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return model


def merge_adapter(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold the adapter into the weights, computed in float64 and checked to be finite.

    ``unload=True``: take the adapter off too, leaving the plain timm model (exactly its
    state-dict keys; every parameter trainable again, as in a freshly created model).
    ``unload=False``: fold in place and keep the adapter; :func:`unmerge_adapter` restores the
    saved weights bit for bit. While merged, training, saving an adapter file and merging again
    are refused. All or nothing: if one layer fails, none stays merged.
    """
    container = _require_adapter(model, "merge")
    reason = container.config.cannot_merge
    if reason:
        raise UserError(f"cannot merge {type(container.config).__name__}: {reason}")
    if container.merged and not unload:
        raise UserError("the adapter is merged already; unmerge_adapter(model) first")
    done: list[AdapterLayer] = []
    try:
        for name, layer in adapter_layers(model).items():
            if not layer.merged:
                try:
                    layer.merge()
                except UserError as err:
                    raise UserError(f"layer {name!r}: {err}") from None
                done.append(layer)
    except BaseException:
        for layer in done:
            layer.unmerge()
        raise
    container.merged = True
    return _unload(model, merge=True) if unload else model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapter` ``(unload=False)``: every saved weight restored bit for bit."""
    container = _require_adapter(model, "unmerge")
    if not container.merged:
        raise UserError("the adapter is not merged (merge_adapter(model, unload=False) merges "
                        "it in place)")
    for layer in adapter_layers(model).values():
        if layer.merged:
            layer.unmerge()
    container.merged = False
    return model


def remove_adapter(model: nn.Module) -> nn.Module:
    """Take the adapter off and restore the original modules, unchanged; every parameter is
    trainable again, as in a freshly created model."""
    _require_adapter(model, "remove the adapter")
    return _unload(model, merge=False)


def _unload(model: nn.Module, merge: bool) -> nn.Module:
    container = get_adapter(model)
    for name, layer in adapter_layers(model).items():
        replace_module(model, name, layer.unload(merge))
    container.config.on_unload(model, merge)
    delattr(model, ADAPTER_ATTR)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors only (the adapter's, the head's, the method's extras), detached."""
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in trainable_parameter_names(model)}


def fingerprint(tensors: dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None) -> str:
    """SHA-256 over names, shapes, dtypes and bytes: tells two sets of tensors apart.

    ``dtype``: hash floating-point tensors cast to it (e.g. ``torch.bfloat16``: then a model in
    float32, float64 or bfloat16 with the same bfloat16-rounded weights gives one fingerprint).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous().reshape(-1)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        digest.update(f"{name}:{tuple(tensors[name].shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_fingerprint(model: nn.Module) -> str:
    """The identity of the frozen weights an adapter belongs to (the adapter must be applied).

    Hashes every state-dict tensor the adapter does not train, under the plain model's names
    (``base_layer`` levels removed), rounded to bfloat16: the same for the model in float32,
    float64 or bfloat16. Checkpoints and adapter files both use it.
    """
    trainable = set(trainable_parameter_names(model))
    frozen = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
              if k not in trainable and not k.startswith(ADAPTER_ATTR + ".")}
    return fingerprint(frozen, dtype=torch.bfloat16)


def _identity(model: nn.Module) -> dict[str, object]:
    """What identifies the backbone an adapter belongs to."""
    cfg = getattr(model, "pretrained_cfg", None)
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "architecture": cfg.get("architecture") if isinstance(cfg, dict) else None,
        "layers": {n: list(getattr(m.base_layer, "weight", torch.empty(0)).shape)
                   for n, m in adapter_layers(model).items()},
        "frozen_fingerprint": frozen_fingerprint(model),
    }


def save_adapter(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write the trainable tensors, the config and the backbone's identity to a safetensors file.

    The identity (checked by :func:`load_adapter`): model class and timm architecture, the
    adapted layers and their shapes, and a fingerprint of the frozen weights.
    """
    container = _require_adapter(model, "save an adapter", unmerged=True)
    path = Path(path)
    tensors = {n: t.contiguous().cpu() for n, t in adapter_state_dict(model).items()}
    metadata = {"format": FILE_FORMAT, "config": json.dumps(container.config.to_dict()),
                "identity": json.dumps(_identity(model))}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _read(path: Path) -> tuple[AdapterConfig, dict[str, torch.Tensor], dict]:
    if not path.is_file():
        raise MissingFileError(f"adapter file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FILE_FORMAT:
            raise UserError(f"{path} is not a wegeft_vision adapter file (format "
                            f"{metadata.get('format')!r}, expected {FILE_FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = AdapterConfig.from_dict(json.loads(metadata["config"]))
    return config, tensors, json.loads(metadata["identity"])


def read_adapter_file(path: Union[str, Path]) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an adapter file, checked to be one."""
    config, tensors, _ = _read(Path(path))
    return config, tensors


def _some(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _check_identity(saved: dict, model: nn.Module, path: Path) -> None:
    """Refuse a file saved from another backbone, naming the first difference."""
    here = _identity(model)
    hint = "; pass check_backbone=False to load it anyway (deliberate transfer)"
    for key in ("model_class", "architecture"):
        if saved.get(key) and here[key] and saved[key] != here[key]:
            raise UserError(f"{path} was saved from a {saved[key]} backbone; this model is a "
                            f"{here[key]} ({key.replace('_', ' ')}){hint}")
    layers, ours = saved["layers"], here["layers"]
    if layers != ours:
        only_file = [n for n in layers if n not in ours]
        only_here = [n for n in ours if n not in layers]
        shapes = [f"{n} ({'x'.join(map(str, layers[n]))} in the file, "
                  f"{'x'.join(map(str, ours[n]))} here)"
                  for n in layers if n in ours and layers[n] != ours[n]]
        what = "; ".join(text for text in (
            only_file and f"adapted in the file only: {_some(only_file)}",
            only_here and f"adapted in this model only: {_some(only_here)}",
            shapes and f"other shapes: {_some(shapes)}") if text)
        raise UserError(f"{path} adapts {len(layers)} layers, this model {len(ours)}: the "
                        f"backbones differ ({what}){hint}")
    if saved["frozen_fingerprint"] != here["frozen_fingerprint"]:
        raise UserError(f"{path} was trained on other frozen weights than this model's "
                        f"(fingerprint {saved['frozen_fingerprint'][:12]} in the file, "
                        f"{here['frozen_fingerprint'][:12]} here){hint}")


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor],
                   params: dict[str, nn.Parameter], expected: list[str]) -> None:
    missing = [n for n in expected if n not in tensors]
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path} does not fit this model: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    for name in expected:
        tensor = tensors[name]
        if params[name].shape != tensor.shape:
            raise UserError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model "
                            f"expects {tuple(params[name].shape)} (different backbone or number "
                            "of classes?)")
        if not tensor.is_floating_point():
            raise UserError(f"{path}: tensor {name!r} has dtype {tensor.dtype}; adapter tensors "
                            "are floating point")
        if not torch.isfinite(tensor).all():
            raise UserError(f"{path}: tensor {name!r} holds non-finite values (NaN or inf)")


def load_adapter(model: nn.Module, path: Union[str, Path], check_backbone: bool = True
                 ) -> nn.Module:
    """Load an adapter file into ``model``, applying the file's config first if it has none.

    All or nothing: every tensor is checked (names, shapes, floating point, finite) before any
    is copied, so on any error the model is left exactly as it was. ``check_backbone``: refuse a
    file saved from another backbone (class, timm architecture, adapted layers and shapes, frozen
    weights); False loads it wherever the tensors fit (a deliberate transfer).
    """
    path = Path(path)
    config, tensors, identity = _read(path)
    container = get_adapter(model)
    if container is not None:
        _require_adapter(model, "load an adapter", unmerged=True)
        if container.config != config:
            raise UserError(f"{path} holds an adapter with {config}, but the model has "
                            f"{container.config}")
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    if container is None:
        apply_adapter(model, config)
    try:
        if check_backbone:
            _check_identity(identity, model, path)
        params = dict(model.named_parameters())
        _check_tensors(path, tensors, params, trainable_parameter_names(model))
    except BaseException:
        if container is None:
            remove_adapter(model)
            for name, param in model.named_parameters():
                param.requires_grad_(requires_grad[name])
        raise
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return model


@dataclass(frozen=True)
class ParameterCount:
    """Trainable parameters (adapter, head) and totals, as papers report them."""

    trainable: int
    head: int
    backbone: int
    total: int

    @property
    def percent(self) -> float:
        """Trainable parameters excluding the head, in % of the pretrained backbone."""
        return 100.0 * self.trainable / max(self.backbone, 1)

    def __str__(self) -> str:
        return (f"trainable {self.trainable:,} ({self.percent:.3f}%) + head {self.head:,} "
                f"| total {self.total / 1e6:.1f}M")


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count parameters; the backbone is everything but the head and the adapter's modules."""
    head_names = set(head_parameter_names(model))
    params = dict(model.named_parameters())
    edit_names = {n for n in params if n.startswith(ADAPTER_ATTR + ".")}
    trainable = sum(p.numel() for n, p in params.items() if p.requires_grad and n not in head_names)
    head = sum(params[n].numel() for n in head_names if params[n].requires_grad)
    backbone = sum(p.numel() for n, p in params.items()
                   if n not in head_names and n not in edit_names)
    return ParameterCount(trainable=trainable, head=head, backbone=backbone,
                          total=sum(p.numel() for p in params.values()))
