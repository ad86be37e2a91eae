"""Tables from run records: VTAB-1k, FGVC and few-shot, as Markdown and CSV.

Only final runs enter the tables; a task's accuracy is the mean test accuracy over its seeds.
The VTAB-1k mean is the mean over the 19 tasks, not the mean of the three group means. A mean
over fewer tasks than the benchmark has is marked ``*`` in Markdown and counted in a note. A
number that averages runs made with different settings (epochs, configs, passed-through
arguments, backbone weights) is marked ``†`` and the difference named in a note; the CSV files
count the distinct settings of each row in a ``Settings`` column.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from ..data import registry
from .published import PUBLISHED
from .records import RunRecord, settings_diff

Cell = Union[str, float, int, None]
BENCHMARK_TITLES = {"vtab": "VTAB-1k", "fgvc": "FGVC", "fewshot": "Few-shot FGVC"}
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
    settings_counts: Optional[list[int]] = None

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
            extra = [] if counts is None else ["" if r >= len(counts) else counts[r]]
            writer.writerow(["" if cell is None else cell for cell in row] + extra)
        return out.getvalue()


def comparable_settings(record: RunRecord) -> dict:
    """The settings that must agree for two runs to enter one mean (task and data aside)."""
    settings = record.settings
    if not settings:
        return {"settings": "not recorded (an older record)"}
    weights_args = {f"--model.{k}" for k in ("weights_path", "checkpoint_path")}
    return {"epochs": settings.get("epochs"),
            "configs": [c.get("sha256") for c in settings.get("configs", [])],
            # The weights file's path may differ between machines; its content is compared.
            "overrides": [a for a in settings.get("overrides", [])
                          if a.split("=", 1)[0] not in weights_args],
            "backbone": settings.get("backbone"),
            "weights": (settings.get("weights") or {}).get("sha256"),
            "use_val_for_train": settings.get("data", {}).get("args", {}).get(
                "use_val_for_train")}


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
                    groups: dict[str, list[str]], unit: str) -> Table:
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
        table.settings_counts.append(len({  # type: ignore[union-attr]
            json.dumps(comparable_settings(rec), sort_keys=True)
            for t in tasks for rec in runs.get((t, None), [])}))
    return table


def vtab_table(records: list[RunRecord], published: bool = False) -> Table:
    """Methods x the 19 VTAB-1k tasks, the three group means and the mean over the 19 tasks."""
    tasks = list(registry.VTAB_TASKS)
    groups = {g: registry.vtab_tasks_in_group(g) for g in registry.VTAB_GROUPS}
    table = _accuracy_table("VTAB-1k top-1 accuracy (%)", records, "vtab", tasks, groups, "tasks")
    table.notes.insert(0, "Mean = mean over the 19 tasks (not the mean of the group means).")
    if published:
        for pub in PUBLISHED:
            if pub.vtab_mean is not None:
                table.rows.append([f"{pub.method} (published)"] + [None] * len(tasks)
                                  + [pub.vtab_groups.get(g) for g in groups] + [pub.vtab_mean]
                                  + _published_params(pub.params_percent, pub.vtab_mean))
        table.notes.append(_published_note())
    return table


def fgvc_table(records: list[RunRecord], published: bool = False) -> Table:
    """Methods x the five FGVC datasets and their mean."""
    datasets = list(registry.FGVC_DATASETS)
    table = _accuracy_table("FGVC top-1 accuracy (%)", records, "fgvc", datasets, {}, "datasets")
    if published:
        for pub in PUBLISHED:
            if pub.fgvc_mean is not None:
                table.rows.append([f"{pub.method} (published)"]
                                  + [pub.fgvc.get(d) for d in datasets] + [pub.fgvc_mean]
                                  + _published_params(pub.params_percent, pub.fgvc_mean))
        table.notes.append(_published_note())
    return table


def custom_tasks_table(records: list[RunRecord]) -> Optional[Table]:
    """VTAB-1k-layout tasks outside the 19 (e.g. the digits demo), or None if there are none."""
    tasks = sorted({r.task for r in records if r.benchmark == "vtab" and r.phase == "final"}
                   - set(registry.VTAB_TASKS))
    if not tasks:
        return None
    return _accuracy_table("Other tasks in the VTAB-1k layout: top-1 accuracy (%)", records,
                           "vtab", tasks, {}, "tasks")


def fewshot_table(records: list[RunRecord]) -> Table:
    """Few-shot FGVC: mean ± sample std over seeds, per method, dataset and number of shots."""
    shots = sorted({r.shots for r in records if r.benchmark == "fewshot" and r.shots} |
                   set(registry.FEWSHOT_SHOTS))
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


def _published_params(percent: float, mean: float) -> list[Cell]:
    trainable = percent / 100.0 * VIT_B_BACKBONE_PARAMS
    return [trainable / 1e6, percent, ppt_score(mean, trainable)]


def _published_note() -> str:
    return (f"(published) rows: {PUBLISHED[0].source}, ViT-B/16 augreg_in21k; their params are "
            "the published % of ViT-B's backbone and their PPT is computed from those.")
