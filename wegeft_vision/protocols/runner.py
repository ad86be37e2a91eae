"""The paper's protocol for one task: search -> pick the best by val accuracy -> final runs.

VTAB-1k: search on train800 -> val200, final on train800val200 -> test. FGVC: search on
train -> val, final on train (optionally + val) -> test. Few-shot FGVC: by default no search
(fixed hyperparameters from the configs, as NOAH does); final runs train on the
``num_shot_k.seed_s`` list for each seed s and test on the test list.

Each run goes through the training CLI (``wegeft_vision.cli.cli_main``) with the user's config
files plus overrides, and leaves one JSON record (see ``records``). A run whose record exists
with the same settings (epochs, data root and the content of the list files read, config file
contents, passed-through arguments, backbone weights file) is skipped, so an interrupted
protocol resumes where it stopped and a finished one does no work; a record made with other
settings is stale and its run is done again. An interrupted run resumes from its Lightning
checkpoint (``last.ckpt``, written every epoch) when the settings are unchanged.

Output folder layout: ``<out>/records/...json`` (the results), ``<out>/runs/...`` (Lightning
logs and checkpoints of each run).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml

from ..adapters import ParameterCount
from ..data import registry
from .grid import PAPER_GRID, Grid, check_grid, expand_grid, parse_grid, parse_value
from .records import (HParamValue, PathLike, RunKey, RunRecord, read_record,
                      record_path, settings_diff, write_record)

logger = logging.getLogger("wegeft_vision.protocols")


@dataclass(frozen=True)
class Protocol:
    """How one benchmark is run: data module, splits per phase, epochs per phase."""

    benchmark: str
    data_class: str
    search_epochs: int
    final_epochs: int
    search_by_default: bool
    default_seeds: tuple[int, ...]


PROTOCOLS: dict[str, Protocol] = {
    "vtab": Protocol("vtab", "wegeft_vision.data.VTAB1kDataModule", 50, 100, True, (0,)),
    "fgvc": Protocol("fgvc", "wegeft_vision.data.FGVCDataModule", 25, 100, True, (0,)),
    "fewshot": Protocol("fewshot", "wegeft_vision.data.FewShotDataModule", 50, 100, False,
                        registry.FEWSHOT_SEEDS),
}


# Each benchmark's registry table: task names, aliases and class counts.
TASK_TABLES: dict[str, dict[str, Any]] = {"vtab": registry.VTAB_TASKS,
                                          "fgvc": registry.FGVC_DATASETS,
                                          "fewshot": registry.FEWSHOT_DATASETS}


def get_protocol(benchmark: str) -> Protocol:
    """The protocol of a benchmark; ValueError suggests the closest name."""
    if benchmark not in PROTOCOLS:
        raise ValueError(f"unknown benchmark {benchmark!r}"
                         f"{registry.did_you_mean(benchmark, list(PROTOCOLS))}; "
                         f"known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[benchmark]


@dataclass(frozen=True)
class TaskRef:
    """One task of a benchmark (few-shot tasks also name their number of shots)."""

    benchmark: str
    task: str
    shots: Optional[int] = None

    def __str__(self) -> str:
        return self.task if self.shots is None else f"{self.task} ({self.shots}-shot)"


def resolve_task(benchmark: str, name: str, shots: Optional[int] = None,
                 data_root: Optional[PathLike] = None) -> TaskRef:
    """Canonical task for a user-given name; ValueError suggests the closest known name.

    VTAB-1k and few-shot also accept a task outside the registry when ``data_root`` holds a
    folder of that name (the datamodules read such custom tasks in the same layout).
    """
    get_protocol(benchmark)
    if (shots is not None) != (benchmark == "fewshot"):
        raise ValueError(f"shots must be given for few-shot tasks and only for them "
                         f"(benchmark {benchmark!r}, shots {shots!r})")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots <= 0):
        raise ValueError(f"shots must be a positive int, got {shots!r}")
    lookup = {"vtab": registry.vtab_task, "fgvc": registry.fgvc_dataset,
              "fewshot": registry.fewshot_dataset}[benchmark]
    try:
        return TaskRef(benchmark, lookup(name).name, shots)
    except ValueError as err:
        if benchmark == "fgvc" or data_root is None:
            raise
        if (Path(data_root) / name).is_dir():
            return TaskRef(benchmark, name, shots)
        raise ValueError(f"{err}; {data_root} has no folder {name!r} for a custom task "
                         "either") from None


@dataclass
class RunSpec:
    """Everything one training run needs; ``cli_args`` turns it into a CLI command line."""

    key: RunKey
    epochs: int
    data_class: str
    data_args: dict[str, Any]
    configs: list[Path]
    overrides: list[str]
    run_dir: Path
    test: bool
    settings: dict[str, Any] = field(default_factory=dict)
    settings_digest: str = ""
    resume_from: Optional[Path] = None

    def cli_args(self) -> list[str]:
        """``fit`` arguments; final runs also test the last epoch's weights (test_after_fit)."""
        args = ["fit"] + [f"--config={c}" for c in self.configs]
        args += [f"--data={self.data_class}"]
        args += [f"--data.{k}={_cli_value(v)}" for k, v in self.data_args.items()]
        args += self.overrides
        args += [f"--{k}={_cli_value(v)}" for k, v in self.key.hparams]
        # Each run's logs and checkpoints go to its own folder, whatever the configs say.
        args += [f"--trainer.max_epochs={self.epochs}",
                 f"--seed_everything={self.key.seed}",
                 f"--trainer.default_root_dir={self.run_dir}",
                 "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                 f"--trainer.logger.save_dir={self.run_dir}", "--trainer.logger.name=logs",
                 f"--checkpoint.dirpath={self.run_dir / 'checkpoints'}",
                 f"--test_after_fit={_cli_value(self.test)}"]
        if self.resume_from is not None:
            args.append(f"--ckpt_path={self.resume_from}")
        return args


