"""Experiment protocols: search -> final runs, benchmark sweeps, records, tables and figures.

Figures and the summary files come from ``wegeft_vision.protocols.report`` and ``.plots``, not
imported here because they load matplotlib; the command lines (``wegeft-vision protocol``,
``sweep``, ``summarize``) are in ``.commands``.
"""
from .benchmarks import BENCHMARKS, Benchmark, TaskRef, benchmark_tasks, get_benchmark, resolve_task
from .grid import PAPER_GRID, check_grid, expand_grid
from .records import RunKey, RunRecord, Results, read_record, read_results, write_record
from .runner import (ProtocolResult, ProtocolRunner, RunOutcome, RunSpec, select_best,
                     train_run)
from .summary import Table, benchmark_table, fewshot_table, fgvc_table, ppt_score, vtab_table

__all__ = [
    "BENCHMARKS", "Benchmark", "TaskRef", "benchmark_tasks", "get_benchmark", "resolve_task",
    "PAPER_GRID", "check_grid", "expand_grid", "RunKey", "RunRecord", "Results", "read_record",
    "read_results", "write_record", "ProtocolResult", "ProtocolRunner", "RunOutcome", "RunSpec",
    "select_best", "train_run", "Table", "benchmark_table", "fewshot_table", "fgvc_table",
    "ppt_score", "vtab_table",
]
