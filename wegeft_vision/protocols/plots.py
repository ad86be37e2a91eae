"""Figures from run records (matplotlib, Agg backend, PNG)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # headless: sweeps run on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .benchmarks import BENCHMARKS  # noqa: E402
from .records import PathLike, RunRecord  # noqa: E402
from .summary import VIT_B_BACKBONE_PARAMS, method_params, task_accuracies  # noqa: E402


def _ordered_tasks(benchmark: str, present: set[str]) -> list[str]:
    known = list(BENCHMARKS[benchmark].tasks)
    return [t for t in known if t in present] + sorted(present - set(known))


def task_bars(records: list[RunRecord], benchmark: str, path: PathLike) -> Optional[Path]:
    """Grouped bars: test accuracy per task, one bar per method. None if there is nothing."""
    accs = task_accuracies(records, benchmark)
    if not accs:
        return None
    methods = sorted(accs)
    tasks = _ordered_tasks(benchmark, {t for m in accs.values() for t, _ in m})
    x = np.arange(len(tasks))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 0.5 * len(tasks)), 4.5))
    for i, method in enumerate(methods):
        values = [statistics.fmean(accs[method][(t, None)]) if (t, None) in accs[method]
                  else np.nan for t in tasks]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, label=method)
    ax.set_xticks(x, tasks, rotation=60, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{BENCHMARKS[benchmark].title} test accuracy per task")
    ax.legend()
    return _save(fig, path)


def accuracy_vs_params(records: list[RunRecord], benchmark: str, path: PathLike,
                       published: bool = False) -> Optional[Path]:
    """Mean accuracy over finished tasks against trainable parameters (log x).

    A method with fewer finished tasks than another is labelled with its task count, since
    its mean is over other tasks. ``published`` adds the published ViT-B/16 results as hollow
    markers (VTAB-1k and FGVC).
    """
    accs = task_accuracies(records, benchmark)
    points = []
    for method, tasks in sorted(accs.items()):
        params = method_params(records, method, benchmark)
        if params is None or params[0] == 0:
            continue  # a log axis has no place for zero trainable parameters
        mean = statistics.fmean(statistics.fmean(v) for v in tasks.values())
        points.append((method, params[0], mean, len(tasks)))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    counts = {n for *_, n in points}
    for method, params, mean, n in points:
        ax.scatter(params, mean, s=40)
        label = method if len(counts) == 1 else f"{method} ({n} tasks)"
        ax.annotate(label, (params, mean), textcoords="offset points", xytext=(5, 5))
    for pub in BENCHMARKS[benchmark].published if published else ():
        params = pub.params_percent / 100 * VIT_B_BACKBONE_PARAMS
        ax.scatter(params, pub.mean, s=40, facecolors="none", edgecolors="gray")
        ax.annotate(f"{pub.label} (published)", (params, pub.mean),
                    textcoords="offset points", xytext=(5, -10), color="gray")
    ax.set_xscale("log")
    ax.margins(x=0.3, y=0.1)  # room for the labels
    ax.set_xlabel("trainable parameters (head excluded)")
    ax.set_ylabel("mean top-1 accuracy (%)")
    ax.set_title(f"{BENCHMARKS[benchmark].title}: accuracy vs parameters")
    return _save(fig, path)


def fewshot_curves(records: list[RunRecord], path: PathLike) -> Optional[Path]:
    """Accuracy vs shots (log2 x), mean ± std over seeds; one panel per dataset."""
    accs = task_accuracies(records, "fewshot")
    datasets = sorted({t for m in accs.values() for t, _ in m})
    if not datasets:
        return None
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.0 * len(datasets), 3.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method in sorted(accs):
            shots = sorted(k for t, k in accs[method] if t == dataset)
            if not shots:
                continue
            runs = [accs[method][(dataset, k)] for k in shots]
            means = [statistics.fmean(v) for v in runs]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in runs]
            ax.errorbar(shots, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ticks = sorted({k for m in accs.values() for t, k in m if t == dataset})
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set_xlabel("shots per class")
        ax.set_title(dataset)
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][-1].legend()
    return _save(fig, path)


def _save(fig: "plt.Figure", path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
