"""wegeft-vision: Weight-Generative Fine-Tuning (WeGeFT) for timm Vision Transformers."""
from importlib import import_module
from typing import Any

from .adapters import (AdapterConfig, BitFitConfig, DoRAConfig, FullFinetuneConfig,
                       LinearProbeConfig, LoRAConfig, ParameterCount, VeRAConfig, VPTConfig,
                       WeGeFTConfig, apply_adapter, count_parameters, load_adapter,
                       merge_adapter, register_method, remove_adapter, save_adapter,
                       unmerge_adapter)

__version__ = "0.1.0"

# The datamodules and the LightningModule import Lightning; load them on first use so that
# `apply_adapter` in someone's own training code stays a light import.
_LAZY = {
    "VTAB1kDataModule": "data", "FGVCDataModule": "data", "FewShotDataModule": "data",
    "ImageFolderDataModule": "data", "ViTClassifier": "training",
}

__all__ = [
    "AdapterConfig", "WeGeFTConfig", "LoRAConfig", "LinearProbeConfig", "FullFinetuneConfig",
    "VPTConfig", "BitFitConfig",
    "ParameterCount", "apply_adapter", "merge_adapter", "unmerge_adapter", "remove_adapter",
    "save_adapter", "register_method",
    "load_adapter", "count_parameters", "__version__", "DoRAConfig", "VeRAConfig", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
