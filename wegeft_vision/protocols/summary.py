"""Tables from run records: VTAB-1k, FGVC and few-shot, as Markdown and CSV.

Only final runs enter the tables; a task's accuracy is the mean test accuracy over its seeds.
The VTAB-1k mean is the mean over the 19 tasks, not the mean of the three group means. A mean
over fewer tasks than the benchmark has is marked ``*`` in Markdown and counted in a note. A
number that averages runs made with different settings (the resolved training config, epochs,
backbone weights) is marked ``†`` and the difference named in a note; the CSV files
count the distinct settings of each row in a ``Settings`` column.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

from .benchmarks import BENCHMARKS, Benchmark
from .published import SOURCE, PublishedRow
from .records import RunRecord, settings_diff

Cell = Union[str, float, int, None]
# ViT-B/16 without its head (timm vit_base_patch16_224): turns published percentages into counts.
VIT_B_BACKBONE_PARAMS = 85_798_656
PPT_C = 1e7
PARAM_COLUMNS = ["Params (M)", "Params (%)", "PPT"]
SETTINGS_COLUMN = "Settings"
COLUMN_DIGITS = {"Params (M)": 4, "Params (%)": 3}  # PEFT counts are hundredths of a percent


def ppt_score(accuracy_percent: float, trainable_params: float) -> float:
    """V-PETL Bench's performance-parameter trade-off: acc * exp(-log10(P / C + 1)), C = 1e7."""
    return accuracy_percent * math.exp(-math.log10(trainable_params / PPT_C + 1.0))


@dataclass
class Table:
    """A titled table; numbers stay numbers until rendered."""

    title: str
    columns: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    partial: set[tuple[int, int]] = field(default_factory=set)  # (row, column) of partial means
    mixed: set[tuple[int, int]] = field(default_factory=set)  # cells over different settings
    label_columns: int = 1
    # One entry per row: how many distinct settings its runs have (CSV only; None: no column).
    settings_counts: Optional[list[Optional[int]]] = None
    # One entry per row: the adapter registry's method it measures ("" if unknown).
    row_methods: list[str] = field(default_factory=list)

    def insert_row(self, at: int, row: list[Cell], method: str = "") -> None:
        """Insert ``row`` before row ``at``; the marks of the rows below move with them."""
        self.rows.insert(at, row)
        self.row_methods.insert(at, method)
        if self.settings_counts is not None:
            self.settings_counts.insert(at, None)  # type: ignore[arg-type]
        self.partial = {(r + (r >= at), c) for r, c in self.partial}
        self.mixed = {(r + (r >= at), c) for r, c in self.mixed}

    def to_markdown(self) -> str:
        def fmt(cell: Cell, r: int, c: int) -> str:
            if cell is None:
                return "–"
            if isinstance(cell, float):
                text = f"{cell:.{COLUMN_DIGITS.get(self.columns[c], 2)}f}"
            else:
                text = str(cell)
            return (text + ("*" if (r, c) in self.partial else "")
                    + ("†" if (r, c) in self.mixed else ""))

        lines = [f"### {self.title}", "",
                 "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(" --- " if i < self.label_columns else " ---: "
                                for i in range(len(self.columns))) + "|"]
        lines += ["| " + " | ".join(fmt(cell, r, c) for c, cell in enumerate(row)) + " |"
                  for r, row in enumerate(self.rows)]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        counts = self.settings_counts
        writer.writerow(self.columns + ([SETTINGS_COLUMN] if counts is not None else []))
        for r, row in enumerate(self.rows):
            extra = [] if counts is None else ["" if counts[r] is None else counts[r]]
            writer.writerow(["" if cell is None else cell for cell in row] + extra)
        return out.getvalue()


# Settings that name the task's own data or the run's grid point, not how the method was run.
TASK_DATA_ARGS = ("root", "task", "dataset", "split", "shots", "seed", "num_classes")