def _cli_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@dataclass
class RunOutcome:
    """What a finished run reports back to the protocol."""

    val_acc: Optional[float]
    test_acc: Optional[float]
    epochs: int
    params: ParameterCount
    adapter: dict[str, Any] = field(default_factory=dict)


Executor = Callable[[RunSpec], RunOutcome]


def _metric(metrics: dict[str, Any], name: str, spec: RunSpec) -> float:
    if name not in metrics:
        raise RuntimeError(f"run {spec.key.describe()} logged no {name!r} "
                           f"(logged: {', '.join(sorted(metrics)) or 'nothing'})")
    return float(metrics[name])


def cli_executor(spec: RunSpec) -> RunOutcome:
    """Run ``spec`` through the training CLI (``wegeft_vision.cli.cli_main``)."""
    from ..cli import cli_main  # loads Lightning's CLI machinery: only when a run happens

    # LightningCLI warns when it gets args while sys.argv holds arguments too (here the
    # protocol's own command line): the args are the whole command, so hide the others.
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        cli = cli_main(spec.cli_args())
    finally:
        sys.argv = argv
    metrics = dict(cli.trainer.callback_metrics)
    val_acc = _metric(metrics, "val/acc", spec) if spec.key.phase == "search" else \
        metrics.get("val/acc")
    return RunOutcome(val_acc=None if val_acc is None else float(val_acc),
                      test_acc=_metric(metrics, "test/acc", spec) if spec.test else None,
                      epochs=cli.trainer.current_epoch, params=cli.model.parameter_count(),
                      adapter=cli.model.adapter_config.to_dict())


