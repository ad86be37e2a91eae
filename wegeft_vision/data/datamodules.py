"""LightningDataModules for VTAB-1k, FGVC, few-shot FGVC and any torchvision ImageFolder tree.

All four share ``ImageDataModule``: normalisation from the backbone's timm data config, loader
defaults, the in-memory cache, and ``setup()`` that validates every needed split (annotation
files, labels, image files) before any image is decoded. ``num_classes`` and ``class_names`` are
known right after ``__init__`` so a CLI can link them to the model.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
import torch
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import UserError
from .checks import listing, optional_int, require_dir, require_file, require_int
from .datasets import ImageListDataset
from .readers import (NO_LABEL, RawLabel, Sample, build_label_mapping, check_images_exist,
                      class_folders, image_files, json_samples, read_json_labels, read_list_file)
from .registry import (FEWSHOT_DATASETS, VTAB_TASKS, FewShotDataset, VTABTask, did_you_mean,
                       fgvc_dataset, find, normalize_name, spellings)
from .transforms import (SplitTransform, backbone_data_config, crop_transform, resize_transform,
                         timm_eval_config)

log = logging.getLogger(__name__)
PathLike = Union[str, Path]
SPLITS: tuple[str, ...] = ("train", "val", "test")
# "predict" is the images under predict_root; without predict_root, predict reads the test split.
STAGE_SPLITS: dict[Optional[str], tuple[str, ...]] = {
    "fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",),
    None: (*SPLITS, "predict"),
}
IMAGE_EXTENSIONS = ", ".join(IMG_EXTENSIONS)
# Auto caching keeps the train and val splits (read every epoch) while they fit in this budget.
DEFAULT_CACHE_BUDGET_GB = 2.0
MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_num_workers() -> int:
    """One CPU stays with the training process; at most 8 loader workers."""
    return max(0, min(MAX_AUTO_WORKERS, available_cpus() - 1))


def find_folder(root: Path, names: Sequence[str]) -> Optional[Path]:
    """The sub-folder of ``root`` named like one of ``names``: exactly, else ignoring case and
    '-', '_', '.', spaces."""
    require_dir(root, "root folder")
    for name in names:
        if (root / name).is_dir():
            return root / name
    keys = {normalize_name(name) for name in names}
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and normalize_name(folder.name) in keys:
            return folder
    return None


def registered_or_custom_folder(root: Path, name: str, entry: Optional[VTABTask | FewShotDataset],
                                table: Mapping[str, object], what: str) -> Path:
    """The folder of a registered task/dataset under any spelling, or ``<root>/<name>``.

    A name outside the registry without a folder is most likely a typo: ValueError with the
    closest registered name.
    """
    names = (name,) if entry is None else tuple(dict.fromkeys((name, *spellings(entry))))
    folder = find_folder(root, names)
    if folder is not None:
        return folder
    if entry is None:
        raise ValueError(f"unknown {what} {name!r}{did_you_mean(name, list(table))} and no "
                         f"folder {root / name} for a custom one; {root} holds: {listing(root)}")
    raise FileNotFoundError(f"no folder for {what} {name!r} under {root} (tried: "
                            f"{', '.join(names)}); {root} holds: {listing(root)}")


def resolve_num_classes(num_classes: Optional[int], entry: Optional[VTABTask | FewShotDataset],
                        description: str, infer: Callable[[], int]) -> int:
    """The registry's class count (``num_classes`` must agree), else the given or inferred one."""
    optional_int(num_classes, "num_classes", 1)
    if entry is None:
        return num_classes if num_classes is not None else infer()
    if num_classes is not None and num_classes != entry.num_classes:
        raise ValueError(f"num_classes={num_classes} contradicts {description}, which has "
                         f"{entry.num_classes} classes; leave num_classes unset")
    return entry.num_classes


def largest_label_plus_one(list_file: Path, image_dir: Path) -> int:
    """A custom task's class count: 1 + the largest label of its training list."""
    return 1 + max(sample.label for sample in read_list_file(list_file, image_dir))


