"""Put an adapter on a timm ViT, fold it in, take it off, save and load it, count it.

The adapter's own tensors live in one place, the container ``model.adapter``; which parameters
train, what an adapter file holds and what merging folds in all derive from that container.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import (BLOCK_LAYERS, AdapterConfig, FullFinetuneConfig, LinearProbeConfig,
                     LoRAConfig, WeGeFTConfig)
from .layer import AdaptedLinear, Edit
from .lora import LoRALinear, LoRAPair
from .wegeft import WeGeFTGenerator, WeGeFTLinear

ADAPTER_ATTR = "adapter"
FILE_FORMAT = "wegeft_vision.adapter/2"
# Files without the backbone's identity: loaded without identity checks, with a warning.
OLD_FILE_FORMATS = ("wegeft_vision.adapter/1",)


class AdapterContainer(nn.Module):
    """The adapter's config and its edits, each registered exactly once."""

    def __init__(self, config: AdapterConfig, edits: dict[str, Edit]) -> None:
        super().__init__()
        self.config = config
        self.edits = nn.ModuleDict(edits)

    def extra_repr(self) -> str:
        return f"config={self.config}"


def get_adapter(model: nn.Module) -> Optional[AdapterContainer]:
    container = getattr(model, ADAPTER_ATTR, None)
    return container if isinstance(container, AdapterContainer) else None


def _require_adapter(model: nn.Module, action: str) -> AdapterContainer:
    container = get_adapter(model)
    if container is None:
        raise ValueError(f"cannot {action}: {type(model).__name__} has no adapter "
                         "(call apply_adapter first)")
    return container


def _heads(model: nn.Module) -> list[nn.Module]:
    """The classifier head(s) from timm's ``get_classifier()`` (distilled DeiT has two)."""
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier):
        return []
    heads = get_classifier()
    return list(heads) if isinstance(heads, (tuple, list)) else [heads]


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the classifier head's parameters."""
    heads = _heads(model)
    names = []
    for prefix, module in model.named_modules():
        if any(module is head for head in heads):
            names += [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
    return names


def _matches(pattern: str, name: str) -> bool:
    kind = BLOCK_LAYERS.get(pattern)
    if kind is not None:  # a block projection kind: blocks.<i>.<one of its names>, nothing else
        names = "|".join(map(re.escape, kind))
        return re.fullmatch(rf"(?:.*\.)?blocks\.\d+\.(?:{names})", name) is not None
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _kinds(names: list[str]) -> str:
    """Layer names with block indices collapsed: blocks.N.attn.qkv, ..."""
    seen = dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".N", n) for n in names)
    return ", ".join(seen)


def _key(text: str) -> str:
    return re.sub(r"\W+", "_", text).strip("_") or "target"


def find_target_layers(model: nn.Module, targets: tuple[str, ...]) -> dict[str, list[str]]:
    """Map each target pattern to the names of the ``nn.Linear`` layers it selects.

    The classifier head is never a target: it trains in full anyway.
    """
    heads = _heads(model)
    modules = dict(model.named_modules())
    is_head = {n for n, m in modules.items() if any(m is h for h in heads)}
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in is_head]
    found: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for pattern in targets:
        hits = [n for n in modules if n and _matches(pattern, n)]
        layers = [n for n in hits if n in linears]
        if not layers:
            others = [f"{n} ({type(modules[n]).__name__})" for n in hits if n not in is_head]
            if others:
                raise ValueError(f"target {pattern!r} matches {', '.join(others[:3])}, which is "
                                 f"not an nn.Linear; linear layers here: {_kinds(linears)}")
            kind = BLOCK_LAYERS.get(pattern)
            what = "" if kind is None else (" (the transformer blocks' "
                                            f"blocks.<i>.{' / '.join(kind)})")
            raise ValueError(f"target {pattern!r}{what} matches no linear layer of "
                             f"{type(model).__name__}; linear layers here: {_kinds(linears)}")
        for name in layers:
            if name in owner:
                raise ValueError(f"layer {name!r} is matched by both targets {owner[name]!r} "
                                 f"and {pattern!r}")
            owner[name] = pattern
        found[pattern] = layers
    return found


def _is_fused_qkv(name: str, layer: nn.Linear) -> bool:
    return name.rsplit(".", 1)[-1] == "qkv" and layer.out_features == 3 * layer.in_features


