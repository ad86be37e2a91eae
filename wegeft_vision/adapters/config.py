"""Adapter configurations: which method, which layers, which rank.

A config is a plain, validated dataclass. ``targets`` name timm linear layers by a block
projection kind, by module-name suffix (``"proj"`` matches ``blocks.3.attn.proj``), by a
regular expression that must match the whole module name, or by a preset.

The four kinds ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` (and so the presets
``"attn"`` = qkv + proj, ``"mlp"`` = fc1 + fc2 and ``"all"``, which expand to them) mean the
projections of the transformer blocks, the modules ``blocks.<i>.<name>``, and nothing else: not a
head or pooling network outside the blocks (SigLIP's ``attn_pool.mlp.fc1``), not a helper network
inside a block (the relative-position MLP ``attn.rel_pos.mlp.fc1`` of ``vit_relpos_*``). With
``shared``, each kind gets one generator for all blocks (one per layer otherwise). Across
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

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence, Union

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
QKV_PARTS: tuple[str, ...] = ("q", "k", "v")

Targets = Union[str, Sequence[str]]


def expand_targets(targets: Targets) -> tuple[str, ...]:
    """Expand presets and de-duplicate, keeping the order given."""
    items = [targets] if isinstance(targets, str) else list(targets)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise TypeError(f"targets must be non-empty strings, got {item!r}")
        for name in TARGET_PRESETS.get(item, (item,)):
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError("targets is empty: name at least one layer, e.g. 'attn.proj' or 'all'")
    return tuple(out)


def _check_rank(rank: int, alpha: Optional[float]) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {rank!r}")
    if rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank}")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"alpha must be positive or None (no scaling), got {alpha}")


def _check_parts(parts: Optional[Sequence[str]]) -> Optional[tuple[str, ...]]:
    if parts is None:
        return None
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    unknown = [p for p in parts if p not in QKV_PARTS]
    if unknown or not parts or len(set(parts)) != len(parts):
        raise ValueError(f"qkv_parts must be distinct names from {QKV_PARTS}, got {parts!r}")
    return tuple(p for p in QKV_PARTS if p in parts)


@dataclass
class AdapterConfig:
    """Base class: what every adapter config can say about itself."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "AdapterConfig":
        data = dict(data)
        method = data.pop("method", None)
        for cls in (WeGeFTConfig, LoRAConfig, LinearProbeConfig, FullFinetuneConfig):
            if cls.method == method:
                return cls(**data)
        raise ValueError(f"unknown adapter method {method!r}")

    @property
    def scale(self) -> float:
        alpha = getattr(self, "alpha", None)
        return 1.0 if alpha is None else alpha / self.rank  # type: ignore[attr-defined]


@dataclass
class WeGeFTConfig(AdapterConfig):
    """WeGeFT: dW = W·phi·psi, applied as y = W(x + phi(psi(x))) + b.

    Initialised as the authors' vision code: psi = 0 and phi ~ U(+-1/sqrt(d_in)), so training
    starts at the pretrained model and only psi moves at step 1.

    Args:
        rank: generator rank r (psi: d_in -> r, phi: r -> d_in).
        targets: block projection kinds ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
            presets of them ("attn", "mlp", "all"), other layer-name suffixes or full-match
            regexes; see the module docstring for what the kinds mean in each timm family.
        shared: one generator per target kind for all blocks (the paper), else one per layer.
        alpha: None for no scaling (the paper's vision setting); a number scales by alpha/rank.
        qkv_parts: None treats timm's fused qkv as one layer; e.g. ("q", "v") gives each named
            part its own generator, fed with its own rows of W, and leaves the others unchanged.
        recompute: rebuild each adapted layer's input in backward from what LayerNorm, GELU or
            attention saved anyway instead of storing a copy (activation memory near the frozen
            floor); a runtime choice: config equality, and so loading an adapter, ignores it.
    """

    method: ClassVar[str] = "wegeft"
    rank: int = 16
    targets: Targets = ("attn.proj",)
    shared: bool = True
    alpha: Optional[float] = None
    qkv_parts: Optional[Sequence[str]] = None
    recompute: bool = dataclasses.field(default=True, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.recompute, bool):
            raise TypeError(f"recompute must be True or False, got {self.recompute!r}")
        _check_rank(self.rank, self.alpha)
        self.targets = expand_targets(self.targets)
        self.qkv_parts = _check_parts(self.qkv_parts)


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA baseline: y = Wx + b + (alpha/r)·B(A(x)), one (A, B) pair per layer.

    Args:
        rank: r.
        alpha: None for a scale of 1; a number scales by alpha/rank.
        targets: as for WeGeFT.
        qkv_parts: as for WeGeFT: LoRA on e.g. the q and v rows of the fused qkv only.
    """

    method: ClassVar[str] = "lora"
    rank: int = 8
    alpha: Optional[float] = None
    targets: Targets = ("attn.proj",)
    qkv_parts: Optional[Sequence[str]] = None

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.alpha)
        self.targets = expand_targets(self.targets)
        self.qkv_parts = _check_parts(self.qkv_parts)


@dataclass
class LinearProbeConfig(AdapterConfig):
    """Only the classifier head trains."""

    method: ClassVar[str] = "linear_probe"


@dataclass
class FullFinetuneConfig(AdapterConfig):
    """Every parameter trains."""

    method: ClassVar[str] = "full"