class ImageDataModule(L.LightningDataModule):
    """Base class: loaders, normalisation and caching shared by every datamodule.

    Args:
        root: folder holding the data; each subclass documents its layout.
        batch_size: samples per batch for every split.
        num_workers: loader processes; None picks ``min(8, CPUs - 1)`` for splits read from
            disk and 0 for cached splits (a cached batch only needs normalising).
        backbone: timm model name (optionally with a pretrained tag) whose pretrained data
            config gives input size, mean/std and interpolation; no weights are downloaded.
        image_size: input size in pixels (square); overrides the backbone's.
        mean: per-channel mean; overrides the backbone's.
        std: per-channel std; overrides the backbone's.
        interpolation: resize interpolation ("bilinear", "bicubic", ...); overrides the
            backbone's.
        cache: keep decoded, resized images of the splits without augmentation in memory.
            None caches the train and val splits while they fit in ``cache_budget_gb``; True
            caches every split without augmentation; False caches nothing.
        pin_memory: pin batches in page-locked memory; None pins when CUDA is available.
        cache_budget_gb: memory the automatic cache may use, in GiB.
        predict_root: a folder of new images to classify: ``predict`` then reads every image
            under it (recursively, in sorted order, hidden files and folders skipped; no labels)
            with the evaluation pipeline, instead of the test split.
    """

    def __init__(self, root: PathLike, batch_size: int = 32, num_workers: Optional[int] = None,
                 backbone: Optional[str] = None, image_size: Optional[int] = None,
                 mean: Optional[tuple[float, float, float]] = None,
                 std: Optional[tuple[float, float, float]] = None,
                 interpolation: Optional[str] = None, cache: Optional[bool] = None,
                 pin_memory: Optional[bool] = None,
                 cache_budget_gb: float = DEFAULT_CACHE_BUDGET_GB,
                 predict_root: Optional[PathLike] = None) -> None:
        super().__init__()
        require_int(batch_size, "batch_size", 1)
        optional_int(num_workers, "num_workers", 0)
        if cache_budget_gb < 0:
            raise ValueError(f"cache_budget_gb must be >= 0, got {cache_budget_gb}")
        # num_classes is the model's hyperparameter: a subclass's unresolved None here would make
        # Lightning refuse to log a model and datamodule that disagree on it.
        self.save_hyperparameters(ignore=["num_classes"])
        # Path objects break loading checkpoints with weights_only.
        self.hparams["root"] = str(root)
        self.hparams["predict_root"] = None if predict_root is None else str(predict_root)
        self.root = Path(root).expanduser()
        self.predict_root = None if predict_root is None else Path(predict_root).expanduser()
        self.batch_size = batch_size
        self.data_config = backbone_data_config(backbone, image_size, mean, std, interpolation)
        self._auto_workers = num_workers is None
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.cache = cache
        self.cache_budget_bytes = int(cache_budget_gb * 2**30)
        self.num_classes: int = 0
        self.class_names: Optional[list[str]] = None
        self.datasets: dict[str, ImageListDataset] = {}

    # What a subclass provides.
    def read_split(self, split: str) -> list[Sample]:
        """Read and validate the annotations of ``split`` ("train", "val" or "test")."""
        raise NotImplementedError

    def split_transform(self, split: str) -> SplitTransform:
        """The pipeline for ``split``."""
        raise NotImplementedError

    def _split_files(self, split: str) -> list[Path]:
        """The annotation files ``read_split(split)`` reads (a subclass's part of
        ``split_files``)."""
        raise NotImplementedError

    def split_files(self, splits: Sequence[str] = SPLITS) -> list[Path]:
        """The list / annotation files that define the samples and labels of ``splits``.

        For each split in order, every file ``read_split`` reads for it, each file once:
        VTAB-1k and few-shot the split's list file; FGVC ``train.json`` for every split (the
        label mapping comes from it), the split's json file, and ``val.json`` for the training
        split under ``use_val_for_train``. A folder tree (``ImageFolderDataModule``) has no such
        files: its data is the tree itself, and the result is ``[]``. ``predict_root`` is not
        a split. Two datamodules whose files are equal byte for byte (and whose image files
        are) read the same samples with the same labels.

        Raises:
            UserError: a name in ``splits`` other than "train", "val", "test".
            MissingFileError: a file (or the folder that should hold it) does not exist,
                naming it; nothing else is checked (``setup()`` validates the content).
        """
        unknown = [split for split in splits if split not in SPLITS]
        if unknown:
            raise UserError(f"unknown split(s) {', '.join(map(repr, unknown))}; expected "
                            f"some of {', '.join(SPLITS)}")
        files = list(dict.fromkeys(file for split in splits for file in self._split_files(split)))
        for file in files:
            require_file(file, f"{self.description}: annotation file")
        return files

    @property
    def description(self) -> str:
        """Names the data in messages, e.g. "VTAB-1k task 'cifar'"."""
        return f"{type(self).__name__}({self.root})"

    def eval_data_config(self) -> dict[str, Any]:
        """The evaluation preprocessing as a timm ``pretrained_cfg``: input_size (3, H, W), mean,
        std, interpolation, crop_pct and crop_mode.

        ``timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg))`` on a
        PIL image then gives this datamodule's val/test/predict tensors (to float32 rounding:
        both resize with PIL).
        """
        return timm_eval_config(self.data_config, self.split_transform("test"))

    # Lightning hooks.
    def setup(self, stage: Optional[str] = None) -> None:
        """Validate the splits ``stage`` needs, then fill the cache where it is on."""
        if stage not in STAGE_SPLITS:
            raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGE_SPLITS)}")
        splits = STAGE_SPLITS[stage]
        if self.predict_root is None:
            splits = tuple(dict.fromkeys("test" if s == "predict" else s for s in splits))
        new = [split for split in splits if split not in self.datasets]
        samples = {split: self._read(split) for split in new}
        for split, split_samples in samples.items():
            check_images_exist(split_samples, f"{self.description}, {split} split")
        for split in new:
            # New images get the evaluation pipeline.
            transform = self.split_transform("test" if split == "predict" else split)
            self.datasets[split] = ImageListDataset(samples[split], transform,
                                                    labelled=split != "predict")
        for split in new:
            if self._should_cache(split):
                self.datasets[split].fill_cache(self.num_workers)

    def _read(self, split: str) -> list[Sample]:
        if split != "predict":
            return self.read_split(split)
        folder = require_dir(self.predict_root, "predict_root folder")
        files = image_files(folder)
        if not files:
            raise ValueError(f"predict_root {folder} holds no images with extensions "
                             f"{IMAGE_EXTENSIONS} (hidden files and folders are skipped); it "
                             f"holds: {listing(folder)}")
        return [Sample(path, NO_LABEL, f"predict_root {folder}") for path in files]

    def _should_cache(self, split: str) -> bool:
        dataset = self.datasets[split]
        if self.cache is False or dataset.transform.augments:
            return False
        if self.cache:
            return True
        if split in ("test", "predict"):
            return False  # read once per run: decoding it up front gains nothing
        height, width = self.data_config.input_size
        used = sum(ds.cache.numel() for ds in self.datasets.values() if ds.cache is not None)
        needed = len(dataset) * 3 * height * width
        if used + needed > self.cache_budget_bytes:
            log.info("not caching the %s split: %.0f MB would exceed the %.0f MB budget", split,
                     (used + needed) / 2**20, self.cache_budget_bytes / 2**20)
            return False
        return True

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"the {split} split is not set up: call setup() first "
                               "(the Trainer does this)")
        dataset = self.datasets[split]
        workers = 0 if self._auto_workers and dataset.cache is not None else self.num_workers
        sampler = None
        trainer = self.trainer
        if not shuffle and trainer is not None and trainer.world_size > 1:
            # Lightning's default DistributedSampler pads evaluation splits with repeated images;
            # this one gives each image to exactly one process, so metrics equal one process's.
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size,
                                                   rank=trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, num_workers=workers, pin_memory=self.pin_memory,
                          persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test" if self.predict_root is None else "predict", shuffle=False)


