"""Which timm layers a method adapts: target names, presets, and finding them in a model.

``targets`` name linear layers by a block projection kind, by module-name suffix (``"proj"``
matches ``blocks.3.attn.proj``), by a regular expression that must match the whole module name,
or by a preset.

The four kinds ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` (and so the presets
``"attn"`` = qkv + proj, ``"mlp"`` = fc1 + fc2 and ``"all"``, which expand to them) mean the
projections of the transformer blocks, the modules ``blocks.<i>.<name>``, and nothing else: not a
head or pooling network outside the blocks (SigLIP's ``attn_pool.mlp.fc1``), not a helper network
inside a block (the relative-position MLP ``attn.rel_pos.mlp.fc1`` of ``vit_relpos_*``). Across
families:

- ``attn.qkv``: the fused qkv layer; where a block has separate ``attn.q_proj``, ``attn.k_proj``
  and ``attn.v_proj`` instead (EVA with ``qkv_fused=False``), those three. A shared WeGeFT
  generator acts on the input side, so one generator for q, k and v is exactly the fused layer's.
- ``mlp.fc1``: the first MLP layer; in a SwiGLU MLP with separate gate and value layers (EVA02
  base and large: ``mlp.fc1_g``, ``mlp.fc1_x``) both, again exactly as timm's packed SwiGLU (one
  ``mlp.fc1`` holding both halves, EVA02 tiny and small) is treated. ``mlp.fc2`` reads the gated
  hidden state.

Any other name is a suffix or a regular expression and reaches any ``nn.Linear`` it matches, in a
block or not (``"attn_pool.mlp.fc1"``, ``"mlp.fc1_g"``, a regex such as ``"blocks[.]0[.].*"``).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

from torch import nn

from ..errors import UserError, UserTypeError
from .base import QKV_PARTS

# The block projection kinds and the layer names (after "blocks.<i>.") each covers.
BLOCK_LAYERS: dict[str, tuple[str, ...]] = {
    "attn.qkv": ("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "attn.proj": ("attn.proj",),
    "mlp.fc1": ("mlp.fc1", "mlp.fc1_g", "mlp.fc1_x"),
    "mlp.fc2": ("mlp.fc2",),
}
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.qkv", "attn.proj"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
    "all": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
}

Targets = Union[str, Sequence[str]]


def expand_targets(targets: Targets) -> tuple[str, ...]:
    """Expand presets and de-duplicate, keeping the order given."""
    items = [targets] if isinstance(targets, str) else list(targets)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise UserTypeError(f"targets must be non-empty strings, got {item!r}")
        for name in TARGET_PRESETS.get(item, (item,)):
            if name not in out:
                out.append(name)
    if not out:
        raise UserError("targets is empty: name at least one layer, e.g. 'attn.proj' or 'all'")
    return tuple(out)


def check_parts(parts: Optional[Sequence[str]]) -> Optional[tuple[str, ...]]:
    """``qkv_parts`` validated and put in q, k, v order."""
    if parts is None:
        return None
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    unknown = [p for p in parts if p not in QKV_PARTS]
    if unknown or not parts or len(set(parts)) != len(parts):
        raise UserError(f"qkv_parts must be distinct names from {QKV_PARTS}, got {parts!r}")
    return tuple(p for p in QKV_PARTS if p in parts)


def heads(model: nn.Module) -> list[nn.Module]:
    """The classifier head(s) from timm's ``get_classifier()`` (distilled DeiT has two)."""
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier):
        return []
    found = get_classifier()
    return list(found) if isinstance(found, (tuple, list)) else [found]


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the classifier head's parameters."""
    found = heads(model)
    names = []
    for prefix, module in model.named_modules():
        if any(module is head for head in found):
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


def kinds(names: list[str]) -> str:
    """Layer names with block indices collapsed: blocks.N.attn.qkv, ..."""
    seen = dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".N", n) for n in names)
    return ", ".join(seen)


def find_target_layers(model: nn.Module, targets: tuple[str, ...]) -> dict[str, list[str]]:
    """Map each target pattern to the names of the ``nn.Linear`` layers it selects.

    The classifier head is never a target: it trains in full anyway.
    """
    found_heads = heads(model)
    modules = dict(model.named_modules())
    is_head = {n for n, m in modules.items() if any(m is h for h in found_heads)}
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in is_head]
    found: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for pattern in targets:
        hits = [n for n in modules if n and _matches(pattern, n)]
        layers = [n for n in hits if n in linears]
        if not layers:
            others = [f"{n} ({type(modules[n]).__name__})" for n in hits if n not in is_head]
            if others:
                raise UserError(f"target {pattern!r} matches {', '.join(others[:3])}, which is "
                                f"not an nn.Linear; linear layers here: {kinds(linears)}")
            kind = BLOCK_LAYERS.get(pattern)
            what = "" if kind is None else (" (the transformer blocks' "
                                            f"blocks.<i>.{' / '.join(kind)})")
            raise UserError(f"target {pattern!r}{what} matches no linear layer of "
                            f"{type(model).__name__}; linear layers here: {kinds(linears)}")
        for name in layers:
            if name in owner:
                raise UserError(f"layer {name!r} is matched by both targets {owner[name]!r} "
                                f"and {pattern!r}")
            owner[name] = pattern
        found[pattern] = layers
    return found


def is_fused_qkv(name: str, layer: nn.Linear) -> bool:
    return name.rsplit(".", 1)[-1] == "qkv" and layer.out_features == 3 * layer.in_features


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
