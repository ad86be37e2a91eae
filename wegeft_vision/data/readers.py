"""Readers for the annotation files of the benchmarks, each failing with the file and line at fault.

* ``read_list_file``: NOAH's ``path label`` lines, used by VTAB-1k and few-shot FGVC.
* ``read_json_labels`` + ``build_label_mapping`` + ``json_samples``: VPT's FGVC json files, with
  the label mapping built from the train split and applied to the other splits.
* ``class_folders`` + ``image_trees``: folder trees (ImageFolder, ``predict_root``), skipping
  hidden entries and listing each folder once however many symlinks lead to it.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from ..errors import UserError
from .checks import require_file

log = logging.getLogger(__name__)
RawLabel = Union[int, str]
MAX_SHOWN = 5
NO_LABEL = -1  # the label of an image to classify (``predict_root``)


@dataclass(frozen=True)
class Sample:
    """One image with its 0-based label, and where in which annotation file it came from."""

    path: Path
    label: int
    source: str


def inside(image_dir: Path, relative: str, where: str) -> Path:
    """``image_dir / relative``, refusing an absolute path or one whose ``..`` parts leave
    ``image_dir``: pathlib's ``/`` would silently read any file on the machine."""
    # Checked on the text, not on resolved paths: symlinks inside the dataset may point anywhere.
    normal = os.path.normpath(relative)
    if (os.path.isabs(relative) or Path(relative).drive or normal == ".."
            or normal.startswith(".." + os.sep)):
        raise UserError(f"{where}: image path {relative!r} leaves the image folder {image_dir} "
                        "(absolute, or '..' above it); paths must be relative to it")
    return image_dir / relative


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
            raise UserError(f"{where}: expected 'relative/path label', got {line!r}")
        relative, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise UserError(f"{where}: label {label_text!r} is not an integer "
                            f"(line {line!r})") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            limit = "" if num_classes is None else \
                f" for {num_classes} classes (0..{num_classes - 1})"
            raise UserError(f"{where}: label {label} is out of range{limit}")
        samples.append(Sample(inside(image_dir, relative, where), label, where))
    if not samples:
        raise UserError(f"list file {path} holds no samples")
    return samples


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise UserError(f"duplicate key {key!r}")
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
        raise UserError(f"{path}, line {exc.lineno}: invalid json: {exc.msg}") from None
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a json object {{\"path\": label}}, "
                        f"got {type(data).__name__}")
    if not data:
        raise UserError(f"json file {path} holds no samples")
    for key, label in data.items():
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise UserError(f"{path}: key {key!r} has label {label!r}; labels must be ints or "
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
        raise UserError(f"{path}: {len(unknown)} label(s) do not occur in {mapping_source} "
                        f"(the label mapping is built from it): {shown}")
    return [Sample(inside(image_dir, key, f"{path}, key {key!r}"), mapping[raw],
                   f"{path}, key {key!r}") for key, raw in labels.items()]


def _hidden(name: str) -> bool:
    # .ipynb_checkpoints, .DS_Store, .git, macOS's "._photo.jpg" resource forks.
    return name.startswith(".")


def class_folders(folder: Path) -> list[str]:
    """The sub-folders of ``folder`` in sorted order, hidden ones (name starting with ".")
    skipped."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_dir() and not _hidden(entry.name))


def _identity(path: Union[str, Path]) -> tuple[int, int]:
    info = os.stat(path)  # follows symlinks: the folder a link leads to
    return info.st_dev, info.st_ino


def _ancestors(path: Path) -> set[tuple[int, int]]:
    """The folders that hold ``path``, as written and as resolved (it may be a symlink)."""
    folders = {*Path(os.path.abspath(path)).parents, *path.resolve().parents}
    return {_identity(folder) for folder in folders}


def image_trees(roots: Sequence[Path]) -> list[list[Path]]:
    """For each folder of ``roots``, every image file (torchvision's IMG_EXTENSIONS, any case)
    under it, recursively, sorted by path components; hidden files and folders (name starting
    with ".") are skipped.

    Symlinked folders are followed, but every real folder is listed once, across all roots:
    each under its path without symlinks where it has one (all roots' real trees are walked
    before any link is followed), else under the first link (in sorted order) that leads to it.
    A link to a folder already listed, or to a folder holding a root (a loop), is skipped, and
    so is a root that is such a folder: a symlink loop neither repeats images nor hangs.
    Symlinked files are entries of their own.
    """
    roots = [Path(root) for root in roots]
    holding = set().union(*(_ancestors(root) for root in roots))
    seen: set[tuple[int, int]] = set()
    found: list[list[Path]] = [[] for _ in roots]
    links: list[tuple[int, Path]] = []

    def claim(folder: Path) -> bool:
        try:
            key = _identity(folder)
        except OSError:  # a broken link, or one in a loop the OS gave up resolving
            log.info("skipped %s: it leads to no folder", folder)
            return False
        if key in seen or key in holding:
            log.info("skipped %s: the folder it leads to is listed already or holds %s",
                     folder, "the listed folder" if len(roots) == 1 else "a listed folder")
            return False
        seen.add(key)
        return True

    def walk(index: int, top: Path) -> None:
        for parent, folders, files in os.walk(top):
            keep = []
            for name in sorted(folders):
                path = Path(parent, name)
                if _hidden(name):
                    continue
                if path.is_symlink():
                    links.append((index, path))  # after every real tree
                elif claim(path):
                    keep.append(name)
            folders[:] = keep
            found[index] += [Path(parent, name) for name in files
                             if not _hidden(name) and has_file_allowed_extension(name,
                                                                                 IMG_EXTENSIONS)]

    for index, root in enumerate(roots):
        if claim(root):
            walk(index, root)
    while links:
        index, link = links.pop(0)
        if claim(link):
            walk(index, link)
    return [sorted(paths, key=lambda path: path.relative_to(root).parts)
            for root, paths in zip(roots, found)]


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder``, each real folder once: ``image_trees([folder])``."""
    return image_trees([folder])[0]
