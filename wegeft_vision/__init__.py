"""wegeft-vision: Weight-Generative Fine-Tuning (WeGeFT) for timm Vision Transformers."""
from .adapters import (AdapterConfig, FullFinetuneConfig, LinearProbeConfig, LoRAConfig,
                       ParameterCount, WeGeFTConfig, apply_adapter, count_parameters, load_adapter,
                       merge_adapter, remove_adapter, save_adapter)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "WeGeFTConfig", "LoRAConfig", "LinearProbeConfig", "FullFinetuneConfig",
    "ParameterCount", "apply_adapter", "merge_adapter", "remove_adapter", "save_adapter",
    "load_adapter", "count_parameters", "__version__",
]
