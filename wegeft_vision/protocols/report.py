"""Summarise results folders: tables (Markdown + CSV) and figures (PNG).

Reads ``<results>/records`` of each folder given (folders from several machines can be read
together; when two hold the same run, the newer record is used and the choice reported) and
writes into the output folder:

  summary.md                 all tables, in Markdown
  vtab.csv, fgvc.csv         one row per method (accuracies in %, params, PPT)
  vtab_other.csv             tasks in the VTAB-1k layout outside the 19 (e.g. the digits demo)
  fewshot.csv                one row per method, dataset and shots (mean, std, seeds)
  vtab_tasks.png, fgvc_tasks.png      per-task accuracy bars per method
  vtab_params.png, fgvc_params.png    accuracy vs trainable parameters
  fewshot_shots.png                   few-shot accuracy vs shots

Tables and figures appear only for benchmarks that have final runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .plots import accuracy_vs_params, fewshot_curves, task_bars
from .records import PathLike, Results, read_results
from .summary import benchmark_table, custom_tasks_table, fewshot_csv, fewshot_table


def read_results_folders(folders: Sequence[PathLike]) -> Results:
    """Records of results folders (each holding ``records/``, or a records folder itself)."""
    roots = []
    for folder in map(Path, folders):
        roots.append(folder / "records" if (folder / "records").is_dir() else folder)
    return read_results(*roots)


def write_summary(folders: Sequence[PathLike], out_dir: PathLike,
                  published: bool = True) -> tuple[list[Path], Results]:
    """Write the tables and figures; returns the files written and what was read.
    ``published`` puts the published results beside ours (VTAB-1k and FGVC)."""
    results = read_results_folders(folders)
    records = results.records
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    benchmarks = {r.benchmark for r in records if r.phase == "final"}
    written: list[Path] = []
    sections = []
    for benchmark in ("vtab", "fgvc"):
        if benchmark_table(records, benchmark, published=False).rows:  # runs on its own tasks
            table = benchmark_table(records, benchmark, published=published)
            sections.append(table.to_markdown())
            written.append(_write(out / f"{benchmark}.csv", table.to_csv()))
        if benchmark in benchmarks:  # the figures show custom tasks too
            for path in (task_bars(records, benchmark, out / f"{benchmark}_tasks.png"),
                         accuracy_vs_params(records, benchmark, out / f"{benchmark}_params.png",
                                            published)):
                if path is not None:
                    written.append(path)
    custom = custom_tasks_table(records)
    if custom is not None:
        sections.append(custom.to_markdown())
        written.append(_write(out / "vtab_other.csv", custom.to_csv()))
    if "fewshot" in benchmarks:
        sections.append(fewshot_table(records).to_markdown())
        written.append(_write(out / "fewshot.csv", fewshot_csv(records)))
        path = fewshot_curves(records, out / "fewshot_shots.png")
        if path is not None:
            written.append(path)
    if results.problems:
        sections.append("### Problems met reading the records\n\n"
                        + "".join(f"- {p}\n" for p in results.problems))
    if not benchmarks:
        sections.append("No final runs found.\n")
    written.insert(0, _write(out / "summary.md", "\n".join(sections)))
    return written, results


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
