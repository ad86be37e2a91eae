"""What every adapter method is made of, and the registry that finds methods by name.

A method is one module: a config dataclass registered with :func:`register_method`, whose
``inject`` puts the method's layers into a timm model (each an :class:`AdapterLayer` keeping the
original module as ``base_layer``) and returns the trainable modules. The verbs in
:mod:`.model` (apply, merge, unmerge, save, load, count) work on any registered method.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..errors import UserError, UserTypeError

# Method name -> config class; filled by @register_method as each method's module is imported.
METHODS: dict[str, type["AdapterConfig"]] = {}

QKV_PARTS: tuple[str, ...] = ("q", "k", "v")


def qkv_rows(d_out: int, part: Optional[str]) -> slice:
    """The rows of a fused qkv weight (d_out = 3 x dim) that ``part`` owns; all rows for None."""
    if part is None:
        return slice(None)
    size = d_out // len(QKV_PARTS)
    index = QKV_PARTS.index(part)
    return slice(index * size, (index + 1) * size)


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_method(cls: type["AdapterConfig"]) -> type["AdapterConfig"]:
    """Class decorator: make a config class findable by its ``method`` name and class path."""
    if not (isinstance(cls, type) and issubclass(cls, AdapterConfig)) or not cls.method:
        raise TypeError(f"register_method takes an AdapterConfig subclass with a `method` name, "
                        f"got {cls!r}")
    known = METHODS.get(cls.method)
    if known is not None and class_path(known) != class_path(cls):
        raise ValueError(f"adapter method {cls.method!r} is already registered by "
                         f"{class_path(known)}; choose another name for {class_path(cls)}")
    METHODS[cls.method] = cls
    return cls


def get_method(name: str) -> type["AdapterConfig"]:
    """The config class registered as ``name`` (a method name or a class path)."""
    for cls in METHODS.values():
        if name in (cls.method, class_path(cls)):
            return cls
    # A re-export (wegeft_vision.WeGeFTConfig) of a registered class, looked up in modules that
    # are imported already: naming a module never imports it.
    module_name, _, attr = name.rpartition(".")
    found = getattr(sys.modules.get(module_name), attr, None) if module_name else None
    if found is not None and found in METHODS.values():
        return found
    raise UserError(f"unknown adapter method {name!r}: registered are {', '.join(METHODS)}; a "
                    "method defined in your own module must be imported (and registered) first")


@dataclass
class AdapterConfig:
    """Base of every method's config: a validated dataclass plus the method's hooks."""

    method: ClassVar[str] = ""
    # Why merge_adapter must refuse this method (None: it merges).
    cannot_merge: ClassVar[Optional[str]] = None

    def to_dict(self) -> dict[str, Any]:
        """The one serialisation (adapter files, checkpoints, LightningCLI): jsonargparse's
        class_path form, plain JSON data."""
        init_args = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"class_path": class_path(type(self)), "init_args": init_args}

    @staticmethod
    def from_dict(data: Any) -> "AdapterConfig":
        """Rebuild a config from :meth:`to_dict`'s form. Only registered classes are used: a
        file naming anything else is refused, never imported."""
        if isinstance(data, AdapterConfig):
            return data
        if not isinstance(data, dict) or not isinstance(data.get("class_path"), str):
            raise UserError(f"an adapter config must be {{'class_path': ..., 'init_args': "
                            f"...}}, got {data!r}")
        cls = get_method(data["class_path"])
        init_args = data.get("init_args") or {}
        try:
            return cls(**init_args)
        except TypeError as err:
            raise UserError(f"adapter config {data['class_path']}: {err}") from None

    def inject(self, model: nn.Module) -> dict[str, nn.Module]:
        """Put the method into ``model`` in place; return its trainable modules by key."""
        return {}

    def extra_trainable(self, model: nn.Module) -> list[str]:
        """Names of the model's own parameters (outside the adapter and the head) that train."""
        return []

    def on_unload(self, model: nn.Module, merge: bool) -> None:
        """Called after the method's layers were taken out, for changes outside them."""


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class AdapterLayer(nn.Module):
    """A module a method put at a timm path; the original stays as ``base_layer``.

    ``merge`` folds the method into ``base_layer`` in place, keeping a copy of what it
    overwrites; ``unmerge`` restores that copy bit for bit; ``unload`` gives the plain module.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False

    def merge(self) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    def unload(self, merge: bool) -> nn.Module:
        if merge and not self.merged:
            self.merge()
        elif not merge and self.merged:
            self.unmerge()
        return self.base_layer

    def check_not_training(self) -> None:
        """Refuse a training step through a merged layer: its edits would train twice."""
        if self.merged and self.training and torch.is_grad_enabled():
            raise UserError(f"{type(self).__name__} is merged into its weights: call "
                            "unmerge_adapter(model) before training")


def check_rank(rank: int, alpha: Optional[float] = None) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise UserTypeError(f"rank must be an int, got {rank!r}")
    if rank <= 0:
        raise UserError(f"rank must be a positive int, got {rank}")
    if alpha is not None and not alpha > 0:
        raise UserError(f"alpha must be positive or None (no scaling), got {alpha}")
