"""The paper's protocol for one task: search -> pick the best by val accuracy -> final runs.

VTAB-1k: search on train800 -> val200, final on train800val200 -> test. FGVC: search on
train -> val, final on train (optionally + val) -> test. Few-shot FGVC: by default no search
(fixed hyperparameters from the configs, as NOAH does); final runs train on the
``num_shot_k.seed_s`` list for each seed s and test on the test list. The search trains with
the final runs' schedule and stops early (see ``benchmarks``).

A run is a ``RunSpec``: the training CLI's config files plus settings by dotted name (the
user's overrides, the grid point, then the protocol's own: data, epochs, seed, run folder). It
is resolved by the training CLI's own parser (``WeGeFTCLI``: links, defaults, config merging)
into the Trainer, model and datamodule, which the runner fits (and tests, for final runs).

Each finished run leaves one JSON record (see ``records``). A run whose record exists with the
same identity (the resolved training config, epochs, the content of the data's list files and
of the backbone weights) is skipped, so an interrupted protocol resumes where it stopped and a
finished one does no work; a record made with other settings is stale and its run is done
again. An interrupted run resumes from its Lightning checkpoint (``last.ckpt``, written every
epoch, read without unpickling code) when the settings are unchanged. Processes sharing the
output folder claim each run before training it (see ``claims``): none is trained twice.

Output folder layout: ``<out>/records/...json`` (the results), ``<out>/runs/...`` (Lightning
logs and checkpoints of each run), ``<out>/claims/...`` (runs in progress).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import yaml
from jsonargparse import ActionConfigFile
from lightning.pytorch.cli import LightningArgumentParser

from ..adapters import ParameterCount
from ..cli import WeGeFTCLI, cli_main
from ..errors import MissingFileError, UserError
from .benchmarks import Benchmark, TaskRef, get_benchmark
from .claims import DEFAULT_TIMEOUT_S, try_claim
from .grid import PAPER_GRID, Grid, check_grid, expand_grid
from .records import (HParamValue, RunKey, RunRecord, read_record, record_path, settings_diff,
                      write_record)

logger = logging.getLogger("wegeft_vision.protocols")

PathLike = Union[str, Path]
CHECKPOINT_POLICIES = ("final", "all", "none")
# Set by the runner for each run's own folder: not part of what makes the result.
RUN_FOLDER_KEYS = ("trainer.default_root_dir", "trainer.logger", "checkpoint.dirpath")
# Recorded as settings of their own (epochs, schedule_epochs), or not settings at all.
NOT_CONFIG_KEYS = (*RUN_FOLDER_KEYS, "trainer.max_epochs", "model.schedule_epochs", "config",
                   "__default_config__")


def nest(settings: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (what the parser takes as an object)."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        *parents, leaf = name.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return out


def _overlap(a: str, b: str) -> bool:
    """Whether dotted names ``a`` and ``b`` set the same setting or one holds the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _drop(config: dict[str, Any], name: str) -> None:
    *parents, leaf = name.split(".")
    for parent in parents:
        config = config.get(parent)
        if not isinstance(config, dict):
            return
    config.pop(leaf, None)


