"""Readers for the annotation files of the benchmarks, each failing with the file and line at fault.

* ``read_list_file``: NOAH's ``path label`` lines, used by VTAB-1k and few-shot FGVC.
* ``read_json_labels`` + ``build_label_mapping`` + ``json_samples``: VPT's FGVC json files, with
  the label mapping built from the train split and applied to the other splits.
* ``class_folders`` + ``image_files``: folder trees (ImageFolder, ``predict_root``), skipping
  hidden entries.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from .checks import require_file

RawLabel = Union[int, str]
MAX_SHOWN = 5
NO_LABEL = -1  # the label of an image to classify (``predict_root``)


@dataclass(frozen=True)
class Sample:
    """One image with its 0-based label, and where in which annotation file it came from."""

    path: Path
    label: int
    source: str


def read_list_file(path: Path, image_dir: Path, num_classes: Optional[int] = None) -> list[Sample]:
    """Read ``relative/path label`` lines; image paths are joined onto ``image_dir``.

    The label is what follows the last space (paths may contain spaces); CRLF line ends, a
    byte-order mark and blank lines are tolerated. Labels must be 0-based ints below
    ``num_classes`` when it is given.
    """
    path = Path(path)
    require_file(path, "list file")
    samples = []
    # utf-8-sig drops a byte-order mark; splitlines() handles \n, \r\n and \r alike.
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        where = f"{path}, line {number}"
        parts = text.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{where}: expected 'relative/path label', got {line!r}")
        relative, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise ValueError(f"{where}: label {label_text!r} is not an integer "
                             f"(line {line!r})") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            limit = "" if num_classes is None else \
                f" for {num_classes} classes (0..{num_classes - 1})"
            raise ValueError(f"{where}: label {label} is out of range{limit}")
        samples.append(Sample(image_dir / relative, label, where))
    if not samples:
        raise ValueError(f"list file {path} holds no samples")
    return samples


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_json_labels(path: Path) -> dict[str, RawLabel]:
    """Read a flat ``{"relative/path.jpg": label}`` json object; labels are ints or strings."""
    path = Path(path)
    require_file(path, "json file")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"),
                          object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}, line {exc.lineno}: invalid json: {exc.msg}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a json object {{\"path\": label}}, "
                         f"got {type(data).__name__}")
    if not data:
        raise ValueError(f"json file {path} holds no samples")
    for key, label in data.items():
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise ValueError(f"{path}: key {key!r} has label {label!r}; labels must be ints or "
                             "strings")
    return data  # type: ignore[return-value]


def _label_order(label: RawLabel) -> tuple[int, int, str]:
    # Numeric order for ints and numeric strings ("2" before "10"), then text order; the text
    # breaks ties ("01" vs "1") so the mapping never depends on set iteration order.
    try:
        return (0, int(label), str(label))
    except ValueError:
        return (1, 0, str(label))


def build_label_mapping(labels: Sequence[RawLabel]) -> dict[RawLabel, int]:
    """Map the distinct raw labels, in numeric then text order, to 0, 1, 2, ..."""
    return {raw: index for index, raw in enumerate(sorted(set(labels), key=_label_order))}


def json_samples(path: Path, labels: dict[str, RawLabel], mapping: dict[RawLabel, int],
                 image_dir: Path, mapping_source: str) -> list[Sample]:
    """Turn ``read_json_labels`` output into samples; every label must be in ``mapping``."""
    unknown = [(key, raw) for key, raw in labels.items() if raw not in mapping]
    if unknown:
        shown = ", ".join(f"{key!r}: {raw!r}" for key, raw in unknown[:MAX_SHOWN])
        raise ValueError(f"{path}: {len(unknown)} label(s) do not occur in {mapping_source} "
                         f"(the label mapping is built from it): {shown}")
    return [Sample(image_dir / key, mapping[raw], f"{path}, key {key!r}")
            for key, raw in labels.items()]


def check_images_exist(samples: Sequence[Sample], what: str) -> None:
    """Raise FileNotFoundError counting every missing image file and showing the first few."""
    missing = [sample for sample in samples if not sample.path.is_file()]
    if missing:
        shown = "; ".join(f"{sample.path} ({sample.source})" for sample in missing[:MAX_SHOWN])
        more = f"; and {len(missing) - MAX_SHOWN} more" if len(missing) > MAX_SHOWN else ""
        raise FileNotFoundError(f"{what}: {len(missing)} of {len(samples)} image files do not "
                                f"exist: {shown}{more}")


def _hidden(name: str) -> bool:
    # .ipynb_checkpoints, .DS_Store, .git, macOS's "._photo.jpg" resource forks.
    return name.startswith(".")


def class_folders(folder: Path) -> list[str]:
    """The sub-folders of ``folder`` in sorted order, hidden ones (name starting with ".")
    skipped."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_dir() and not _hidden(entry.name))


def image_files(folder: Path) -> list[Path]:
    """Every image file (torchvision's IMG_EXTENSIONS, any case) under ``folder``, recursively,
    sorted by path components; hidden files and folders (name starting with ".") are skipped."""
    found = []
    for parent, folders, files in os.walk(folder, followlinks=True):
        folders[:] = [name for name in folders if not _hidden(name)]
        found += [Path(parent, name) for name in files
                  if not _hidden(name) and has_file_allowed_extension(name, IMG_EXTENSIONS)]
    return sorted(found, key=lambda path: path.relative_to(folder).parts)