class VTAB1kDataModule(ImageDataModule):
    """VTAB-1k in NOAH's layout: resize to the input size, no augmentation.

    Layout: ``<root>/<task>/{train800,val200,train800val200,test}.txt`` with lines
    ``images/train800/000123.jpg 7``, paths relative to the task folder. ``split="train800"``
    trains on train800 and validates on val200 (the hyper-parameter search protocol);
    ``"train800val200"`` trains on all 1000 images and validates on val200 (the final protocol).
    Any other list file of the task folder can be the training list too
    (``split="train_shot8_seed0"`` reads ``train_shot8_seed0.txt``). Validation is always
    ``val200.txt``, test ``test.txt``.

    A ``task`` outside the 19 VTAB-1k tasks is read from ``<root>/<task>/`` in the same layout;
    its ``num_classes`` is taken as given, or else as 1 + the largest label of its training list
    (read in ``__init__``).

    Args:
        root: folder holding the task folders.
        task: task name or folder spelling (``cifar``/``cifar100``, ...); see ``VTAB_TASKS``.
        split: the training list's name: ``"train800"``, ``"train800val200"`` or another list.
        num_classes: for a task outside the registry; must match the registry otherwise.
        **common: ``ImageDataModule`` arguments (batch_size, backbone, image_size, cache, ...).
    """

    def __init__(self, root: PathLike, task: str, split: str = "train800val200",
                 num_classes: Optional[int] = None, **common) -> None:
        if not isinstance(split, str) or not split or split in ("val200", "test"):
            raise ValueError(f"split names the training list, e.g. 'train800' or "
                             f"'train800val200'; got {split!r}")
        super().__init__(root, **common)
        self.split = split
        self.task_info = find(task, VTAB_TASKS)
        self.task = task if self.task_info is None else self.task_info.name
        self._list_files = {"train": split, "val": "val200", "test": "test"}
        self.num_classes = resolve_num_classes(
            num_classes, self.task_info, self.description,
            lambda: largest_label_plus_one(self.list_file("train"), self.task_folder()))

    @property
    def description(self) -> str:
        return f"VTAB-1k task {self.task!r}"

    def task_folder(self) -> Path:
        """``<root>/<task>`` under whichever spelling is on disk."""
        return registered_or_custom_folder(self.root, self.task, self.task_info, VTAB_TASKS,
                                           "VTAB-1k task")

    def list_file(self, split: str) -> Path:
        return self.task_folder() / f"{self._list_files[split]}.txt"

    def read_split(self, split: str) -> list[Sample]:
        return read_list_file(self.list_file(split), self.task_folder(), self.num_classes)

    def _split_files(self, split: str) -> list[Path]:
        return [self.list_file(split)]

    def split_transform(self, split: str) -> SplitTransform:
        return resize_transform(self.data_config)


