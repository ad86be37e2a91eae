"""One JSON record per finished run, and reading a folder of them back.

A record is written when a run finishes (atomically, so an interrupted run leaves no record and
is redone on resume). Its path is a function of the run's identity, so a re-run finds it and
skips the work. Reading a folder reports corrupt records and skips them, and when two files
describe the same run (e.g. two results folders copied together) it keeps the newer one and
says which.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .benchmarks import BENCHMARKS, PHASES

logger = logging.getLogger("wegeft_vision.protocols")

RECORD_FORMAT = "wegeft_vision.run/1"

PathLike = Union[str, os.PathLike]
HParamValue = Union[int, float, str, bool, None]


@dataclass(frozen=True)
class RunKey:
    """What makes two runs the same run."""

    benchmark: str
    task: str
    method: str
    phase: str
    seed: int
    hparams: tuple[tuple[str, HParamValue], ...]
    shots: Optional[int] = None

    @staticmethod
    def make(benchmark: str, task: str, method: str, phase: str, seed: int,
             hparams: dict[str, HParamValue], shots: Optional[int] = None) -> "RunKey":
        return RunKey(benchmark, task, method, phase, seed, tuple(sorted(hparams.items())), shots)

    def describe(self) -> str:
        shots = f" {self.shots}-shot" if self.shots is not None else ""
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams) or "default hyperparameters"
        return (f"{self.benchmark}/{self.task}{shots} {self.method} {self.phase} "
                f"({hp}, seed {self.seed})")

    def relative_path(self) -> Path:
        """Where this run's record lives inside a results folder."""
        task = self.task if self.shots is None else f"{self.task}_{self.shots}shot"
        parts = [f"{k}={_format_value(v)}" for k, v in self.hparams] + [f"seed={self.seed}"]
        return (Path(safe_name(self.benchmark)) / safe_name(self.method) / safe_name(task)
                / self.phase / (safe_name("__".join(parts)) + ".json"))


def _format_value(value: HParamValue) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def safe_name(name: str) -> str:
    """``name`` usable as one file name component."""
    # Keep names readable but never let a value introduce a path separator.
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


@dataclass
class RunRecord:
    """The outcome of one training run (accuracies are fractions in [0, 1])."""

    benchmark: str
    task: str
    method: str
    phase: str
    seed: int
    hparams: dict[str, HParamValue]
    val_acc: Optional[float]
    test_acc: Optional[float]
    epochs: int
    schedule_epochs: int
    trainable_params: int
    backbone_params: int
    head_params: int
    wall_time_s: float
    peak_memory_mb: float
    memory_kind: str
    shots: Optional[int] = None
    finished_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)
    # The adapter registry's name of the method (the label ``method`` is the user's).
    adapter_method: str = ""
    config_files: list[str] = field(default_factory=list)
    # Everything besides the key that changes the result (the resolved training config, the
    # epochs trained and the schedule's length, the content of the data's list files and of
    # the backbone weights), and its digest: a record is reused only for a run with the same
    # digest.
    settings: dict[str, Any] = field(default_factory=dict)
    settings_digest: str = ""
    format: str = RECORD_FORMAT

    @property
    def key(self) -> RunKey:
        return RunKey.make(self.benchmark, self.task, self.method, self.phase, self.seed,
                           self.hparams, self.shots)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: Any) -> "RunRecord":
        """Build a record from parsed JSON; ValueError says what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {RECORD_FORMAT!r}")
        names = {f.name for f in dataclasses.fields(RunRecord)}
        required = {f.name for f in dataclasses.fields(RunRecord)
                    if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        unknown = sorted(data.keys() - names)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        record = RunRecord(**data)
        record._check()
        return record

    def _check(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark {self.benchmark!r} is not one of {tuple(BENCHMARKS)}")
        if self.phase not in PHASES:
            raise ValueError(f"phase {self.phase!r} is not one of {PHASES}")
        for name in ("task", "method"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")
        if not isinstance(self.hparams, dict):
            raise ValueError("hparams must be an object")
        for name in ("val_acc", "test_acc"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a fraction in [0, 1] or null, got {value!r}")
        if self.phase == "search" and self.val_acc is None:
            raise ValueError("a search record needs val_acc")
        if self.phase == "final" and self.test_acc is None:
            raise ValueError("a final record needs test_acc")
        for name in ("seed", "epochs", "schedule_epochs", "trainable_params", "backbone_params",
                     "head_params"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.epochs > self.schedule_epochs:
            raise ValueError(f"epochs ({self.epochs}) must not exceed schedule_epochs "
                             f"({self.schedule_epochs})")
        if self.backbone_params == 0:
            raise ValueError("backbone_params must be positive")
        if self.shots is not None and (isinstance(self.shots, bool)
                                       or not isinstance(self.shots, int) or self.shots <= 0):
            raise ValueError(f"shots must be a positive int or null, got {self.shots!r}")


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def settings_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 5) -> str:
    """What differs between two settings dicts, e.g. ``epochs 1 -> 2, data.root /a -> /b``."""
    old_flat, new_flat = flatten(old), flatten(new)
    names = sorted(n for n in old_flat.keys() | new_flat.keys()
                   if old_flat.get(n, "(none)") != new_flat.get(n, "(none)"))

    def show(value: Any) -> str:
        text = json.dumps(value) if not isinstance(value, str) else value
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{n} {show(old_flat.get(n, '(none)'))} -> {show(new_flat.get(n, '(none)'))}"
             for n in names[:limit]]
    if len(names) > limit:
        parts.append(f"and {len(names) - limit} more")
    return ", ".join(parts)


def record_path(root: PathLike, key: RunKey) -> Path:
    return Path(root) / key.relative_path()


def write_record(root: PathLike, record: RunRecord) -> Path:
    """Write ``record`` under ``root`` at its key's path, complete or not at all."""
    record._check()
    path = record_path(root, record.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_record(path: PathLike) -> RunRecord:
    """Read one record; ValueError names the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return RunRecord.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as err:
        raise ValueError(f"corrupt record {path}: {err}") from err


@dataclass
class Results:
    """The usable records of a results folder and the problems met reading it."""

    records: list[RunRecord]
    paths: dict[RunKey, Path]
    problems: list[str]


def read_results(*roots: PathLike) -> Results:
    """Read every ``*.json`` record under the given folders.

    Corrupt records are reported (logged and listed in ``problems``) and skipped. When several
    files hold the same run, the one that finished last is used and the choice is reported.
    """
    if not roots:
        raise ValueError("read_results needs at least one results folder")
    by_key: dict[RunKey, list[tuple[RunRecord, Path]]] = {}
    problems: list[str] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"results folder {root} does not exist")
        for path in sorted(root.rglob("*.json")):
            try:
                record = read_record(path)
            except ValueError as err:
                problems.append(f"{err}; skipped")
                continue
            by_key.setdefault(record.key, []).append((record, path))
    records, paths = [], {}
    for key, found in by_key.items():
        found.sort(key=lambda rp: (rp[0].finished_at, str(rp[1])))
        record, path = found[-1]
        if len(found) > 1:
            others = ", ".join(f"{p} (finished {r.finished_at or 'unknown'})"
                               for r, p in found[:-1])
            problems.append(f"{len(found)} records for {key.describe()}: using {path} "
                            f"(finished {record.finished_at or 'unknown'}), ignoring {others}")
        records.append(record)
        paths[key] = path
    for message in problems:
        logger.warning(message)
    return Results(records=records, paths=paths, problems=problems)
