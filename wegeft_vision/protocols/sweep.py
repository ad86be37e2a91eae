"""Run the protocol over a whole benchmark: all VTAB-1k tasks, all FGVC datasets, or the
few-shot grid (datasets x shots; the seeds are each job's final-run seeds).

With no --workers/--devices, jobs run one after another in this process. With --devices 0,1,...
each job (one task's whole protocol) runs in its own process pinned to one GPU through
CUDA_VISIBLE_DEVICES, one job per device at a time; --workers N runs N such processes without
pinning (CPU, or one shared GPU). Each job's output goes to <out>/logs/. Finished runs are
skipped, so re-running a sweep resumes it.

--launcher slurm submits the tasks as a SLURM job array through submitit (one task's protocol
per job, or with --jobs-per run one search run per job); --launcher submitit-local runs the same
jobs in local subprocesses. See wegeft_vision/protocols/cluster.py and docs/cluster.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..data import registry
from .cluster import add_launcher_arguments, launch
from .records import safe_name
from .runner import (OVERRIDES_HELP, TASK_TABLES, ProtocolRunner, TaskRef,
                     add_protocol_arguments, parse_ints, parse_with_overrides, resolve_task,
                     runner_from_args)

logger = logging.getLogger("wegeft_vision.protocols")


def benchmark_tasks(benchmark: str, names: Optional[Sequence[str]] = None,
                    shots: Optional[Sequence[int]] = None,
                    data_root: Optional[Path] = None) -> list[TaskRef]:
    """The tasks of a sweep: all of the benchmark's, or the named ones (aliases accepted)."""
    all_names = list(TASK_TABLES[benchmark])
    if shots is not None and benchmark != "fewshot":
        raise ValueError("--shots applies to the fewshot benchmark only")
    chosen = list(names) if names else all_names
    shot_list: list[Optional[int]] = (list(shots or registry.FEWSHOT_SHOTS)
                                      if benchmark == "fewshot" else [None])
    tasks = [resolve_task(benchmark, name, k, data_root) for name in chosen for k in shot_list]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"the task list names a task twice: {', '.join(chosen)}")
    return tasks


@dataclass
class JobResult:
    task: TaskRef
    returncode: int
    log: Path


def _job_argv(args: argparse.Namespace, task: TaskRef) -> list[str]:
    """The run_protocol command line for one task, rebuilt from the sweep's options."""
    argv = [sys.executable, "-m", "wegeft_vision.protocols.runner",
            "--benchmark", args.benchmark, "--data-root", str(args.data_root),
            "--method", args.method, "--out", str(args.out), "--task", task.task]
    if args.seeds:
        argv += ["--seeds", args.seeds]
    if task.shots is not None:
        argv += ["--shots", str(task.shots)]
    argv += [f"--config={c}" for c in args.configs]
    argv += [f"--grid={g}" for g in args.grid or []]
    argv += ["--checkpoints", args.checkpoints]
    for flag in ("no_search", "search", "final_with_val", "force"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    for option in ("search_epochs", "final_epochs"):
        if getattr(args, option) is not None:
            argv += ["--" + option.replace("_", "-"), str(getattr(args, option))]
    return argv + (["--", *args.overrides] if args.overrides else [])


def run_in_processes(args: argparse.Namespace, tasks: list[TaskRef],
                     slots: list[Optional[str]]) -> list[JobResult]:
    """Run one subprocess per task, at most one per slot at a time.

    A slot is a CUDA device id (the process sees only that GPU) or None (no pinning).
    """
    free: "queue.Queue[Optional[str]]" = queue.Queue()
    for slot in slots:
        free.put(slot)
    log_dir = Path(args.out) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // len(slots)))

    def job(task: TaskRef) -> JobResult:
        slot = free.get()
        try:
            env = dict(os.environ)
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = slot
            # Several processes spinning on all cores slow each other down many times over.
            env.setdefault("OMP_NUM_THREADS", threads)
            name = f"{args.benchmark}_{args.method}_{task.task}"
            log = log_dir / (safe_name(name if task.shots is None else f"{name}_{task.shots}shot")
                             + ".log")
            logger.info("starting %s on %s (log: %s)", task,
                        f"GPU {slot}" if slot is not None else "a worker", log)
            with open(log, "a") as out:
                code = subprocess.run(_job_argv(args, task), stdout=out,
                                      stderr=subprocess.STDOUT, env=env).returncode
            logger.info("%s finished with exit code %d", task, code)
            return JobResult(task, code, log)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        return list(pool.map(job, tasks))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep", description=__doc__, epilog=OVERRIDES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser)
    parser.add_argument("--tasks", default=None,
                        help="comma-separated subset of tasks/datasets (default: all)")
    parser.add_argument("--shots", default=None,
                        help="fewshot: comma-separated shots (default: 1,2,4,8,16)")
    parallel = parser.add_mutually_exclusive_group()
    parallel.add_argument("--devices", default=None,
                          help="comma-separated CUDA device ids; one process per device")
    parallel.add_argument("--workers", type=int, default=None,
                          help="number of parallel processes, not pinned to a GPU")
    add_launcher_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    try:
        names = [n for n in args.tasks.split(",") if n.strip()] if args.tasks else None
        shots = parse_ints(args.shots, "--shots") if args.shots else None
        tasks = benchmark_tasks(args.benchmark, names, shots, args.data_root)
        runner: ProtocolRunner = runner_from_args(args)  # validates every option up front
        if args.workers is not None and args.workers <= 0:
            raise ValueError(f"--workers must be positive, got {args.workers}")
        slots: Optional[list[Optional[str]]] = None
        if args.devices is not None:
            slots = [d.strip() for d in args.devices.split(",") if d.strip()]
            if not slots or len(set(slots)) != len(slots):
                raise ValueError(f"--devices must list distinct device ids, got {args.devices!r}")
        elif args.workers is not None:
            slots = [None] * args.workers
        if args.launcher != "local" and slots is not None:
            raise ValueError(f"--devices and --workers are for --launcher local; with "
                             f"{args.launcher} each job gets its own GPUs (--gpus-per-job)")
        if args.launcher != "local":
            _, collected = launch(args, runner, tasks)
            if collected is None:  # submitted to SLURM: the jobs report in their logs
                return 0
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.launcher != "local":
        failed = collected[1]
    elif slots is None:
        failed = []
        for task in tasks:
            try:
                runner.run(task)
            except Exception:  # one broken task must not stop the other 18
                logger.exception("%s failed", task)
                failed.append(f"{task}")
    else:
        results = run_in_processes(args, tasks, slots)
        failed = [f"{r.task} (exit code {r.returncode}, see {r.log})" for r in results
                  if r.returncode != 0]
    for what in failed:
        print(f"FAILED: {what}", file=sys.stderr)
    print(f"sweep finished: {len(tasks) - len(failed)} of {len(tasks)} task(s) succeeded; "
          f"records in {runner.records_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