class RunCLI(WeGeFTCLI):
    """The training CLI on a run given as data: ``{"config": [files], **settings}``.

    The config files are read in order, exactly as repeated ``--config`` options are
    (jsonargparse's own config-file action: a file may hold part of a class's arguments), then
    the nested settings are parsed over them and validated.
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        args = dict(args)
        config = parser.get_defaults()
        for path in args.pop("config", []):
            ActionConfigFile.apply_config(parser, config, "config", str(path))
        super().parse_arguments(parser, parser.parse_object(args, namespace=config))


class _ParseOnlyCLI(RunCLI):
    """The training CLI up to its parsed, validated config: nothing is built."""

    def instantiate_classes(self) -> None:
        pass


@dataclass
class RunSpec:
    """One training run: config files, then settings by dotted name over them.

    ``settings`` hold, in the order applied, the user's overrides, the grid point and the
    protocol's own settings (data, epochs, seed, the run folder), e.g.
    ``{"model.lr": 1e-3, "trainer.max_epochs": 50, "model.schedule_epochs": 100}``.
    """

    key: RunKey
    configs: list[Path]
    settings: dict[str, Any]
    run_dir: Path
    epochs: int
    schedule_epochs: int
    test: bool
    identity: dict[str, Any] = field(default_factory=dict)
    digest: str = ""
    resume_from: Optional[Path] = None

    def build(self, instantiate: bool = True) -> WeGeFTCLI:
        """The training CLI on this run: its ``trainer``, ``model`` and ``datamodule`` (or with
        ``instantiate=False`` only its parsed ``config``)."""
        with warnings.catch_warnings():
            # The settings are the whole run; the protocol command's own sys.argv is not
            # meant for the training CLI, which warns about seeing both.
            warnings.filterwarnings("ignore", message=".*not recommended to provide both args")
            cli = cli_main({"config": self.configs, **nest(self.settings)}, run=False,
                           cli_class=RunCLI if instantiate else _ParseOnlyCLI)
        return cli  # type: ignore[return-value]

    def resolved_config(self) -> dict[str, Any]:
        """The training config this run gets (config files, then settings), as plain data."""
        cli = self.build(instantiate=False)
        return yaml.safe_load(cli.parser.dump(cli.config, skip_validation=True))


@dataclass
class RunOutcome:
    """What a finished run reports back to the protocol."""

    val_acc: Optional[float]
    test_acc: Optional[float]
    epochs: int
    params: ParameterCount
    adapter: dict[str, Any] = field(default_factory=dict)
    adapter_method: str = ""


Executor = Callable[[RunSpec], RunOutcome]


def _metric(metrics: dict[str, Any], name: str, spec: RunSpec) -> float:
    if name not in metrics:
        raise RuntimeError(f"run {spec.key.describe()} logged no {name!r} "
                           f"(logged: {', '.join(sorted(metrics)) or 'nothing'})")
    return float(metrics[name])


def train_run(spec: RunSpec) -> RunOutcome:
    """Fit ``spec`` (resuming from ``spec.resume_from``); final runs then test the last epoch's
    weights."""
    cli = spec.build()
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    # Our checkpoints hold tensors and plain data only: nothing in them may run code.
    trainer.fit(model, datamodule=data, ckpt_path=spec.resume_from, weights_only=True)
    metrics = dict(trainer.callback_metrics)
    val_acc = _metric(metrics, "val/acc", spec) if spec.key.phase == "search" else \
        metrics.get("val/acc")
    test_acc = None
    if spec.test:
        trainer.test(model, datamodule=data, verbose=False)
        test_acc = _metric(dict(trainer.callback_metrics), "test/acc", spec)
    config = model.adapter_config
    return RunOutcome(val_acc=None if val_acc is None else float(val_acc), test_acc=test_acc,
                      epochs=trainer.current_epoch, params=model.parameter_count(),
                      adapter=config.to_dict(), adapter_method=getattr(type(config), "method", ""))


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_epoch(path: Path) -> Optional[int]:
    """The epoch a Lightning checkpoint was saved in (0-based), or None when the file is not a
    checkpoint that loads without unpickling code (``weights_only=True``)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return int(checkpoint["epoch"])
    except Exception as err:  # torch raises several types for a file it refuses
        logger.warning("ignoring %s: not a checkpoint that loads without running code (%s)",
                       path, str(err).strip().splitlines()[0] if str(err).strip()
                       else type(err).__name__)
        return None


@dataclass
class ProtocolResult:
    """The records of one task's protocol and how many runs this process trained."""

    task: TaskRef
    search: list[RunRecord]
    best: dict[str, HParamValue]
    final: list[RunRecord]
    executed: int


