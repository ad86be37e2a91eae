"""WeGeFT and its baselines on timm ViTs: a registry of methods and the verbs that apply them.

Each method is one module (its config, its layer, how it merges) registered by name; importing
this package registers the built-in ones.
"""
from .base import METHODS, AdapterConfig, AdapterLayer, get_method, register_method
from .bitfit import BitFitConfig
from .dora import DoRAConfig, DoRAEdit, DoRALinear
from .full import FullFinetuneConfig
from .layer import AdaptedLinear, Edit
from .linear_probe import LinearProbeConfig
from .lora import LoRAConfig, LoRALinear, LoRAPair
from .model import (ParameterCount, adapter_state_dict, apply_adapter, count_parameters,
                    fingerprint, frozen_fingerprint, get_adapter, load_adapter, merge_adapter,
                    read_adapter_file, remove_adapter, save_adapter, trainable_parameter_names,
                    unmerge_adapter)
from .targets import TARGET_PRESETS
from .vpt import PromptedBlock, PromptTokens, VPTConfig
from .vera import VeRAConfig, VeRAEdit, VeRAProjections
from .wegeft import WeGeFTConfig, WeGeFTGenerator, WeGeFTLinear

__all__ = [
    "METHODS", "AdapterConfig", "AdapterLayer", "register_method", "get_method",
    "TARGET_PRESETS", "WeGeFTConfig", "LoRAConfig", "LinearProbeConfig", "FullFinetuneConfig",
    "VPTConfig", "PromptTokens", "PromptedBlock", "BitFitConfig",
    "AdaptedLinear", "Edit", "WeGeFTLinear", "WeGeFTGenerator", "LoRALinear", "LoRAPair",
    "ParameterCount", "apply_adapter", "merge_adapter", "unmerge_adapter", "remove_adapter",
    "save_adapter", "load_adapter", "read_adapter_file", "adapter_state_dict", "count_parameters",
    "get_adapter", "trainable_parameter_names", "fingerprint", "frozen_fingerprint",
    "DoRAConfig", "DoRAEdit", "DoRALinear", "VeRAConfig", "VeRAEdit", "VeRAProjections",
]