def library_versions() -> dict[str, str]:
    """Versions that decide whether two runs are comparable."""
    versions = {"python": platform.python_version()}
    for package in ("wegeft-vision", "torch", "timm", "lightning", "torchvision"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


def _peak_memory_mb() -> tuple[float, str]:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux; it is the whole process's high-water mark, so it is per run
    # only when each run has its own process (the sweep's --workers/--devices).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


@dataclass
class ProtocolResult:
    """The records of one task's protocol and how many runs actually trained."""

    task: TaskRef
    search: list[RunRecord]
    best: dict[str, HParamValue]
    final: list[RunRecord]
    executed: int


CHECKPOINT_POLICIES = ("final", "all", "none")
_DATA_KEYS = ("class_path", "root", "task", "split", "dataset", "use_val_for_train", "shots",
              "seed")
# CLI arguments the protocol sets itself: overrides and grids may not touch them (or what is
# below them, e.g. trainer.logger.save_dir).
RUNNER_CONTROLLED = ("data", *(f"data.{k}" for k in _DATA_KEYS),
                     *(f"data.init_args.{k}" for k in _DATA_KEYS), "config",
                     "trainer.max_epochs", "trainer.default_root_dir", "seed_everything",
                     "trainer.logger", "checkpoint.dirpath", "test_after_fit")


# The model's backbone weights file, under its new name and the old one.
WEIGHTS_KEYS = ("weights_path", "checkpoint_path")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _controlled(name: str) -> bool:
    return any(name == c or (name.startswith(c + ".") and not c.startswith("data"))
               for c in RUNNER_CONTROLLED)


class ProtocolRunner:
    """Runs the protocol for tasks of one benchmark with one method, writing records.

    Args:
        out_dir: results folder (records in ``records/``, Lightning outputs in ``runs/``).
        data_root: the benchmark's data folder (holding the task/dataset folders).
        benchmark: "vtab", "fgvc" or "fewshot".
        method: the label this method has in records and tables, e.g. "wegeft".
        configs: CLI config files (base + method ...), passed as repeated ``--config``.
        overrides: further CLI arguments, e.g. ``["--trainer.accelerator=gpu"]``.
        grid: the search grid; None skips the search (the configs' hyperparameters are used).
        seeds: seeds of the final runs (the search uses the first).
        search_epochs / final_epochs: None for the protocol's defaults.
        final_with_val: FGVC only: the final runs train on train + val.
        checkpoints: which runs keep their Lightning checkpoints: "final" (default), "all" or
            "none" (a full fine-tuning checkpoint is the whole model; search runs need none).
        force: re-run even when a record exists.
        executor: runs one RunSpec; the default drives the training CLI.
    """

    def __init__(self, out_dir: PathLike, data_root: PathLike, benchmark: str, method: str,
                 configs: Sequence[PathLike] = (), overrides: Sequence[str] = (),
                 grid: Optional[Grid] = None, seeds: Sequence[int] = (0,),
                 search_epochs: Optional[int] = None, final_epochs: Optional[int] = None,
                 final_with_val: bool = False, checkpoints: str = "final",
                 force: bool = False, executor: Executor = cli_executor) -> None:
        self.protocol = get_protocol(benchmark)
        self.out_dir = Path(out_dir)
        self.data_root = Path(data_root)
        if not self.data_root.is_dir():
            raise FileNotFoundError(f"data root {self.data_root} does not exist")
        if not method or "/" in method:
            raise ValueError(f"method label must be a non-empty name without '/', got {method!r}")
        self.method = method
        self.configs = [Path(c) for c in configs]
        for config in self.configs:
            if not config.is_file():
                raise FileNotFoundError(f"config file {config} does not exist")
        self.grid = None if grid is None else check_grid(grid)
        self.overrides = list(overrides)
        self._check_overrides()
        seeds = list(seeds)
        if not seeds or len(set(seeds)) != len(seeds) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise ValueError(f"seeds must be distinct non-negative ints, got {seeds!r}")
        self.seeds = seeds
        self.search_epochs = search_epochs or self.protocol.search_epochs
        self.final_epochs = final_epochs or self.protocol.final_epochs
        for name, epochs in (("search_epochs", self.search_epochs),
                             ("final_epochs", self.final_epochs)):
            if epochs <= 0:
                raise ValueError(f"{name} must be positive, got {epochs}")
        if final_with_val and benchmark != "fgvc":
            raise ValueError("final_with_val applies to FGVC only")
        self.final_with_val = final_with_val
        if checkpoints not in CHECKPOINT_POLICIES:
            raise ValueError(f"checkpoints must be one of {CHECKPOINT_POLICIES}, "
                             f"got {checkpoints!r}")
        self.checkpoints = checkpoints
        self.force = force
        self.executor = executor
        self.config_digest = self._digest()
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._common_settings = {
            "configs": [{"path": str(c.resolve()), "sha256": self._sha256(c)}
                        for c in self.configs],
            "overrides": self.overrides, **self._backbone_settings()}

    @property
    def records_dir(self) -> Path:
        return self.out_dir / "records"

    def _check_overrides(self) -> None:
        grid_names = set(self.grid or {})
        for name in grid_names:
            if _controlled(name):
                raise ValueError(f"the search grid varies {name!r}, which the protocol controls")
        for arg in self.overrides:
            name = arg.lstrip("-").split("=", 1)[0]
            if not arg.startswith("--") or "=" not in arg:
                raise ValueError(f"override {arg!r} must look like --model.lr=1e-3")
            if name in grid_names:
                raise ValueError(f"override {arg!r} sets {name!r}, which the search grid varies")
            if _controlled(name):
                raise ValueError(f"override {arg!r} sets {name!r}, which the protocol controls "
                                 "(use the data root, task, epochs and seeds options instead)")

    def _digest(self) -> str:
        digest = hashlib.sha256()
        for config in self.configs:
            digest.update(config.read_bytes())
        digest.update("\0".join(self.overrides).encode())
        return digest.hexdigest()[:16]

    def _sha256(self, path: Path) -> str:
        """Content hash, computed once per file version (a sweep reads the same files often)."""
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path)
        return self._hashes[key]

    def _backbone_settings(self) -> dict[str, Any]:
        """Backbone name and weights file as the configs and overrides set them (later wins).

        The file's content identifies the weights: a file replaced under the same name makes
        other runs.
        """
        found: dict[str, Any] = {}
        for config in self.configs:
            model = (yaml.safe_load(config.read_text()) or {}).get("model")
            if isinstance(model, dict):
                found.update({k: model[k] for k in ("backbone", *WEIGHTS_KEYS) if k in model})
        for arg in self.overrides:
            name, _, value = arg[2:].partition("=")
            if name.startswith("model.") and name[6:] in ("backbone", *WEIGHTS_KEYS):
                found[name[6:]] = parse_value(value)
        path = next((found[k] for k in WEIGHTS_KEYS if found.get(k) is not None), None)
        weights = None
        if path is not None:
            # The training CLI reads a relative path from the current folder.
            file = Path(str(path)).expanduser().resolve()
            weights = {"path": str(file),
                       "sha256": self._sha256(file) if file.is_file() else "missing"}
        return {"backbone": found.get("backbone", "(default)"), "weights": weights}

    def _data_files(self, data_args: dict[str, Any], phase: str) -> dict[str, str]:
        """sha256 of each list / annotation file the run's datamodule reads, by path."""
        module, name = self.protocol.data_class.rsplit(".", 1)
        data = getattr(importlib.import_module(module), name)(**data_args)
        splits = ("train", "val") + (("test",) if phase == "final" else ())
        if hasattr(data, "list_file"):
            files = [data.list_file(split) for split in splits]
        else:  # FGVC: VPT's json files
            files = [data.dataset_folder() / f"{split}.json" for split in splits]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{data.description}: list file {file} does not exist")
        return {os.path.relpath(f, self.data_root): self._sha256(f) for f in files}

    def settings(self, task: TaskRef, phase: str, seed: int) -> dict[str, Any]:
        """What besides the run's key changes its result; part of its record's identity."""
        data_args = self._data_args(task, phase, seed)
        return {"epochs": self.search_epochs if phase == "search" else self.final_epochs,
                "data": {"root": str(self.data_root.resolve()), "args": data_args,
                         "files": self._data_files(data_args, phase)},
                **self._common_settings}

    def _data_args(self, task: TaskRef, phase: str, seed: int) -> dict[str, Any]:
        root = str(self.data_root)
        if task.benchmark == "fgvc":
            return {"root": root, "dataset": task.task,
                    "use_val_for_train": phase == "final" and self.final_with_val}
        if task.benchmark == "vtab":
            split = "train800" if phase == "search" else "train800val200"
            args: dict[str, Any] = {"root": root, "task": task.task, "split": split}
        else:
            args = {"root": root, "dataset": task.task, "shots": task.shots, "seed": seed}
        entry = registry.find(task.task, TASK_TABLES[task.benchmark])
        if entry is not None:
            # Stated explicitly (the datamodule checks it against the registry) so that the
            # datamodule's saved hyperparameters agree with the model's linked num_classes;
            # Lightning refuses to log differing values of the same key.
            args["num_classes"] = entry.num_classes
        return args

    def spec(self, task: TaskRef, phase: str, hparams: dict[str, HParamValue],
             seed: int) -> RunSpec:
        key = RunKey.make(task.benchmark, task.task, self.method, phase, seed, hparams,
                          task.shots)
        settings = self.settings(task, phase, seed)
        identity = json.dumps({"key": dataclasses.asdict(key), "settings": settings},
                              sort_keys=True, default=str)
        return RunSpec(key=key, settings=settings,
                       settings_digest=hashlib.sha256(identity.encode()).hexdigest()[:16],
                       epochs=self.search_epochs if phase == "search" else self.final_epochs,
                       data_class=self.protocol.data_class,
                       data_args=self._data_args(task, phase, seed), configs=self.configs,
                       overrides=self.overrides,
                       run_dir=self.out_dir / "runs" / key.relative_path().with_suffix(""),
                       test=phase == "final")

    def _existing(self, spec: RunSpec) -> Optional[RunRecord]:
        path = record_path(self.records_dir, spec.key)
        if self.force or not path.exists():
            return None
        try:
            record = read_record(path)
        except ValueError as err:
            logger.warning("%s; running it again", err)
            return None
        if not record.settings_digest:
            logger.warning("record %s is stale: it predates records that name their settings "
                           "(epochs, data, configs, weights); running it again", path)
            return None
        if record.settings_digest != spec.settings_digest:
            logger.warning("record %s is stale: it was made with other settings (%s); running "
                           "it again", path, settings_diff(record.settings, spec.settings)
                           or "same settings, other run identity")
            return None
        return record

    def _prepare_run_dir(self, spec: RunSpec) -> None:
        """Resume from the run folder's last checkpoint if it holds this very run, part done;
        otherwise clear the folder (outputs of other settings must not be resumed)."""
        marker = spec.run_dir / "settings.json"
        last = spec.run_dir / "checkpoints" / "last.ckpt"
        if spec.run_dir.exists():
            same = (not self.force and marker.is_file()
                    and json.loads(marker.read_text()).get("settings_digest")
                    == spec.settings_digest)
            # A checkpoint of the last epoch is a finished fit whose record was lost: train
            # again rather than resume into a fit that would validate nothing.
            if same and last.is_file() and _checkpoint_epoch(last) < spec.epochs - 1:
                spec.resume_from = last
                logger.info("resuming %s from %s", spec.key.describe(), last)
                return
            shutil.rmtree(spec.run_dir)
        spec.run_dir.mkdir(parents=True)
        marker.write_text(json.dumps({"settings_digest": spec.settings_digest,
                                      "settings": spec.settings}, indent=2, sort_keys=True))

    def _run(self, spec: RunSpec) -> RunRecord:
        logger.info("running %s", spec.key.describe())
        self._prepare_run_dir(spec)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        outcome = self.executor(spec)
        wall = time.perf_counter() - start
        memory, memory_kind = _peak_memory_mb()
        key = spec.key
        record = RunRecord(
            benchmark=key.benchmark, task=key.task, method=key.method, phase=key.phase,
            seed=key.seed, hparams=dict(key.hparams), shots=key.shots,
            val_acc=outcome.val_acc, test_acc=outcome.test_acc, epochs=outcome.epochs,
            trainable_params=outcome.params.trainable, backbone_params=outcome.params.backbone,
            head_params=outcome.params.head, wall_time_s=wall, peak_memory_mb=memory,
            memory_kind=memory_kind, finished_at=datetime.now(timezone.utc).isoformat(),
            versions=library_versions(), adapter=outcome.adapter,
            config_files=[str(c) for c in self.configs], config_digest=self.config_digest,
            cli_args=spec.cli_args(), settings=spec.settings,
            settings_digest=spec.settings_digest)
        path = write_record(self.records_dir, record)
        if self.checkpoints == "none" or (self.checkpoints == "final" and key.phase == "search"):
            for checkpoint in spec.run_dir.rglob("*.ckpt"):
                checkpoint.unlink()
        logger.info("wrote %s (val %s, test %s, %.1f s)", path, record.val_acc,
                    record.test_acc, wall)
        return record

    def get_or_run(self, spec: RunSpec) -> tuple[RunRecord, bool]:
        existing = self._existing(spec)
        if existing is not None:
            logger.info("skipping %s: finished already", spec.key.describe())
            return existing, False
        return self._run(spec), True

    def run(self, task: TaskRef) -> ProtocolResult:
        """Search (unless there is no grid), pick the best by val accuracy, then final runs."""
        if task.benchmark != self.protocol.benchmark:
            raise ValueError(f"task {task} is a {task.benchmark} task, this runner runs "
                             f"{self.protocol.benchmark}")
        executed = 0
        search: list[RunRecord] = []
        best: dict[str, HParamValue] = {}
        if self.grid is not None:
            for point in expand_grid(self.grid):
                record, ran = self.get_or_run(self.spec(task, "search", point, self.seeds[0]))
                search.append(record)
                executed += ran
            best = select_best(search)
            logger.info("%s %s: best %s", task, self.method, best)
        final = []
        for seed in self.seeds:
            record, ran = self.get_or_run(self.spec(task, "final", best, seed))
            final.append(record)
            executed += ran
        return ProtocolResult(task=task, search=search, best=best, final=final,
                              executed=executed)


