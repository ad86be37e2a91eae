"""Tables from run records: VTAB-1k, FGVC and few-shot, as Markdown and CSV.

Only final runs enter the tables; a task's accuracy is the mean test accuracy over its seeds.
The VTAB-1k mean is the mean over the 19 tasks, not the mean of the three group means. A mean
over fewer tasks than the benchmark has is marked ``*`` in Markdown and counted in a note.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from ..data import registry
from .published import PUBLISHED
from .records import RunRecord

Cell = Union[str, float, int, None]
BENCHMARK_TITLES = {"vtab": "VTAB-1k", "fgvc": "FGVC", "fewshot": "Few-shot FGVC"}
# ViT-B/16 without its head (timm vit_base_patch16_224): turns published percentages into counts.
VIT_B_BACKBONE_PARAMS = 85_798_656
PPT_C = 1e7
PARAM_COLUMNS = ["Params (M)", "Params (%)", "PPT"]
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
    label_columns: int = 1

    def to_markdown(self) -> str:
        def fmt(cell: Cell, r: int, c: int) -> str:
            if cell is None:
                return "–"
            if isinstance(cell, float):
                text = f"{cell:.{COLUMN_DIGITS.get(self.columns[c], 2)}f}"
            else:
                text = str(cell)
            return text + ("*" if (r, c) in self.partial else "")

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
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(["" if cell is None else cell for cell in row])
        return out.getvalue()


def task_accuracies(records: Iterable[RunRecord], benchmark: str
                    ) -> dict[str, dict[tuple[str, Optional[int]], list[float]]]:
    """method -> (task, shots) -> final test accuracies in percent, one per seed (seed order)."""
    found: dict[str, dict[tuple[str, Optional[int]], list[tuple[int, float]]]] = defaultdict(
        lambda: defaultdict(list))
    for rec in records:
        if rec.benchmark == benchmark and rec.phase == "final" and rec.test_acc is not None:
            found[rec.method][(rec.task, rec.shots)].append((rec.seed, 100.0 * rec.test_acc))
    return {m: {k: [acc for _, acc in sorted(v)] for k, v in tasks.items()}
            for m, tasks in found.items()}


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
    table = Table(title, columns, [])
    for method, accs in sorted(task_accuracies(records, benchmark).items()):
        per_task = {t: _mean(accs.get((t, None), [])) for t in tasks}
        if all(v is None for v in per_task.values()):
            continue
        row: list[Cell] = [method] + [per_task[t] for t in tasks]
        r = len(table.rows)
        for group, members in list(groups.items()) + [("", tasks)]:
            done = [per_task[t] for t in members if per_task[t] is not None]
            row.append(_mean(done))
            if done and len(done) < len(members):
                table.partial.add((r, len(row) - 1))
                table.notes.append(f"{method}: {group + ' ' if group else ''}mean over "
                                   f"{len(done)} of {len(members)} {unit}")
        row += _params_cells(method_params(records, method, benchmark), row[-1])
        table.rows.append(row)
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
    for method, accs in sorted(task_accuracies(records, "fewshot").items()):
        for dataset in sorted({task for task, _ in accs}):
            row: list[Cell] = [method, dataset]
            for k in shots:
                values = accs.get((dataset, k), [])
                row.append(_mean_std(values) if values else None)
            table.rows.append(row)
    table.notes.append("std is the sample standard deviation over seeds; (n=…) marks cells with "
                       "fewer than 3 seeds.")
    return table


def fewshot_csv(records: list[RunRecord]) -> str:
    """Few-shot results in long form (one row per method, dataset and shots): numbers only."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", "dataset", "shots", "mean", "std", "seeds"])
    for method, accs in sorted(task_accuracies(records, "fewshot").items()):
        for (dataset, k), values in sorted(accs.items()):
            std = statistics.stdev(values) if len(values) > 1 else None
            writer.writerow([method, dataset, k, statistics.fmean(values),
                             "" if std is None else std, len(values)])
    return out.getvalue()


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    n = "" if len(values) >= 3 else f" (n={len(values)})"
    return f"{mean:.2f} ± {std:.2f}{n}"


def _published_params(percent: float, mean: float) -> list[Cell]:
    trainable = percent / 100.0 * VIT_B_BACKBONE_PARAMS
    return [trainable / 1e6, percent, ppt_score(mean, trainable)]


def _published_note() -> str:
    return (f"(published) rows: {PUBLISHED[0].source}, ViT-B/16 augreg_in21k; their params are "
            "the published % of ViT-B's backbone and their PPT is computed from those.")
