"""WeGeFT and its baselines on timm ViTs: configs, layers, and the verbs that apply them."""
from .config import (TARGET_PRESETS, AdapterConfig, FullFinetuneConfig, LinearProbeConfig,
                     LoRAConfig, WeGeFTConfig)
from .layer import AdaptedLinear
from .lora import LoRALinear, LoRAPair
from .model import (ParameterCount, adapter_state_dict, apply_adapter, count_parameters,
                    fingerprint, get_adapter, load_adapter, merge_adapter, read_adapter_file,
                    remove_adapter, save_adapter, trainable_parameter_names)
from .wegeft import WeGeFTGenerator, WeGeFTLinear

__all__ = [
    "TARGET_PRESETS", "AdapterConfig", "WeGeFTConfig", "LoRAConfig", "LinearProbeConfig",
    "FullFinetuneConfig", "AdaptedLinear", "WeGeFTLinear", "WeGeFTGenerator", "LoRALinear",
    "LoRAPair", "ParameterCount", "apply_adapter", "merge_adapter", "remove_adapter",
    "save_adapter", "load_adapter", "read_adapter_file", "adapter_state_dict", "count_parameters",
    "get_adapter", "trainable_parameter_names", "fingerprint",
]