def _build_edits(model: nn.Module, config: Union[WeGeFTConfig, LoRAConfig]
                 ) -> tuple[dict[str, Edit], dict[str, dict[Optional[str], Edit]]]:
    """Create the edits and say which layer gets which; returns (edits by key, per layer)."""
    modules = dict(model.named_modules())
    targets = find_target_layers(model, config.targets)
    parts = config.qkv_parts
    if parts is not None and not any(_is_fused_qkv(n, modules[n])
                                      for names in targets.values() for n in names):
        raise ValueError(f"qkv_parts={parts} given, but none of the targeted layers "
                         f"({_kinds([n for v in targets.values() for n in v])}) is a fused qkv "
                         "layer (an nn.Linear named 'qkv' with out_features = 3 x in_features)")
    shared = isinstance(config, WeGeFTConfig) and config.shared
    edits: dict[str, Edit] = {}
    per_layer: dict[str, dict[Optional[str], Edit]] = {}
    for pattern, names in targets.items():
        first = modules[names[0]]
        for name in names:
            layer = modules[name]
            if config.rank > layer.in_features:
                raise ValueError(f"rank {config.rank} exceeds the input size {layer.in_features} "
                                 f"of layer {name!r}")
            if shared and layer.in_features != first.in_features:
                raise ValueError(f"target {pattern!r} shares one generator, but {names[0]!r} has "
                                 f"d_in={first.in_features} and {name!r} has "
                                 f"d_in={layer.in_features}; use separate targets or shared=False")
            layer_parts = parts if parts is not None and _is_fused_qkv(name, layer) else (None,)
            per_layer[name] = {}
            for part in layer_parts:
                suffix = "" if part is None else f"_{part}"
                key = _key(pattern if shared else name) + suffix
                if key not in edits:
                    if isinstance(config, WeGeFTConfig):
                        edits[key] = WeGeFTGenerator(layer.in_features, config.rank, config.scale)
                    else:
                        out = layer.out_features // (1 if part is None else 3)
                        edits[key] = LoRAPair(layer.in_features, out, config.rank, config.scale)
                    edits[key].to(device=layer.weight.device, dtype=layer.weight.dtype)
                per_layer[name][part] = edits[key]
    return edits, per_layer


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """The parameters an adapter trains, derived from the container and the config."""
    container = _require_adapter(model, "list trainable parameters")
    if isinstance(container.config, FullFinetuneConfig):
        return [n for n, _ in model.named_parameters()]
    prefix = ADAPTER_ATTR + "."
    names = [prefix + n for n, _ in container.named_parameters()]
    return names + head_parameter_names(model)


def apply_adapter(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Adapt ``model`` in place: freeze the backbone, attach the adapter, keep the head trainable.

    Adapted layers stay at their module paths (``blocks.3.attn.qkv``) and keep the original
    layer as ``base_layer``.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an adapter config (e.g. WeGeFTConfig), got "
                        f"{type(config).__name__}")
    existing = get_adapter(model)
    if existing is not None:
        raise ValueError(f"{type(model).__name__} already has an adapter ({existing.config}); "
                         "merge_adapter or remove_adapter it first")
    if hasattr(model, ADAPTER_ATTR):
        raise ValueError(f"{type(model).__name__} already has an attribute {ADAPTER_ATTR!r}")
    edits: dict[str, Edit] = {}
    if isinstance(config, (WeGeFTConfig, LoRAConfig)):
        edits, per_layer = _build_edits(model, config)
        layer_cls = WeGeFTLinear if isinstance(config, WeGeFTConfig) else LoRALinear
        for name, layer_edits in per_layer.items():
            layer = layer_cls(model.get_submodule(name), layer_edits)
            if isinstance(config, WeGeFTConfig):
                layer.recompute = config.recompute
            _set_module(model, name, layer)
    elif not isinstance(config, (LinearProbeConfig, FullFinetuneConfig)):
        raise TypeError(f"unsupported adapter config {type(config).__name__}")
    setattr(model, ADAPTER_ATTR, AdapterContainer(config, edits))
    trainable = set(trainable_parameter_names(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return model


def _unadapt(model: nn.Module, merge: bool) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, AdaptedLinear):
            try:
                replacement = module.merged_linear() if merge else module.base_layer
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}") from None
            _set_module(model, name, replacement)
    delattr(model, ADAPTER_ATTR)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the adapter into the weights (W <- W(I + phi·psi) for WeGeFT, in float64).

    Leaves plain ``nn.Linear`` layers, so the state dict has exactly the plain timm model's keys.
    All parameters are trainable again afterwards, as in a freshly created model.
    """
    _require_adapter(model, "merge")
    return _unadapt(model, merge=True)


def remove_adapter(model: nn.Module) -> nn.Module:
    """Take the adapter off and restore the original layers, unchanged (the head keeps training)."""
    _require_adapter(model, "remove the adapter")
    return _unadapt(model, merge=False)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors only (edits and head), detached."""
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in trainable_parameter_names(model)}


