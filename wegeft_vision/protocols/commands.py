"""The command lines ``wegeft-vision protocol``, ``sweep`` and ``summarize``.

Each parser is built from the signatures and docstrings of what it drives (``ProtocolRunner``,
``ClusterOptions``, ``write_summary``), so an option is declared once, where it is used, and
``--help`` shows its documentation. User errors raise ``UserError``; the ``wegeft-vision``
entry point prints them as one line.
"""
from __future__ import annotations

import inspect
import logging
import platform
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from jsonargparse import ArgumentParser, Namespace

from ..errors import UserError
from .benchmarks import benchmark_tasks, resolve_task
from .cluster import ClusterOptions, launch
from .report import write_summary
from .runner import ProtocolRunner
from .sweep import TaskOutcome, run_in_processes, run_tasks

logger = logging.getLogger("wegeft_vision.protocols")

EXAMPLES = """Settings by dotted name: --overrides '{trainer.accelerator: gpu, model.weights_path:
/w/vit.safetensors}'; the grid the same way: --grid '{model.lr: [1e-3, 5e-3], model.weight_decay:
[0]}'; lists repeat an option with +: --configs+ configs/vtab1k.yaml --configs+
configs/methods/lora.yaml."""


def _parser(prog: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description, epilog=EXAMPLES)
    parser.add_class_arguments(ProtocolRunner, None, skip={"executor"})
    parser.add_class_arguments(ClusterOptions, None)
    return parser


def _build(cfg: Namespace, cls: type, skip: Sequence[str] = ()) -> Any:
    """``cls`` from the parsed options named like its parameters."""
    values = cfg.as_dict()  # plain data: nested settings become dicts, not Namespaces
    names = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", *skip)]
    return cls(**{name: values[name] for name in names if name in values})


def _parse(parser: ArgumentParser, argv: Optional[Sequence[str]]
           ) -> tuple[Namespace, ProtocolRunner, ClusterOptions]:
    """The parsed options, the runner and the cluster options they describe."""
    cfg = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return cfg, _build(cfg, ProtocolRunner, skip=("executor",)), _build(cfg, ClusterOptions)


def protocol_command(argv: Optional[Sequence[str]] = None) -> int:
    """``wegeft-vision protocol``: one task's protocol (search, best point, final runs)."""
    parser = _parser("wegeft-vision protocol",
                     "The paper's protocol on one task: search the grid on the search split, "
                     "pick the best point by validation accuracy, then the final run(s) with "
                     "each seed, testing the last epoch. Each finished run leaves a JSON record "
                     "under <out>/records; a run whose record exists with the same settings is "
                     "skipped, so running it again resumes.")
    parser.add_argument("--task", type=str, required=True,
                        help="task or dataset name (aliases accepted, e.g. cifar100)")
    parser.add_argument("--shots", type=Optional[int], default=None,
                        help="fewshot: training images per class")
    cfg, runner, options = _parse(parser, argv)
    task = resolve_task(cfg.benchmark, cfg.task, cfg.shots, cfg.data_root)
    if options.launcher != "local":
        collected = launch(options, runner, [task])
        if collected is None:  # submitted to SLURM
            return 0
        results, failed = collected
        if failed:
            print(f"FAILED: {failed[0]}", file=sys.stderr)
            return 1
        result = results[0]
    else:
        logger.info("%s on %s", task, platform.node())
        result = runner.run(task)
    accs = ", ".join(f"{100 * r.test_acc:.2f}" for r in result.final)
    print(f"{task} {runner.method}: best {result.best or 'configs as given'}; test acc "
          f"{accs} (seeds {runner.seeds}); {result.executed} run(s) trained")
    return 0