class FGVCDataModule(ImageDataModule):
    """FGVC in VPT's json layout, with VPT's transforms.

    Layout: ``<dataset folder>/{train,val,test}.json``, each ``{"relative/path.jpg": label}``,
    paths relative to the dataset's image folder (CUB_200_2011 and nabirds: ``images/``,
    StanfordDogs: ``Images/``, OxfordFlowers and StanfordCars: the dataset folder). ``root`` is
    the dataset folder, or a folder holding it under one of its spellings. Raw labels (strings
    like "001", sparse ints) are mapped to 0..C-1 in sorted order, from train.json only, and the
    same mapping is applied to val and test. Train: resize the short side to 256/224 of the input
    size, random crop, horizontal flip; val/test: same resize, centre crop.

    Args:
        root: the dataset folder or its parent.
        dataset: CUB_200_2011, nabirds, OxfordFlowers, StanfordDogs or StanfordCars (or an alias).
        use_val_for_train: train on train + val (the final protocol); val still serves the
            validation loop.
        **common: ``ImageDataModule`` arguments.
    """

    def __init__(self, root: PathLike, dataset: str, use_val_for_train: bool = False,
                 **common) -> None:
        super().__init__(root, **common)
        self.info = fgvc_dataset(dataset)
        self.dataset = self.info.name
        self.num_classes = self.info.num_classes
        self.use_val_for_train = use_val_for_train
        self.label_mapping: Optional[dict[RawLabel, int]] = None

    @property
    def description(self) -> str:
        return f"FGVC dataset {self.dataset!r}"

    def dataset_folder(self) -> Path:
        """``root`` when it holds train.json, else its sub-folder spelled like the dataset."""
        require_dir(self.root, "root folder")
        if (self.root / "train.json").is_file():
            return self.root
        folder = find_folder(self.root, spellings(self.info))
        if folder is None:
            raise FileNotFoundError(f"{self.root} holds neither train.json nor a folder for "
                                    f"{self.description} (tried: {', '.join(spellings(self.info))}"
                                    f"); it holds: {listing(self.root)}")
        return folder

    def _json_split(self, folder: Path, name: str) -> list[Sample]:
        train_json = folder / "train.json"
        if self.label_mapping is None:
            mapping = build_label_mapping(list(read_json_labels(train_json).values()))
            if len(mapping) != self.num_classes:
                raise ValueError(f"{train_json}: {len(mapping)} distinct labels, but "
                                 f"{self.description} has {self.num_classes} classes")
            self.label_mapping = mapping
        path = folder / f"{name}.json"
        image_dir = require_dir(folder / self.info.image_dir, f"{self.description} image folder")
        return json_samples(path, read_json_labels(path), self.label_mapping, image_dir,
                            str(train_json))

    def _split_names(self, split: str) -> list[str]:
        return ["train", "val"] if split == "train" and self.use_val_for_train else [split]

    def read_split(self, split: str) -> list[Sample]:
        folder = self.dataset_folder()
        return [sample for name in self._split_names(split)
                for sample in self._json_split(folder, name)]

    def _split_files(self, split: str) -> list[Path]:
        folder = self.dataset_folder()
        return [folder / f"{name}.json" for name in ("train", *self._split_names(split))]

    def split_transform(self, split: str) -> SplitTransform:
        return crop_transform(self.data_config, train=split == "train")