def fingerprint(tensors: dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None) -> str:
    """SHA-256 over names, shapes, dtypes and bytes: tells two sets of frozen weights apart.

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


def _identity(model: nn.Module) -> dict[str, object]:
    """What identifies the backbone an adapter belongs to (the adapter must be applied).

    ``frozen_fingerprint`` hashes every state-dict tensor the adapter does not train, under the
    plain model's names, rounded to bfloat16: the same for the model in float32, float64 or
    bfloat16 (float16 rounds differently and may not match).
    """
    trainable = set(trainable_parameter_names(model))
    frozen = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
              if k not in trainable}
    cfg = getattr(model, "pretrained_cfg", None)
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "architecture": cfg.get("architecture") if isinstance(cfg, dict) else None,
        "layers": {n: [m.out_features, m.in_features] for n, m in model.named_modules()
                   if isinstance(m, AdaptedLinear)},
        "frozen_fingerprint": fingerprint(frozen, dtype=torch.bfloat16),
    }


def save_adapter(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write the trainable tensors, the config and the backbone's identity to a safetensors file.

    The identity (checked by :func:`load_adapter`): model class and timm architecture, the
    adapted layers and their shapes, and a fingerprint of the frozen weights.
    """
    container = _require_adapter(model, "save an adapter")
    path = Path(path)
    tensors = {n: t.contiguous().cpu() for n, t in adapter_state_dict(model).items()}
    metadata = {"format": FILE_FORMAT, "config": json.dumps(container.config.to_dict()),
                "identity": json.dumps(_identity(model))}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _read(path: Path) -> tuple[AdapterConfig, dict[str, torch.Tensor], Optional[dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        file_format = metadata.get("format")
        if file_format != FILE_FORMAT and file_format not in OLD_FILE_FORMATS:
            raise ValueError(f"{path} is not a wegeft_vision adapter file "
                             f"(format {file_format!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    identity = json.loads(metadata["identity"]) if file_format == FILE_FORMAT else None
    return AdapterConfig.from_dict(json.loads(metadata["config"])), tensors, identity


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
            raise ValueError(f"{path} was saved from a {saved[key]} backbone; this model is a "
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
        raise ValueError(f"{path} adapts {len(layers)} layers, this model {len(ours)}: the "
                         f"backbones differ ({what}){hint}")
    if saved["frozen_fingerprint"] != here["frozen_fingerprint"]:
        raise ValueError(f"{path} was trained on other frozen weights than this model's "
                         f"(fingerprint {saved['frozen_fingerprint'][:12]} in the file, "
                         f"{here['frozen_fingerprint'][:12]} here){hint}")


def load_adapter(model: nn.Module, path: Union[str, Path], check_backbone: bool = True
                 ) -> nn.Module:
    """Load an adapter file into ``model``, applying the file's config first if it has none.

    All or nothing: on any error the model is left exactly as it was. ``check_backbone``: refuse
    a file saved from another backbone (class, timm architecture, adapted layers and shapes,
    frozen weights); False loads it wherever the tensors fit (a deliberate transfer). Files
    written before the identity was stored load without these checks, with a warning.
    """
    path = Path(path)
    config, tensors, identity = _read(path)
    container = get_adapter(model)
    if container is not None and container.config != config:
        raise ValueError(f"{path} holds an adapter with {config}, but the model has "
                         f"{container.config}")
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    if container is None:
        apply_adapter(model, config)
    try:
        if identity is None:
            warnings.warn(f"{path} is an adapter file without the backbone's identity (format "
                          f"{OLD_FILE_FORMATS[0]!r}); loaded without checking that it was "
                          "trained on this backbone", UserWarning, stacklevel=2)
        elif check_backbone:
            _check_identity(identity, model, path)
        params = dict(model.named_parameters())
        expected = trainable_parameter_names(model)
        missing = [n for n in expected if n not in tensors]
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name in expected:
            tensor = tensors[name]
            if params[name].shape != tensor.shape:
                raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the "
                                 f"model expects {tuple(params[name].shape)} (different "
                                 "backbone or number of classes?)")
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
    """Count parameters; the backbone is everything but the head and the adapter's edits."""
    head_names = set(head_parameter_names(model))
    params = dict(model.named_parameters())
    edit_names = {n for n in params if n.startswith(ADAPTER_ATTR + ".")}
    trainable = sum(p.numel() for n, p in params.items() if p.requires_grad and n not in head_names)
    head = sum(params[n].numel() for n in head_names if params[n].requires_grad)
    backbone = sum(p.numel() for n, p in params.items()
                   if n not in head_names and n not in edit_names)
    return ParameterCount(trainable=trainable, head=head, backbone=backbone,
                          total=sum(p.numel() for p in params.values()))
