"""Experiment protocols: search -> final runs, benchmark sweeps, records, tables and figures.

Figures and the summary files come from ``wegeft_vision.protocols.report`` and ``.plots``, not
imported here because they load matplotlib.
"""
from .grid import PAPER_GRID, check_grid, expand_grid, parse_grid
from .records import RunKey, RunRecord, Results, read_record, read_results, write_record
from .runner import (PROTOCOLS, ProtocolResult, ProtocolRunner, RunOutcome, RunSpec, TaskRef,
                     cli_executor, resolve_task, select_best)
from .summary import Table, fewshot_table, fgvc_table, ppt_score, vtab_table

__all__ = [
    "PAPER_GRID", "check_grid", "expand_grid", "parse_grid", "RunKey", "RunRecord", "Results",
    "read_record", "read_results", "write_record", "PROTOCOLS",
    "ProtocolResult", "ProtocolRunner", "RunOutcome", "RunSpec", "TaskRef", "cli_executor",
    "resolve_task", "select_best", "Table", "fewshot_table", "fgvc_table", "ppt_score",
    "vtab_table",
]
