"""Published numbers to show beside ours, per benchmark.

Source: the WeGeFT authors' project page (arXiv 2312.00700, Table "vision": r = 16, ViT-B/16
``augreg_in21k``, params exclude the head), whose VPT, BitFit and LoRA rows are the authors' own
runs of those methods. Accuracies in percent; only what was published is here, so per-task
VTAB-1k columns stay empty for these rows. Task keys are the data registry's canonical names;
``method`` is the adapter registry's name of the method the row measures, so that a table puts
the row beside our runs of that method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SOURCE = "WeGeFT project page (arXiv 2312.00700)"


@dataclass(frozen=True)
class PublishedRow:
    label: str
    method: str
    params_percent: float
    mean: float
    groups: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=dict)
    source: str = SOURCE

    def accuracy(self, column: str) -> Optional[float]:
        """The published number of a task or group column, if there is one."""
        return self.tasks.get(column, self.groups.get(column))


VTAB: tuple[PublishedRow, ...] = (
    PublishedRow("VPT", "vpt", 0.054, 72.68,
                 {"Natural": 81.03, "Specialized": 85.65, "Structured": 58.89}),
    PublishedRow("BitFit", "bitfit", 0.097, 72.37,
                 {"Natural": 81.79, "Specialized": 85.15, "Structured": 57.75}),
    PublishedRow("LoRA", "lora", 0.172, 73.95,
                 {"Natural": 81.96, "Specialized": 85.89, "Structured": 60.98}),
    PublishedRow("WeGeFT", "wegeft", 0.029, 74.09,
                 {"Natural": 81.95, "Specialized": 86.30, "Structured": 61.12}),
)

FGVC: tuple[PublishedRow, ...] = (
    PublishedRow("VPT", "vpt", 0.054, 87.81),
    PublishedRow("BitFit", "bitfit", 0.097, 88.18),
    PublishedRow("LoRA", "lora", 0.172, 88.71),
    PublishedRow("WeGeFT", "wegeft", 0.029, 89.39,
                 tasks={"CUB_200_2011": 89.71, "nabirds": 86.28, "OxfordFlowers": 99.22,
                        "StanfordDogs": 87.44, "StanfordCars": 84.28}),
)