class FewShotDataModule(ImageDataModule):
    """Few-shot FGVC in NOAH's layout.

    Layout: ``<root>/<dataset>/annotations/train_meta.list.num_shot_<shots>.seed_<seed>``,
    ``val_meta.list`` and ``test_meta.list``, lines ``relative/path label`` (0-based); images
    under ``<root>/<dataset>/images/`` (stanford_cars: under ``<root>/<dataset>/``). NOAH's five
    datasets use shots 1, 2, 4, 8, 16 and seeds 0, 1, 2; other values work where their list
    file exists. A ``dataset`` outside the registry is read from ``<root>/<dataset>/`` (images
    under ``images/`` when that folder exists), with ``num_classes`` as given or 1 + the largest
    label of its training list.

    Args:
        root: folder holding the dataset folders.
        dataset: fgvc_aircraft, food101, oxford_flowers102, oxford_pets or stanford_cars (or a
            common spelling such as ``fgvc-aircraft``).
        shots: training images per class.
        seed: which of the sampled training lists.
        augment: True: FGVC transforms (random crop + flip for training, centre crop for
            evaluation); False: resize only, as for VTAB-1k (cacheable).
        num_classes: for a dataset outside the registry; must match the registry otherwise.
        **common: ``ImageDataModule`` arguments.
    """

    def __init__(self, root: PathLike, dataset: str, shots: int, seed: int = 0,
                 augment: bool = True, num_classes: Optional[int] = None, **common) -> None:
        require_int(shots, "shots", 1)
        require_int(seed, "seed", 0)
        super().__init__(root, **common)
        self.info = find(dataset, FEWSHOT_DATASETS)
        self.dataset = dataset if self.info is None else self.info.name
        self.shots, self.seed, self.augment = shots, seed, augment
        self._list_files = {"train": f"train_meta.list.num_shot_{shots}.seed_{seed}",
                            "val": "val_meta.list", "test": "test_meta.list"}
        self.num_classes = resolve_num_classes(
            num_classes, self.info, self.description,
            lambda: largest_label_plus_one(self.list_file("train"), self.image_folder()))

    @property
    def description(self) -> str:
        return f"few-shot dataset {self.dataset!r}"

    def dataset_folder(self) -> Path:
        """``<root>/<dataset>`` under whichever spelling is on disk."""
        return registered_or_custom_folder(self.root, self.dataset, self.info, FEWSHOT_DATASETS,
                                           "few-shot dataset")

    def image_folder(self) -> Path:
        folder = self.dataset_folder()
        if self.info is None:
            return folder / "images" if (folder / "images").is_dir() else folder
        return require_dir(folder / self.info.image_dir, f"{self.description} image folder")

    def list_file(self, split: str) -> Path:
        return self.dataset_folder() / "annotations" / self._list_files[split]

    def read_split(self, split: str) -> list[Sample]:
        return read_list_file(self.list_file(split), self.image_folder(), self.num_classes)

    def _split_files(self, split: str) -> list[Path]:
        return [self.list_file(split)]

    def split_transform(self, split: str) -> SplitTransform:
        if self.augment:
            return crop_transform(self.data_config, train=split == "train")
        return resize_transform(self.data_config)