def comparable_settings(record: RunRecord) -> dict:
    """The settings that must agree for two runs to enter one mean: the resolved training
    config without the task's own data arguments and the grid point, the epochs, and the
    backbone weights' content (their path may differ between machines)."""
    settings = record.settings
    if not settings:
        return {"settings": "not recorded"}
    config = copy.deepcopy(settings.get("config", {}))
    init_args = config.get("data", {}).get("init_args", {})
    for name in TASK_DATA_ARGS:
        init_args.pop(name, None)
    config.get("model", {}).pop("num_classes", None)
    config.get("model", {}).pop("weights_path", None)
    for name in record.hparams:
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node.get(parent, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return {"epochs": settings.get("epochs"), "schedule_epochs": settings.get("schedule_epochs"),
            "weights": (settings.get("weights") or {}).get("sha256"), "config": config}


def mixed_settings(records: Iterable[RunRecord]) -> Optional[str]:
    """None when the runs share their settings, else what differs between two of them."""
    distinct = {json.dumps(comparable_settings(r), sort_keys=True): r for r in records}
    if len(distinct) < 2:
        return None
    first, second = [comparable_settings(r) for r in list(distinct.values())[:2]]
    return f"{len(distinct)} different settings ({settings_diff(first, second)})"


def final_records(records: Iterable[RunRecord], benchmark: str
                  ) -> dict[str, dict[tuple[str, Optional[int]], list[RunRecord]]]:
    """method -> (task, shots) -> the final runs with a test accuracy, in seed order."""
    found: dict[str, dict[tuple[str, Optional[int]], list[RunRecord]]] = defaultdict(
        lambda: defaultdict(list))
    for rec in records:
        if rec.benchmark == benchmark and rec.phase == "final" and rec.test_acc is not None:
            found[rec.method][(rec.task, rec.shots)].append(rec)
    return {m: {k: sorted(v, key=lambda r: r.seed) for k, v in tasks.items()}
            for m, tasks in found.items()}


def task_accuracies(records: Iterable[RunRecord], benchmark: str
                    ) -> dict[str, dict[tuple[str, Optional[int]], list[float]]]:
    """method -> (task, shots) -> final test accuracies in percent, one per seed (seed order)."""
    return {m: {k: [100.0 * r.test_acc for r in v] for k, v in tasks.items()}  # type: ignore
            for m, tasks in final_records(records, benchmark).items()}


def method_params(records: Iterable[RunRecord], method: str,
                  benchmark: str) -> Optional[tuple[int, int]]:
    """(trainable, backbone) parameter counts of a method's final runs, head excluded.

    These do not depend on the task; if records disagree the most common pair is used.
    """
    counts = Counter((r.trainable_params, r.backbone_params) for r in records
                     if r.method == method and r.benchmark == benchmark and r.phase == "final")
    return counts.most_common(1)[0][0] if counts else None


def _mean(values: list[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def _params_cells(params: Optional[tuple[int, int]], mean: Optional[float]) -> list[Cell]:
    if params is None:
        return [None, None, None]
    trainable, backbone = params
    ppt = ppt_score(mean, trainable) if mean is not None else None
    return [trainable / 1e6, 100.0 * trainable / backbone, ppt]




def _accuracy_table(title: str, records: list[RunRecord], benchmark: str, tasks: list[str],
                    groups: dict[str, Sequence[str]], unit: str) -> Table:
    """Methods x tasks, then group means, the mean over all tasks, params and PPT."""
    columns = ["Method"] + tasks + list(groups) + ["Mean"] + PARAM_COLUMNS
    table = Table(title, columns, [], settings_counts=[])
    for method, runs in sorted(final_records(records, benchmark).items()):
        per_task = {t: _mean([100.0 * r.test_acc for r in runs.get((t, None), [])])  # type: ignore
                    for t in tasks}
        if all(v is None for v in per_task.values()):
            continue
        row: list[Cell] = [method] + [per_task[t] for t in tasks]
        r = len(table.rows)
        for c, task in enumerate(tasks, start=1):
            mixed = mixed_settings(runs.get((task, None), []))
            if mixed:
                table.mixed.add((r, c))
                table.notes.append(f"{method}: {task} averages seeds run with {mixed}")
        for group, members in list(groups.items()) + [("", tasks)]:
            done = [per_task[t] for t in members if per_task[t] is not None]
            row.append(_mean(done))
            name = f"{group + ' ' if group else ''}mean"
            if done and len(done) < len(members):
                table.partial.add((r, len(row) - 1))
                table.notes.append(f"{method}: {name} over {len(done)} of {len(members)} {unit}")
            mixed = mixed_settings(rec for t in members for rec in runs.get((t, None), []))
            if mixed:
                table.mixed.add((r, len(row) - 1))
                table.notes.append(f"{method}: {name} averages runs with {mixed}")
        row += _params_cells(method_params(records, method, benchmark), row[-1])
        table.rows.append(row)
        table.row_methods.append(_adapter_method(runs))
        table.settings_counts.append(len({  # type: ignore[union-attr]
            json.dumps(comparable_settings(rec), sort_keys=True)
            for t in tasks for rec in runs.get((t, None), [])}))
    return table


def _adapter_method(runs: dict[tuple[str, Optional[int]], list[RunRecord]]) -> str:
    """The adapter registry's method of a row's runs (the most common, if they differ)."""
    counts = Counter(r.adapter_method for rs in runs.values() for r in rs)
    return counts.most_common(1)[0][0] if counts else ""


def benchmark_table(records: list[RunRecord], benchmark: str, published: bool = True) -> Table:
    """Methods x a benchmark's tasks, its group means and the mean over its tasks; with
    ``published``, each published row right below our rows of the same method (the rows of
    methods we did not run at the end)."""
    entry: Benchmark = BENCHMARKS[benchmark]
    tasks = list(entry.tasks)
    table = _accuracy_table(f"{entry.title} top-1 accuracy (%)", records, benchmark, tasks,
                            dict(entry.groups), "tasks" if entry.groups else "datasets")
    if entry.groups:
        table.notes.insert(0, f"Mean = mean over the {len(tasks)} tasks (not the mean of the "
                              "group means).")
    if published and entry.published:
        for pub in entry.published:
            ours = [i for i, m in enumerate(table.row_methods) if m == pub.method]
            at = ours[-1] + 1 if ours else len(table.rows)
            table.insert_row(at, [f"{pub.label} (published)"]
                             + [pub.accuracy(c) for c in tasks + list(entry.groups)]
                             + [pub.mean] + _published_params(pub), pub.method)
        table.notes.append(_published_note())
    return table


def vtab_table(records: list[RunRecord], published: bool = False) -> Table:
    """Methods x the 19 VTAB-1k tasks, the three group means and the mean over the 19 tasks."""
    return benchmark_table(records, "vtab", published)


def fgvc_table(records: list[RunRecord], published: bool = False) -> Table:
    """Methods x the five FGVC datasets and their mean."""
    return benchmark_table(records, "fgvc", published)


def custom_tasks_table(records: list[RunRecord]) -> Optional[Table]:
    """VTAB-1k-layout tasks outside the 19 (e.g. the digits demo), or None if there are none."""
    tasks = sorted({r.task for r in records if r.benchmark == "vtab" and r.phase == "final"}
                   - set(BENCHMARKS["vtab"].tasks))
    if not tasks:
        return None
    return _accuracy_table("Other tasks in the VTAB-1k layout: top-1 accuracy (%)", records,
                           "vtab", tasks, {}, "tasks")


def fewshot_table(records: list[RunRecord]) -> Table:
    """Few-shot FGVC: mean ± sample std over seeds, per method, dataset and number of shots."""
    shots = sorted({r.shots for r in records if r.benchmark == "fewshot" and r.shots} |
                   set(BENCHMARKS["fewshot"].shots or ()))
    columns = ["Method", "Dataset"] + [f"{k}-shot" for k in shots]
    table = Table("Few-shot FGVC top-1 accuracy (%), mean ± std over seeds", columns, [],
                  label_columns=2)
    for method, runs in sorted(final_records(records, "fewshot").items()):
        for dataset in sorted({task for task, _ in runs}):
            row: list[Cell] = [method, dataset]
            for k in shots:
                cell = runs.get((dataset, k), [])
                row.append(_mean_std([100.0 * r.test_acc for r in cell])  # type: ignore
                           if cell else None)
                mixed = mixed_settings(cell)
                if mixed:
                    table.mixed.add((len(table.rows), len(row) - 1))
                    table.notes.append(f"{method}: {dataset} {k}-shot averages seeds run with "
                                       f"{mixed}")
            table.rows.append(row)
    table.notes.append("std is the sample standard deviation over seeds (none for one seed); "
                       "(n=…) marks cells with fewer than 3 seeds.")
    return table


def fewshot_csv(records: list[RunRecord]) -> str:
    """Few-shot results in long form (one row per method, dataset and shots): numbers only."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", "dataset", "shots", "mean", "std", "seeds", "settings"])
    for method, runs in sorted(final_records(records, "fewshot").items()):
        for (dataset, k), cell in sorted(runs.items()):
            values = [100.0 * r.test_acc for r in cell]  # type: ignore[operator]
            std = statistics.stdev(values) if len(values) > 1 else None
            settings = {json.dumps(comparable_settings(r), sort_keys=True) for r in cell}
            writer.writerow([method, dataset, k, statistics.fmean(values),
                             "" if std is None else std, len(values), len(settings)])
    return out.getvalue()


def _mean_std(values: list[float]) -> str:
    """``mean ± std``; one seed has no sample std, so its cell shows the mean alone (as the
    CSV leaves std empty)."""
    mean = statistics.fmean(values)
    n = "" if len(values) >= 3 else f" (n={len(values)})"
    if len(values) == 1:
        return f"{mean:.2f}{n}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}{n}"


def _published_params(pub: PublishedRow) -> list[Cell]:
    trainable = pub.params_percent / 100.0 * VIT_B_BACKBONE_PARAMS
    return [trainable / 1e6, pub.params_percent, ppt_score(pub.mean, trainable)]


def _published_note() -> str:
    return (f"(published) rows: {SOURCE}, ViT-B/16 augreg_in21k; their params are "
            "the published % of ViT-B's backbone and their PPT is computed from those.")