def sweep_command(argv: Optional[Sequence[str]] = None) -> int:
    """``wegeft-vision sweep``: the protocol over a benchmark's tasks."""
    parser = _parser("wegeft-vision sweep",
                     "The protocol over a whole benchmark: all VTAB-1k tasks, all FGVC "
                     "datasets, or the few-shot grid (datasets x shots). Without --devices or "
                     "--workers the tasks run one after another in this process; finished runs "
                     "are skipped, so running it again resumes.")
    parser.add_argument("--shots", type=Optional[list[int]], default=None,
                        help="fewshot: the numbers of shots to run (default: [1, 2, 4, 8, 16])")
    parser.add_argument("--tasks", type=Optional[list[str]], default=None,
                        help="the tasks or datasets to run (default: all of the benchmark's)")
    parser.add_argument("--devices", type=Optional[list[Union[int, str]]], default=None,
                        help="CUDA device ids: one worker process per device, each seeing only "
                             "its GPU, running one task's protocol at a time")
    parser.add_argument("--workers", type=Optional[int], default=None,
                        help="this many worker processes, not pinned to a GPU")
    cfg, runner, options = _parse(parser, argv)
    tasks = benchmark_tasks(cfg.benchmark, cfg.tasks, cfg.shots, cfg.data_root)
    if cfg.devices is not None and cfg.workers is not None:
        raise UserError("give --devices or --workers, not both")
    if cfg.workers is not None and cfg.workers <= 0:
        raise UserError(f"--workers must be positive, got {cfg.workers}")
    if cfg.devices is not None and (not cfg.devices or len(set(cfg.devices)) != len(cfg.devices)):
        raise UserError(f"--devices must list distinct device ids, got {cfg.devices}")
    slots = [str(d) for d in cfg.devices] if cfg.devices is not None else (
        [None] * cfg.workers if cfg.workers is not None else None)
    if options.launcher != "local":
        if slots is not None:
            raise UserError(f"--devices and --workers are for --launcher local; with "
                            f"{options.launcher} each job gets its own GPUs (--gpus_per_job)")
        collected = launch(options, runner, tasks)
        if collected is None:  # submitted to SLURM: the jobs report in their logs
            return 0
        failed = collected[1]
    else:
        outcomes: list[TaskOutcome] = (run_tasks(runner, tasks) if slots is None
                                       else run_in_processes(runner, tasks, slots))
        failed = [f"{o.task} ({o.error}{f', see {o.log}' if o.log else ''})"
                  for o in outcomes if o.error is not None]
    for what in failed:
        print(f"FAILED: {what}", file=sys.stderr)
    print(f"sweep finished: {len(tasks) - len(failed)} of {len(tasks)} task(s) succeeded; "
          f"records in {runner.records_dir}")
    return 1 if failed else 0


def summarize_command(argv: Optional[Sequence[str]] = None) -> int:
    """``wegeft-vision summarize``: tables and figures from results folders."""
    parser = ArgumentParser(prog="wegeft-vision summarize",
                            description="Tables (summary.md, vtab.csv, fgvc.csv, fewshot.csv, "
                                        "vtab_other.csv) and figures (*.png) from the records "
                                        "of results folders; when two folders hold the same "
                                        "run, the newer record is used and the choice "
                                        "reported.")
    parser.add_argument("results", type=Path, nargs="+",
                        help="results folder(s) written by protocol or sweep (their --out)")
    parser.add_argument("--out", type=Optional[Path], default=None,
                        help="where tables and figures go (default: <first results>/summary)")
    parser.add_argument("--published", type=bool, default=True,
                        help="show the published numbers (the WeGeFT paper's VPT, BitFit, LoRA "
                             "and WeGeFT rows, ViT-B/16) beside ours")
    cfg = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    results = [Path(p) for p in cfg.results]
    written, read = write_summary(results, cfg.out or results[0] / "summary",
                                  published=cfg.published)
    print(written[0].read_text())
    print(f"{len(read.records)} record(s) read, {len(read.problems)} problem(s); wrote:")
    for path in written:
        print(f"  {path}")
    return 0