class ProtocolRunner:
    """Runs the protocol for tasks of one benchmark with one method, writing records.

    Args:
        out: results folder (records in ``records/``, Lightning outputs in ``runs/``).
        data_root: the benchmark's data folder (holding the task/dataset folders).
        benchmark: a benchmark's registry name: vtab (VTAB-1k), fgvc (FGVC) or fewshot
            (few-shot FGVC).
        method: the label of this configuration in records and tables, e.g. wegeft.
        configs: training CLI config files in order (later ones win), e.g. the benchmark's and
            a method's: configs/vtab1k.yaml, configs/methods/lora.yaml.
        overrides: further training settings by dotted name, applied over the configs, e.g.
            {trainer.accelerator: gpu, model.weights_path: /w/vit.safetensors}. The data,
            epochs, seed, run folder and the grid's parameters are the protocol's.
        search: search the grid before the final runs; None: the benchmark's default (vtab and
            fgvc search, fewshot does not).
        grid: the search grid, dotted name -> values; None: the paper's lr x weight decay grid
            (6 x 4).
        seeds: seeds of the final runs (the search uses the first); None: the benchmark's
            (fewshot: 0, 1, 2, which also pick the few-shot training lists; else 0).
        search_epochs: the search stops after this epoch of the final schedule; None: the
            benchmark's (vtab 50, fgvc 25, fewshot 50).
        final_epochs: length of the schedule of every run, and of the final runs; None: 100.
        final_with_val: fgvc: the final runs train on train + val.
        checkpoints: which runs keep their Lightning checkpoints: final, all or none (search
            runs need none; a full fine-tuning checkpoint is the whole model).
        force: train again the runs whose records were there before this runner started.
        claim_timeout_s: a claim of a run whose heartbeat is older than this is stale (its
            process died on another host, or hangs) and is taken over.
        poll_s: how often to look again at runs another process is training.
        executor: runs one RunSpec; the default trains it in this process.
    """

    def __init__(self, out: PathLike, data_root: PathLike, benchmark: str, method: str,
                 configs: Sequence[PathLike] = (), overrides: Optional[dict[str, Any]] = None,
                 search: Optional[bool] = None, grid: Optional[Grid] = None,
                 seeds: Optional[Sequence[int]] = None, search_epochs: Optional[int] = None,
                 final_epochs: Optional[int] = None, final_with_val: bool = False,
                 checkpoints: str = "final", force: bool = False,
                 claim_timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = 10.0,
                 executor: Optional[Executor] = None) -> None:
        self.benchmark: Benchmark = get_benchmark(benchmark)
        self.out_dir = Path(out)
        self.data_root = Path(data_root)
        if not self.data_root.is_dir():
            raise MissingFileError(f"data root {self.data_root} does not exist")
        if not method or "/" in method:
            raise UserError(f"method label must be a non-empty name without '/', got {method!r}")
        self.method = method
        self.configs = [Path(c) for c in configs]
        for config in self.configs:
            if not config.is_file():
                raise MissingFileError(f"config file {config} does not exist")
        search = self.benchmark.search_by_default if search is None else search
        self.grid = check_grid(PAPER_GRID if grid is None else grid) if search else None
        self.overrides = dict(overrides or {})
        seeds = list(self.benchmark.default_seeds if seeds is None else seeds)
        if not seeds or len(set(seeds)) != len(seeds) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise UserError(f"seeds must be distinct non-negative ints, got {seeds!r}")
        self.seeds = seeds
        self.final_epochs = final_epochs or self.benchmark.final_epochs
        self.search_epochs = search_epochs or min(self.benchmark.search_stop_epoch,
                                                  self.final_epochs)
        if self.final_epochs <= 0 or not 0 < self.search_epochs <= self.final_epochs:
            raise UserError(f"final_epochs must be positive and search_epochs between 1 and it "
                            f"(the search stops within the final schedule), got "
                            f"{self.search_epochs} and {self.final_epochs}")
        if final_with_val and self.benchmark.final_with_val_args is None:
            raise UserError(f"final_with_val does not apply to {benchmark}")
        self.final_with_val = final_with_val
        if checkpoints not in CHECKPOINT_POLICIES:
            raise UserError(f"checkpoints must be one of {CHECKPOINT_POLICIES}, "
                            f"got {checkpoints!r}")
        self.checkpoints = checkpoints
        self.force = force
        self.claim_timeout_s = claim_timeout_s
        self.poll_s = poll_s
        self.executor = executor or train_run
        self.started = datetime.now(timezone.utc).isoformat()
        self._hashes: dict[tuple[str, int, int], str] = {}
        # What rebuilds this runner in another process (the sweep's workers): plain data.
        self.arguments = {
            "out": str(self.out_dir), "data_root": str(self.data_root), "benchmark": benchmark,
            "method": method, "configs": [str(c) for c in self.configs],
            "overrides": self.overrides, "search": search, "grid": self.grid,
            "seeds": self.seeds, "search_epochs": self.search_epochs,
            "final_epochs": self.final_epochs, "final_with_val": final_with_val,
            "checkpoints": checkpoints, "force": force, "claim_timeout_s": claim_timeout_s,
            "poll_s": poll_s}
        self._check_settings()

    @property
    def records_dir(self) -> Path:
        return self.out_dir / "records"

    def _check_settings(self) -> None:
        example = TaskRef(self.benchmark.name, "task",
                          None if self.benchmark.shots is None else 1)
        controlled = [name for phase in ("search", "final")
                      for name in self._protocol_settings(example, phase, 0, Path("runs"))]
        for name in self.grid or {}:
            if any(_overlap(name, c) for c in controlled):
                raise UserError(f"the search grid varies {name!r}, which the protocol sets")
        for name in self.overrides:
            if name in (self.grid or {}):
                raise UserError(f"override {name!r} is a parameter the search grid varies")
            clash = next((c for c in controlled if _overlap(name, c)), None)
            if clash is not None:
                raise UserError(f"override {name!r} sets {clash!r}, which the protocol sets "
                                "(use the data root, task, epochs and seeds options instead)")

    def _protocol_settings(self, task: TaskRef, phase: str, seed: int,
                           run_dir: Path) -> dict[str, Any]:
        """What the protocol sets for each run, over the user's configs and overrides."""
        datamodule = self.benchmark.datamodule
        data = self.benchmark.data_args(task, phase, seed, self.final_with_val)
        return {"data.class_path": f"{datamodule.__module__}.{datamodule.__qualname__}",
                "data.init_args.root": str(self.data_root.resolve()),
                **{f"data.init_args.{k}": v for k, v in data.items()},
                "trainer.max_epochs": self.search_epochs if phase == "search"
                else self.final_epochs,
                "model.schedule_epochs": self.final_epochs,
                "seed_everything": seed,
                # Each run's logs and checkpoints go to its own folder, whatever the configs say.
                "trainer.default_root_dir": str(run_dir),
                "trainer.logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(run_dir), "name": "logs"}},
                "checkpoint.dirpath": str(run_dir / "checkpoints")}

    def _sha256(self, path: Path) -> str:
        """Content hash, computed once per file version (a sweep reads the same files often)."""
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path)
        return self._hashes[key]

    def _identity(self, spec: RunSpec) -> dict[str, Any]:
        """What besides the run's key changes its result, from the run as the parser resolves
        it: the config, the epochs, and the content of the data's files and of the weights."""
        config = spec.resolved_config()
        weights = None
        path = (config.get("model") or {}).get("weights_path")
        if path is not None:
            file = Path(path).expanduser().resolve()  # read from the current folder, as fit does
            weights = {"path": str(file),
                       "sha256": self._sha256(file) if file.is_file() else "missing"}
        init_args = config["data"]["init_args"]
        data = self.benchmark.datamodule(**init_args)
        splits = ("train", "val") + (("test",) if spec.test else ())
        files = {os.path.relpath(f, self.data_root.resolve()): self._sha256(f)
                 for f in data.split_files(splits)}
        for name in NOT_CONFIG_KEYS:
            _drop(config, name)
        return {"epochs": spec.epochs, "schedule_epochs": spec.schedule_epochs,
                "data": {"root": init_args["root"], "files": files}, "weights": weights,
                "config": config}

    def spec(self, task: TaskRef, phase: str, hparams: dict[str, HParamValue],
             seed: int) -> RunSpec:
        """The run of ``task`` in ``phase`` with the grid point ``hparams`` and ``seed``."""
        if task.benchmark != self.benchmark.name:
            raise UserError(f"task {task} is a {task.benchmark} task, this runner runs "
                            f"{self.benchmark.name}")
        key = RunKey.make(task.benchmark, task.task, self.method, phase, seed, hparams,
                          task.shots)
        run_dir = self.out_dir / "runs" / key.relative_path().with_suffix("")
        spec = RunSpec(key=key, configs=self.configs,
                       settings={**self.overrides, **hparams,
                                 **self._protocol_settings(task, phase, seed, run_dir)},
                       run_dir=run_dir, epochs=self.search_epochs if phase == "search"
                       else self.final_epochs, schedule_epochs=self.final_epochs,
                       test=phase == "final")
        spec.identity = self._identity(spec)
        text = json.dumps({"key": dataclasses.asdict(key), "settings": spec.identity},
                          sort_keys=True, default=str)
        spec.digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        return spec

    def _existing(self, spec: RunSpec, quiet: bool = False) -> Optional[RunRecord]:
        path = record_path(self.records_dir, spec.key)
        if not path.exists():
            return None
        try:
            record = read_record(path)
        except ValueError as err:
            if not quiet:
                logger.warning("%s; running it again", err)
            return None
        if record.settings_digest != spec.digest:
            if not quiet:
                logger.warning("record %s is stale: it was made with other settings (%s); "
                               "running it again", path,
                               settings_diff(record.settings, spec.identity)
                               or "same settings, other run identity")
            return None
        if self.force and record.finished_at < self.started:
            return None
        return record

    def _prepare_run_dir(self, spec: RunSpec) -> None:
        """Resume from the run folder's last checkpoint if it holds this very run, part done;
        otherwise clear the folder (outputs of other settings must not be resumed)."""
        marker = spec.run_dir / "settings.json"
        last = spec.run_dir / "checkpoints" / "last.ckpt"
        if spec.run_dir.exists():
            try:
                same = json.loads(marker.read_text()).get("settings_digest") == spec.digest
            except (OSError, ValueError, AttributeError):
                same = False
            epoch = checkpoint_epoch(last) if same and last.is_file() else None
            # A checkpoint of the last epoch is a finished fit whose record was lost: train
            # again rather than resume into a fit that would validate nothing.
            if not self.force and epoch is not None and epoch < spec.epochs - 1:
                spec.resume_from = last
                logger.info("resuming %s from %s", spec.key.describe(), last)
                return
            shutil.rmtree(spec.run_dir)
        spec.run_dir.mkdir(parents=True)
        marker.write_text(json.dumps({"settings_digest": spec.digest,
                                      "settings": spec.identity}, indent=2, sort_keys=True))

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
            schedule_epochs=spec.schedule_epochs,
            trainable_params=outcome.params.trainable, backbone_params=outcome.params.backbone,
            head_params=outcome.params.head, wall_time_s=wall, peak_memory_mb=memory,
            memory_kind=memory_kind, finished_at=datetime.now(timezone.utc).isoformat(),
            versions=library_versions(), adapter=outcome.adapter,
            adapter_method=outcome.adapter_method, config_files=[str(c) for c in self.configs],
            settings=spec.identity, settings_digest=spec.digest)
        path = write_record(self.records_dir, record)
        if self.checkpoints == "none" or (self.checkpoints == "final" and key.phase == "search"):
            for checkpoint in spec.run_dir.rglob("*.ckpt"):
                checkpoint.unlink()
        logger.info("wrote %s (val %s, test %s, %.1f s)", path, record.val_acc,
                    record.test_acc, wall)
        return record

    def claim_path(self, key: RunKey) -> Path:
        return self.out_dir / "claims" / key.relative_path().with_suffix(".claim")

    def get_or_run(self, spec: RunSpec) -> tuple[Optional[RunRecord], bool]:
        """The run's record and whether this call trained it; ``(None, False)`` while another
        process holds the run's claim."""
        existing = self._existing(spec)
        if existing is not None:
            logger.info("skipping %s: finished already", spec.key.describe())
            return existing, False
        claim, holder = try_claim(self.claim_path(spec.key), self.claim_timeout_s)
        if claim is None:
            logger.info("%s is being trained by %s", spec.key.describe(),
                        holder.describe() if holder else "another process")
            return None, False
        with claim:
            # Another process may have finished it between the look above and the claim.
            existing = self._existing(spec, quiet=True)
            if existing is not None:
                return existing, False
            return self._run(spec), True

    def run_all(self, specs: Sequence[RunSpec]) -> tuple[list[RunRecord], int]:
        """The records of ``specs`` (in order), training those without one; runs another
        process holds are waited for (and taken over if that process dies)."""
        records: dict[int, RunRecord] = {}
        executed = 0
        while len(records) < len(specs):
            waiting = 0
            for i, spec in enumerate(specs):
                if i in records:
                    continue
                record, ran = self.get_or_run(spec)
                executed += ran
                if record is None:
                    waiting += 1
                else:
                    records[i] = record
            if waiting:
                logger.info("waiting for %d run(s) other processes are training", waiting)
                time.sleep(self.poll_s)
        return [records[i] for i in range(len(specs))], executed

    def run(self, task: TaskRef) -> ProtocolResult:
        """Search (unless there is no grid), pick the best by val accuracy, then final runs."""
        search: list[RunRecord] = []
        best: dict[str, HParamValue] = {}
        executed = 0
        if self.grid is not None:
            search, executed = self.run_all([self.spec(task, "search", point, self.seeds[0])
                                             for point in expand_grid(self.grid)])
            best = select_best(search)
            logger.info("%s %s: best %s", task, self.method, best)
        final, ran = self.run_all([self.spec(task, "final", best, seed) for seed in self.seeds])
        return ProtocolResult(task=task, search=search, best=best, final=final,
                              executed=executed + ran)


def select_best(search: Sequence[RunRecord]) -> dict[str, HParamValue]:
    """Hyperparameters of the highest val accuracy; a tie goes to the earliest grid point."""
    if not search:
        raise UserError("no search runs to choose from")
    best = max(enumerate(search), key=lambda ir: (ir[1].val_acc, -ir[0]))[1]
    return dict(best.hparams)
