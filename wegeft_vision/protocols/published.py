"""Published numbers to print next to ours (the WeGeFT paper's ViT-B/16 results table).

Source: the WeGeFT authors' project page (arXiv 2312.00700, r = 16, ViT-B/16 ``augreg_in21k``,
params exclude the head). Accuracies in percent; only what was published is here, so per-task
VTAB columns stay empty for these rows. Dataset keys are the registry's canonical names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class PublishedResult:
    method: str
    params_percent: float
    vtab_groups: dict[str, float] = field(default_factory=dict)
    vtab_mean: Optional[float] = None
    fgvc: dict[str, float] = field(default_factory=dict)
    fgvc_mean: Optional[float] = None
    source: str = "WeGeFT project page (arXiv 2312.00700)"


PUBLISHED: tuple[PublishedResult, ...] = (
    PublishedResult("VPT", 0.054, {"Natural": 81.03, "Specialized": 85.65, "Structured": 58.89},
                    72.68, fgvc_mean=87.81),
    PublishedResult("BitFit", 0.097, {"Natural": 81.79, "Specialized": 85.15,
                                      "Structured": 57.75}, 72.37, fgvc_mean=88.18),
    PublishedResult("LoRA", 0.172, {"Natural": 81.96, "Specialized": 85.89, "Structured": 60.98},
                    73.95, fgvc_mean=88.71),
    PublishedResult("WeGeFT", 0.029, {"Natural": 81.95, "Specialized": 86.30,
                                      "Structured": 61.12}, 74.09,
                    fgvc={"CUB_200_2011": 89.71, "nabirds": 86.28, "OxfordFlowers": 99.22,
                          "StanfordDogs": 87.44, "StanfordCars": 84.28},
                    fgvc_mean=89.39),
)
