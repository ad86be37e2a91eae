"""Draw the documentation's figures from the measured numbers in docs/.

    python scripts/make_figures.py [--docs docs] [--out docs/figures]

- ``demo_comparison.png``: test accuracy per method and shot count on the offline demo, the mean
  over few-shot seeds as a bar and every seed as a dot (from ``docs/demo_comparison.json``,
  written by ``scripts/compare_demo.py``).
- ``demo_shots.png``: the same runs as accuracy against shots per class, mean ± std over seeds.
- ``benchmark.png``: step time and saved activations per variant (from ``docs/benchmark.json``,
  one or more results of ``scripts/benchmark.py --json``). Step time is the median over rounds;
  the label above each bar is its time relative to the ``floor`` variant, the median of
  per-round ratios as the benchmark's own tables compute it.

Numbers are read, never typed in here: rerun this script after rerunning the measurements.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# A fixed look: figures are committed, so re-running on another machine should not restyle them.
STYLE = {"figure.dpi": 110, "savefig.dpi": 110, "font.size": 9, "axes.spines.top": False,
         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "axes.axisbelow": True}


def load_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the script that measures it first "
                                "(scripts/compare_demo.py or scripts/benchmark.py --json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def demo_from_markdown(path: Path) -> dict:
    """The first table of compare_demo.py's Markdown (mean ± std per method and shot count), in
    the JSON's layout without per-seed accuracies: for a comparison measured before the JSON."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run scripts/compare_demo.py first")
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    shots = [int(c.split("-")[0]) for c in header[2:]]
    methods = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "method":
            break  # the second table (learning rates) starts
        # A cell that is not "mean ± std" (e.g. "pending") has no number to draw.
        pairs = [tuple(float(x) for x in cell.split("±")) if "±" in cell else (None, None)
                 for cell in cells[2:]]
        methods[cells[0]] = {"shots": {str(k): {"mean": m, "std": sd, "per_seed": None}
                                       for k, (m, sd) in zip(shots, pairs)}}
    seeds = re.search(r"seeds ([\d, ]+);", path.read_text(encoding="utf-8"))
    return {"shots": shots, "seeds": [int(x) for x in seeds.group(1).split(",")] if seeds else [],
            "methods": methods, "source": path.name}


def demo_cells(numbers: dict, path: Path) -> tuple[list[str], list[int], dict]:
    """Methods, shot counts and {(method, shots): cell}, checked for the fields the plots use."""
    try:
        shots = [int(k) for k in numbers["shots"]]
        seeds = numbers["seeds"]
        methods = list(numbers["methods"])
        cells = {(m, k): numbers["methods"][m]["shots"][str(k)] for m in methods for k in shots}
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: missing {err} (expected the layout of "
                         "scripts/compare_demo.py's JSON)") from err
    for (method, k), cell in cells.items():
        if cell["per_seed"] is None:  # read from the Markdown table: means and stds only
            continue
        if len(cell["per_seed"]) != len(seeds):
            raise ValueError(f"{path}: {method}, {k}-shot has {len(cell['per_seed'])} per-seed "
                             f"accuracies for {len(seeds)} seeds")
        if abs(statistics.mean(cell["per_seed"]) - cell["mean"]) > 1e-6:
            raise ValueError(f"{path}: {method}, {k}-shot: mean {cell['mean']} is not the mean "
                             f"of its per-seed accuracies {cell['per_seed']}")
    return methods, shots, cells


