"""Datamodules for VTAB-1k, FGVC, few-shot FGVC and image folders, and their building blocks."""
from .datamodules import (FewShotDataModule, FGVCDataModule, ImageDataModule,
                          ImageFolderDataModule, VTAB1kDataModule, default_num_workers)
from .datasets import ImageDecodeError, ImageListDataset, load_rgb
from .readers import (Sample, build_label_mapping, json_samples, read_json_labels,
                      read_list_file)
from .registry import (FEWSHOT_DATASETS, FGVC_DATASETS, VTAB_GROUPS, VTAB_TASKS, fewshot_dataset,
                       fgvc_dataset, vtab_task, vtab_tasks_in_group)
from .transforms import DataConfig, SplitTransform, backbone_data_config

__all__ = [
    "ImageDataModule", "VTAB1kDataModule", "FGVCDataModule", "FewShotDataModule",
    "ImageFolderDataModule", "default_num_workers", "ImageDecodeError", "ImageListDataset",
    "load_rgb", "Sample", "read_list_file", "read_json_labels", "build_label_mapping",
    "json_samples", "VTAB_TASKS", "VTAB_GROUPS", "FGVC_DATASETS", "FEWSHOT_DATASETS",
    "vtab_task", "fgvc_dataset", "fewshot_dataset", "vtab_tasks_in_group", "DataConfig",
    "SplitTransform", "backbone_data_config",
]
