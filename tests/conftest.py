"""Fixtures shared by the test files; the functions behind them live in tests/helpers/.

Module-level code (parametrize lists, module-scoped fixtures) calls the helpers directly:
``from tests.helpers.models import create_vit`` (tiny timm ViTs at named sizes),
``from tests.helpers.data import ...`` (datasets in the benchmarks' layouts),
``from tests.helpers.training import ...`` (the toy task, its backbone weights and config).
"""
from __future__ import annotations

from typing import Callable

import pytest
from torch import nn

from tests.helpers.models import create_vit, vit_b16_on_meta


@pytest.fixture
def vit_factory() -> Callable[..., nn.Module]:
    """The factory :func:`tests.helpers.models.create_vit` (name, size, dtype, seed, ...)."""
    return create_vit


@pytest.fixture
def vit_b16() -> nn.Module:
    """ViT-B/16 with 100 classes on the meta device: exact parameter counts, no 86M weights.

    A fresh model per test (building it on meta costs no storage), so tests may adapt it in place.
    """
    return vit_b16_on_meta(num_classes=100)

