"""The benchmarks the protocols run: one registry entry each.

An entry holds everything the protocol, the sweep, the records and the tables need to know
about a benchmark: its datamodule and task table (names, aliases, class counts: the data
registry's), how each phase sets the datamodule, the epochs, the default seeds, the groups
its table averages, and the published rows shown beside ours. Adding a benchmark is one entry.

Epochs follow the paper's authors (savadikarc/gift scripts/visual_classification/train.py,
``--hyperparameter_search --search_epochs``): the search trains with the final run's schedule
(100 epochs of warm-up and cosine) and stops after epoch 50 (VTAB-1k) or 25 (FGVC), so grid
points are compared while the learning rate is still high.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..data import FewShotDataModule, FGVCDataModule, ImageDataModule, VTAB1kDataModule
from ..data import registry
from ..errors import UserError
from . import published
from .published import PublishedRow

PHASES = ("search", "final")


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark is run and tabulated.

    Args:
        name: the key used in records and on the command line ("vtab").
        title: the name in tables ("VTAB-1k").
        datamodule: its ImageDataModule subclass.
        tasks: the data registry's table of its tasks or datasets.
        task_arg: the datamodule argument that names the task ("task" or "dataset").
        phase_args: datamodule arguments per phase (the search and final splits).
        search_stop_epoch: the search stops after this epoch of the final schedule.
        final_epochs: the final runs' schedule length (the search's too).
        search_by_default: whether the protocol searches unless told otherwise.
        default_seeds: seeds of the final runs.
        shots: few-shot benchmarks: the shots of a sweep (each task is run per number of shots,
            and the seed picks the training list too).
        final_with_val_args: datamodule arguments that add the val split to the final runs'
            training data, where the benchmark allows it.
        custom_tasks: a folder under the data root outside the registry is a task too.
        groups: table columns averaging a subset of the tasks.
        published: published results shown beside ours.
    """

    name: str
    title: str
    datamodule: type[ImageDataModule]
    tasks: Mapping[str, Any]
    task_arg: str
    phase_args: Mapping[str, Mapping[str, Any]]
    search_stop_epoch: int
    final_epochs: int = 100
    search_by_default: bool = True
    default_seeds: tuple[int, ...] = (0,)
    shots: Optional[tuple[int, ...]] = None
    final_with_val_args: Optional[Mapping[str, Any]] = None
    custom_tasks: bool = True
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    published: tuple[PublishedRow, ...] = ()

    def data_args(self, task: "TaskRef", phase: str, seed: int,
                  final_with_val: bool = False) -> dict[str, Any]:
        """The datamodule's arguments for one run of ``task`` (the data root aside)."""
        if phase not in PHASES:
            raise UserError(f"phase must be one of {PHASES}, got {phase!r}")
        args: dict[str, Any] = {self.task_arg: task.task, **self.phase_args.get(phase, {})}
        if phase == "final" and final_with_val:
            args.update(self.final_with_val_args or {})
        if self.shots is not None:
            args.update(shots=task.shots, seed=seed)
        entry = registry.find(task.task, self.tasks)
        if entry is not None and "num_classes" in _parameters(self.datamodule):
            # Stated explicitly (the datamodule checks it against the registry) so that the
            # datamodule's saved hyperparameters agree with the model's linked num_classes.
            args["num_classes"] = entry.num_classes
        return args


def _parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("vtab", "VTAB-1k", VTAB1kDataModule, registry.VTAB_TASKS, "task",
              {"search": {"split": "train800"}, "final": {"split": "train800val200"}},
              search_stop_epoch=50,
              groups={g: tuple(registry.vtab_tasks_in_group(g)) for g in registry.VTAB_GROUPS},
              published=published.VTAB),
    Benchmark("fgvc", "FGVC", FGVCDataModule, registry.FGVC_DATASETS, "dataset",
              {"search": {"use_val_for_train": False}, "final": {"use_val_for_train": False}},
              search_stop_epoch=25, final_with_val_args={"use_val_for_train": True},
              custom_tasks=False, published=published.FGVC),
    # NOAH's few-shot protocol: fixed hyper-parameters, three sampled training lists per shot.
    Benchmark("fewshot", "Few-shot FGVC", FewShotDataModule, registry.FEWSHOT_DATASETS,
              "dataset", {}, search_stop_epoch=50, search_by_default=False,
              default_seeds=(0, 1, 2), shots=(1, 2, 4, 8, 16)),
)}


def get_benchmark(name: str) -> Benchmark:
    """The registry entry of a benchmark; UserError suggests the closest name."""
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}{registry.did_you_mean(name, list(BENCHMARKS))}"
                        f"; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


@dataclass(frozen=True)
class TaskRef:
    """One task of a benchmark (few-shot tasks also name their number of shots)."""

    benchmark: str
    task: str
    shots: Optional[int] = None

    def __str__(self) -> str:
        return self.task if self.shots is None else f"{self.task} ({self.shots}-shot)"


def resolve_task(benchmark: str, name: str, shots: Optional[int] = None,
                 data_root: Optional[Union[str, Path]] = None) -> TaskRef:
    """Canonical task for a user-given name; UserError suggests the closest known name.

    Where the benchmark allows custom tasks, a name outside the registry is a task when
    ``data_root`` holds a folder of that name (the datamodules read it in the same layout).
    """
    entry = get_benchmark(benchmark)
    if (shots is not None) != (entry.shots is not None):
        raise UserError(f"shots must be given for few-shot tasks and only for them "
                        f"(benchmark {benchmark!r}, shots {shots!r})")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots <= 0):
        raise UserError(f"shots must be a positive int, got {shots!r}")
    found = registry.find(name, entry.tasks)
    if found is not None:
        return TaskRef(benchmark, found.name, shots)
    known = {spelling: task.name for task in entry.tasks.values()
             for spelling in registry.spellings(task)}
    suggestion = registry.closest(name, list(known))
    message = (f"unknown {entry.title} task {name!r}"
               + ("" if suggestion is None else f" (did you mean {known[suggestion]!r}?)")
               + f"; known: {', '.join(entry.tasks)}")
    if not entry.custom_tasks or data_root is None:
        raise UserError(message)
    if (Path(data_root) / name).is_dir():
        return TaskRef(benchmark, name, shots)
    raise UserError(f"{message}; {data_root} has no folder {name!r} for a custom task either")


def benchmark_tasks(benchmark: str, names: Optional[Sequence[str]] = None,
                    shots: Optional[Sequence[int]] = None,
                    data_root: Optional[Union[str, Path]] = None) -> list[TaskRef]:
    """The tasks of a sweep: all of the benchmark's, or the named ones (aliases accepted);
    few-shot tasks once per number of shots (default: the benchmark's)."""
    entry = get_benchmark(benchmark)
    if shots is not None and entry.shots is None:
        raise UserError(f"shots apply to few-shot benchmarks only, not {benchmark!r}")
    chosen = list(names) if names else list(entry.tasks)
    shot_list: list[Optional[int]] = ([None] if entry.shots is None
                                      else list(shots or entry.shots))
    tasks = [resolve_task(benchmark, name, k, data_root) for name in chosen for k in shot_list]
    if len(set(tasks)) != len(tasks):
        raise UserError(f"the task list names a task twice: {', '.join(chosen)}")
    return tasks