def plot_demo_comparison(numbers: dict, path: Path, out: Path) -> None:
    methods, shots, cells = demo_cells(numbers, path)
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(shots))]
        means = [cells[method, k]["mean"] for k in shots]
        ax.bar(xs, [m if m is not None else 0.0 for m in means], width * 0.9, label=method,
               alpha=0.75)
        for x, k in zip(xs, shots):
            if cells[method, k]["mean"] is None:
                ax.annotate("n/a", (x, 1), ha="center", va="bottom", fontsize=6, rotation=90)
                continue
            seeds = cells[method, k]["per_seed"]
            if seeds is None:
                ax.errorbar(x, cells[method, k]["mean"], yerr=cells[method, k]["std"],
                            color="black", capsize=2, lw=0.8)
            else:
                ax.plot([x] * len(seeds), seeds, "o", ms=2.5, color="black", alpha=0.7)
    ax.set_xticks(range(len(shots)), [f"{k}-shot" for k in shots])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    spread = "dots: seeds" if "source" not in numbers else "bars: ± std"
    ax.set_title(f"Offline demo: digits 5-9, mean over seeds {numbers['seeds']} ({spread})")
    # Beside the axes: with ten methods a legend inside covers the bars.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_demo_shots(numbers: dict, path: Path, out: Path) -> None:
    methods, shots, cells = demo_cells(numbers, path)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for method in methods:
        measured = [k for k in shots if cells[method, k]["mean"] is not None]
        means = [cells[method, k]["mean"] for k in measured]
        stds = [cells[method, k]["std"] for k in measured]
        ax.errorbar(measured, means, yerr=stds, marker="o", ms=3.5, capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("training images per class (few-shot list)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Offline demo: accuracy against shots (mean ± std over seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def benchmark_runs(data: Any, path: Path) -> list[dict]:
    """One results dict, a list of them, or a dict of them by name -> a list."""
    if isinstance(data, dict) and "step_cpu_s" in data:
        runs = [data]
    elif isinstance(data, list):
        runs = data
    elif isinstance(data, dict):
        runs = [run for run in data.values() if isinstance(run, dict)]
    else:
        runs = []
    runs = [run for run in runs if isinstance(run, dict) and "step_cpu_s" in run]
    if not runs:
        raise ValueError(f"{path}: no results of scripts/benchmark.py --json in it (a dict with "
                         "'step_cpu_s', or a list or dict of such dicts)")
    return runs


def _paired_ratio(times: dict[str, list[float]], name: str, ref: str) -> Optional[float]:
    if ref not in times or name not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[name], times[ref]))


def run_title(run: dict) -> str:
    args = run.get("args", {})
    targets = args.get("targets", "?")
    targets = " ".join(targets) if isinstance(targets, list) else str(targets)
    device = run.get("device", "?")
    return (f"{args.get('model', '?')}, targets {targets}, r={args.get('rank', '?')}, "
            f"batch {args.get('batch_size', '?')}, {device}"
            + (f" ({run['threads']} thread{'s' if run['threads'] != 1 else ''})"
               if device == "cpu" and "threads" in run else ""))


def plot_benchmark(data: Any, path: Path, out: Path) -> None:
    runs = benchmark_runs(data, path)
    fig, axes = plt.subplots(len(runs), 2, figsize=(9, 2.9 * len(runs)), squeeze=False)
    for (ax_time, ax_mem), run in zip(axes, runs):
        gpu = run.get("device") == "cuda"
        times = run["step_wall_s"] if gpu else run["step_cpu_s"]
        names = list(times)
        medians = [statistics.median(times[n]) for n in names]
        bars = ax_time.bar(names, medians, color="tab:blue", alpha=0.75)
        for bar, name in zip(bars, names):
            ratio = _paired_ratio(times, name, "floor")
            if ratio is not None:
                ax_time.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2,
                                                   bar.get_height()),
                                 ha="center", va="bottom", fontsize=7)
        ax_time.set_ylabel("s / step" if gpu else "CPU s / step")
        ax_time.set_title(run_title(run), fontsize=8)
        memory = run.get("memory_bytes", {})
        mem_names = [n for n in names if memory.get(n) is not None]
        ax_mem.bar(mem_names, [memory[n] / 1e6 for n in mem_names], color="tab:orange",
                   alpha=0.75)
        ax_mem.set_ylabel("peak allocated (MB)" if gpu else "saved activations (MB)")
        ax_mem.set_title("memory" + (" (CUDA peak of a step)" if gpu
                                     else " kept for backward, parameters excluded"), fontsize=8)
        for ax in (ax_time, ax_mem):
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=Path, default=Path("docs"),
                        help="folder holding demo_comparison.json and benchmark.json")
    parser.add_argument("--out", type=Path, default=None, help="default: <docs>/figures")
    args = parser.parse_args(argv)
    out = args.out or args.docs / "figures"
    out.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update(STYLE)
    demo_path, bench_path = args.docs / "demo_comparison.json", args.docs / "benchmark.json"
    if demo_path.is_file():
        demo = load_json(demo_path)
    else:
        demo_path = args.docs / "demo_comparison.md"
        print(f"no {demo_path.with_suffix('.json')}: reading means and stds from {demo_path}")
        demo = demo_from_markdown(demo_path)
    plot_demo_comparison(demo, demo_path, out / "demo_comparison.png")
    plot_demo_shots(demo, demo_path, out / "demo_shots.png")
    print(f"wrote {out / 'demo_comparison.png'} and {out / 'demo_shots.png'} from {demo_path}")
    plot_benchmark(load_json(bench_path), bench_path, out / "benchmark.png")
    print(f"wrote {out / 'benchmark.png'} from {bench_path}")


if __name__ == "__main__":
    main()