class ImageFolderDataModule(ImageDataModule):
    """Any dataset in torchvision's ImageFolder layout: ``<root>/{train,val,test}/<class>/*.jpg``.

    Classes are the sub-folders of ``train/`` in sorted order (read in ``__init__``); val and
    test may lack some classes but hold no others. Each class holds the image files anywhere
    under its folder. Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``, any name
    starting with ".") are neither classes nor images. ``test/`` is needed only for testing.

    Args:
        root: folder holding ``train/``, ``val/`` and optionally ``test/``.
        augment: True: FGVC transforms (random crop + flip for training, centre crop for
            evaluation); False: resize only, as for VTAB-1k (cacheable).
        **common: ``ImageDataModule`` arguments.
    """

    def __init__(self, root: PathLike, augment: bool = True, **common) -> None:
        super().__init__(root, **common)
        self.augment = augment
        train = require_dir(self.root / "train", "ImageFolder train folder")
        self.class_names = class_folders(train)
        if not self.class_names:
            raise ValueError(f"ImageFolder train folder {train} holds no class folders; it "
                             f"holds: {listing(train)}")
        self.class_to_idx = {name: index for index, name in enumerate(self.class_names)}
        self.num_classes = len(self.class_names)

    def read_split(self, split: str) -> list[Sample]:
        folder = require_dir(self.root / split, f"ImageFolder {split} folder")
        classes = class_folders(folder)
        extra = [name for name in classes if name not in self.class_to_idx]
        if extra:
            raise ValueError(f"{folder} holds class folders that train/ lacks: {', '.join(extra)}")
        files = {name: image_files(folder / name) for name in classes}
        empty = [name for name, paths in files.items() if not paths]
        if split == "train" and empty:
            raise ValueError(f"{folder}: class folder(s) {', '.join(empty)} hold no images with "
                             f"extensions {IMAGE_EXTENSIONS}")
        samples = [Sample(path, self.class_to_idx[name], str(folder))
                   for name, paths in files.items() for path in paths]
        if not samples:
            raise ValueError(f"{folder} holds no images with extensions {IMAGE_EXTENSIONS}")
        return samples

    def _split_files(self, split: str) -> list[Path]:
        return []  # the folder tree is the data

    def split_transform(self, split: str) -> SplitTransform:
        if self.augment:
            return crop_transform(self.data_config, train=split == "train")
        return resize_transform(self.data_config)
