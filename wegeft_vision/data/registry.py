"""One registry of the benchmark tasks and datasets: names, folder spellings, class counts, groups.

Adding a task or dataset is one entry. Names are matched ignoring case, ``-``, ``_`` and spaces,
so ``oxford-iiit-pet``, ``Oxford_IIIT_Pet`` and ``oxfordiiitpet`` are the same name; an unknown
name raises a ``ValueError`` that suggests the closest known one.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Mapping, Optional, TypeVar

VTAB_GROUPS: tuple[str, ...] = ("Natural", "Specialized", "Structured")


@dataclass(frozen=True)
class VTABTask:
    """A VTAB-1k task as prepared by NOAH: ``<root>/<folder>/{train800,...}.txt``."""

    name: str
    num_classes: int
    group: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class FGVCDataset:
    """An FGVC dataset in VPT's json layout; ``image_dir`` is relative to the dataset folder."""

    name: str
    num_classes: int
    image_dir: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class FewShotDataset:
    """A few-shot FGVC dataset in NOAH's layout; ``image_dir`` is relative to its folder."""

    name: str
    num_classes: int
    image_dir: str
    aliases: tuple[str, ...] = ()


Entry = TypeVar("Entry", VTABTask, FGVCDataset, FewShotDataset)


def _index(*entries: Entry) -> dict[str, Entry]:
    return {entry.name: entry for entry in entries}


VTAB_TASKS: dict[str, VTABTask] = _index(
    VTABTask("cifar", 100, "Natural", ("cifar100", "cifar_100")),
    VTABTask("caltech101", 102, "Natural", ("caltech",)),
    VTABTask("dtd", 47, "Natural"),
    VTABTask("oxford_flowers102", 102, "Natural", ("oxford_flowers", "flowers102", "flowers")),
    VTABTask("oxford_iiit_pet", 37, "Natural", ("oxford_pet", "oxford_pets", "pets")),
    VTABTask("svhn", 10, "Natural", ("svhn_cropped",)),
    VTABTask("sun397", 397, "Natural", ("sun",)),
    VTABTask("patch_camelyon", 2, "Specialized", ("camelyon", "pcam")),
    VTABTask("eurosat", 10, "Specialized"),
    VTABTask("resisc45", 45, "Specialized", ("resisc",)),
    VTABTask("diabetic_retinopathy", 5, "Specialized",
             ("retinopathy", "diabetic_retinopathy_detection")),
    VTABTask("clevr_count", 8, "Structured", ("clevr_count_all",)),
    VTABTask("clevr_dist", 6, "Structured", ("clevr_closest_object_distance", "clevr_distance")),
    VTABTask("dmlab", 6, "Structured"),
    VTABTask("kitti", 4, "Structured", ("kitti_dist", "kitti_distance",
                                        "kitti_closest_vehicle_distance")),
    VTABTask("dsprites_loc", 16, "Structured", ("dsprites_location", "dsprites_label_x_position")),
    VTABTask("dsprites_ori", 16, "Structured", ("dsprites_orientation",
                                                "dsprites_label_orientation")),
    VTABTask("smallnorb_azi", 18, "Structured", ("smallnorb_azimuth", "smallnorb_label_azimuth")),
    VTABTask("smallnorb_ele", 9, "Structured", ("smallnorb_elevation",
                                                "smallnorb_label_elevation")),
)

FGVC_DATASETS: dict[str, FGVCDataset] = _index(
    FGVCDataset("CUB_200_2011", 200, "images", ("cub", "cub200", "cub_200")),
    FGVCDataset("nabirds", 555, "images", ("na_birds",)),
    FGVCDataset("OxfordFlowers", 102, ".", ("OxfordFlower", "oxford_flowers102", "flowers",
                                            "flowers102")),
    FGVCDataset("StanfordDogs", 120, "Images", ("Stanford-dogs", "dogs")),
    FGVCDataset("StanfordCars", 196, ".", ("Stanford-cars", "cars")),
)

FEWSHOT_DATASETS: dict[str, FewShotDataset] = _index(
    FewShotDataset("fgvc_aircraft", 100, "images", ("aircraft", "fgvc_aircraft_2013b")),
    FewShotDataset("food101", 101, "images", ("food",)),
    FewShotDataset("oxford_flowers102", 102, "images", ("oxford_flowers", "flowers102")),
    FewShotDataset("oxford_pets", 37, "images", ("oxford_pet", "oxford_iiit_pet", "pets")),
    # NOAH reads stanford_cars' list paths from the dataset folder itself; the misspelling
    # "standford" is how some published copies name the folder.
    FewShotDataset("stanford_cars", 196, ".", ("standford_cars", "cars")),
)


def normalize_name(name: str) -> str:
    """The key names are compared by: lower case without ``-``, ``_``, ``.`` or spaces."""
    return re.sub(r"[-_.\s]", "", name.lower())


def spellings(entry: VTABTask | FGVCDataset | FewShotDataset) -> tuple[str, ...]:
    """The canonical name followed by its aliases."""
    return (entry.name, *entry.aliases)


def closest(name: str, choices: list[str]) -> Optional[str]:
    """The choice most similar to ``name``, or None when nothing is close."""
    by_key = {normalize_name(choice): choice for choice in choices}
    match = difflib.get_close_matches(normalize_name(name), list(by_key), n=1, cutoff=0.5)
    return by_key[match[0]] if match else None


def did_you_mean(name: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    match = closest(name, choices)
    return f" (did you mean {match!r}?)" if match else ""


def find(name: str, table: Mapping[str, Entry]) -> Optional[Entry]:
    """The entry whose name or alias matches ``name``, or None."""
    key = normalize_name(name)
    for entry in table.values():
        if key in {normalize_name(spelling) for spelling in spellings(entry)}:
            return entry
    return None


def _lookup(name: str, table: Mapping[str, Entry], what: str) -> Entry:
    entry = find(name, table)
    if entry is None:
        canonical = {spelling: entry.name for entry in table.values()
                     for spelling in spellings(entry)}
        suggestion = closest(name, list(canonical))
        hint = "" if suggestion is None else f" (did you mean {canonical[suggestion]!r}?)"
        raise ValueError(f"unknown {what} {name!r}{hint}; known: {', '.join(table)}")
    return entry


def vtab_task(name: str) -> VTABTask:
    """Look up a VTAB-1k task by name or alias."""
    return _lookup(name, VTAB_TASKS, "VTAB-1k task")


def fgvc_dataset(name: str) -> FGVCDataset:
    """Look up an FGVC dataset by name or alias."""
    return _lookup(name, FGVC_DATASETS, "FGVC dataset")


def fewshot_dataset(name: str) -> FewShotDataset:
    """Look up a few-shot FGVC dataset by name or alias."""
    return _lookup(name, FEWSHOT_DATASETS, "few-shot dataset")


def vtab_tasks_in_group(group: str) -> list[str]:
    """Canonical names of the VTAB-1k tasks in ``group``, in the registry's order."""
    if group not in VTAB_GROUPS:
        raise ValueError(f"unknown VTAB-1k group {group!r}; known: {', '.join(VTAB_GROUPS)}")
    return [task.name for task in VTAB_TASKS.values() if task.group == group]