def _checkpoint_epoch(path: Path) -> int:
    """The epoch a Lightning checkpoint was saved in (0-based)."""
    # Our own checkpoint, written by this run's folder: it holds hyper-parameters besides tensors.
    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])


def select_best(search: Sequence[RunRecord]) -> dict[str, HParamValue]:
    """Hyperparameters of the highest val accuracy; a tie goes to the earliest grid point."""
    if not search:
        raise ValueError("no search runs to choose from")
    best = max(enumerate(search), key=lambda ir: (ir[1].val_acc, -ir[0]))[1]
    return dict(best.hparams)


# --- command line -------------------------------------------------------------------------

def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by run_protocol and sweep."""
    parser.add_argument("--benchmark", required=True, choices=list(PROTOCOLS),
                        help="vtab (VTAB-1k), fgvc (FGVC) or fewshot (few-shot FGVC)")
    parser.add_argument("--data-root", required=True, type=Path,
                        help="folder holding the task/dataset folders")
    parser.add_argument("--method", required=True,
                        help="label for records and tables, e.g. wegeft or lora")
    parser.add_argument("--config", action="append", default=[], type=Path, dest="configs",
                        help="training CLI config file; repeat to compose (base, method, ...)")
    parser.add_argument("--out", required=True, type=Path,
                        help="results folder: records/ (JSON per run) and runs/ (Lightning)")
    parser.add_argument("--grid", action="append", default=None, metavar="NAME=V1,V2",
                        help="search grid entry, repeatable; default: the paper's "
                             "lr x weight decay grid (6 x 4)")
    parser.add_argument("--no-search", action="store_true",
                        help="skip the search: final runs use the configs' hyperparameters "
                             "(the default for fewshot)")
    parser.add_argument("--search", action="store_true",
                        help="do the search for fewshot too")
    parser.add_argument("--seeds", default=None,
                        help="seeds of the final runs, e.g. 0,1,2 (default: 0; fewshot: 0,1,2, "
                             "which also pick the few-shot training lists)")
    parser.add_argument("--search-epochs", type=int, default=None,
                        help="epochs of a search run (default: vtab 50, fgvc 25, fewshot 50)")
    parser.add_argument("--final-epochs", type=int, default=None,
                        help="epochs of a final run (default 100)")
    parser.add_argument("--final-with-val", action="store_true",
                        help="fgvc: final runs train on train + val")
    parser.add_argument("--checkpoints", choices=CHECKPOINT_POLICIES, default="final",
                        help="which runs keep their Lightning checkpoints (default: final)")
    parser.add_argument("--force", action="store_true", help="re-run runs that have a record")


def runner_from_args(args: argparse.Namespace, executor: Executor = cli_executor
                     ) -> ProtocolRunner:
    search = args.search or (PROTOCOLS[args.benchmark].search_by_default and not args.no_search)
    if args.search and args.no_search:
        raise ValueError("--search and --no-search contradict each other")
    grid = (parse_grid(args.grid) if args.grid is not None else PAPER_GRID) if search else None
    return ProtocolRunner(out_dir=args.out, data_root=args.data_root, benchmark=args.benchmark,
                          method=args.method, configs=args.configs, overrides=args.overrides,
                          grid=grid, seeds=(parse_ints(args.seeds, "--seeds") if args.seeds
                                            else PROTOCOLS[args.benchmark].default_seeds),
                          search_epochs=args.search_epochs, final_epochs=args.final_epochs,
                          final_with_val=args.final_with_val,
                          checkpoints=args.checkpoints, force=args.force,
                          executor=executor)


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"{option} must be comma-separated ints, got {text!r}") from err
    if not values:
        raise ValueError(f"{option} has no values")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_protocol",
        description=__doc__,
        epilog=OVERRIDES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .cluster import add_launcher_arguments

    add_protocol_arguments(parser)
    parser.add_argument("--task", required=True,
                        help="task or dataset name (aliases accepted, e.g. cifar100)")
    parser.add_argument("--shots", type=int, default=None, help="fewshot: shots per class")
    add_launcher_arguments(parser)
    return parser


OVERRIDES_HELP = ("Arguments after a lone '--' go to the training CLI unchanged, e.g. "
                  "'-- --trainer.accelerator=gpu --trainer.precision=32'. The data, epochs, "
                  "seed and the grid's parameters are set by the protocol.")


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]
                         ) -> argparse.Namespace:
    """Parse ``argv``; what follows a lone ``--`` becomes ``args.overrides``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.overrides = argv[cut + 1:]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    try:
        task = resolve_task(args.benchmark, args.task, args.shots, args.data_root)
        runner = runner_from_args(args)
        if args.launcher != "local":
            from .cluster import launch

            _, collected = launch(args, runner, [task])
            if collected is None:  # submitted to SLURM
                return 0
            (results, failed) = collected
            if failed:
                print(f"FAILED: {failed[0]}", file=sys.stderr)
                return 1
            result = results[0]
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.launcher == "local":
        logger.info("%s on %s, CUDA_VISIBLE_DEVICES=%s", task, platform.node(),
                    os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"))
        result = runner.run(task)
    accs = ", ".join(f"{100 * r.test_acc:.2f}" for r in result.final)
    print(f"{task} {runner.method}: best {result.best or 'configs as given'}; test acc "
          f"{accs} (seeds {runner.seeds}); {result.executed} run(s) trained")
    return 0


if __name__ == "__main__":
    sys.exit(main())
