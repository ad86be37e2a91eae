"""Run the protocol over many tasks: all VTAB-1k tasks, all FGVC datasets, or the few-shot grid
(datasets x shots; the seeds are each task's final-run seeds).

``run_tasks`` runs them one after another in this process. ``run_in_processes`` runs each
task's protocol in a process of its own, one per slot at a time: a slot is a CUDA device id
(the process sees only that GPU through ``CUDA_VISIBLE_DEVICES``) or None (no pinning). A
worker process reads its job from a JSON file (the runner's arguments and the task), so
nothing is rebuilt as a command line; its output goes to ``<out>/logs/``. Finished runs are
skipped, so running a sweep again resumes it.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from .benchmarks import TaskRef
from .records import safe_name
from .runner import ProtocolRunner

logger = logging.getLogger("wegeft_vision.protocols")


@dataclass
class TaskOutcome:
    """How one task's protocol ended: ``error`` is None when it succeeded."""

    task: TaskRef
    error: Optional[str] = None
    log: Optional[Path] = None


def run_tasks(runner: ProtocolRunner, tasks: Sequence[TaskRef]) -> list[TaskOutcome]:
    """Each task's protocol in turn, in this process; one failure does not stop the others."""
    outcomes = []
    for task in tasks:
        try:
            runner.run(task)
            outcomes.append(TaskOutcome(task))
        except Exception as err:  # one broken task must not stop the other 18
            logger.exception("%s failed", task)
            outcomes.append(TaskOutcome(task, f"{type(err).__name__}: {err}"))
    return outcomes


def _job_name(runner: ProtocolRunner, task: TaskRef) -> str:
    name = f"{runner.benchmark.name}_{runner.method}_{task.task}"
    return safe_name(name if task.shots is None else f"{name}_{task.shots}shot")


def run_in_processes(runner: ProtocolRunner, tasks: Sequence[TaskRef],
                     slots: Sequence[Optional[str]]) -> list[TaskOutcome]:
    """One worker process per task, at most one per slot at a time."""
    if not slots:
        raise ValueError("run_in_processes needs at least one slot")
    free: "queue.Queue[Optional[str]]" = queue.Queue()
    for slot in slots:
        free.put(slot)
    log_dir = runner.out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // len(slots)))

    def job(task: TaskRef) -> TaskOutcome:
        slot = free.get()
        try:
            env = dict(os.environ)
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = slot
            # Several processes spinning on all cores slow each other down many times over.
            env.setdefault("OMP_NUM_THREADS", threads)
            name = _job_name(runner, task)
            job_file = log_dir / f"{name}.job.json"
            job_file.write_text(json.dumps({"runner": runner.arguments, "task": asdict(task)},
                                           indent=2))
            log = log_dir / f"{name}.log"
            logger.info("starting %s on %s (log: %s)", task,
                        f"GPU {slot}" if slot is not None else "a worker", log)
            with open(log, "a") as out:
                code = subprocess.run([sys.executable, "-m", __name__, str(job_file)],
                                      stdout=out, stderr=subprocess.STDOUT, env=env).returncode
            logger.info("%s finished with exit code %d", task, code)
            return TaskOutcome(task, None if code == 0 else f"exit code {code}", log)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        return list(pool.map(job, tasks))


def run_job_file(path: Path) -> int:
    """A worker: the protocol of the task in a job file written by ``run_in_processes``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    job = json.loads(Path(path).read_text())
    task = TaskRef(**job["task"])
    logger.info("%s on %s, CUDA_VISIBLE_DEVICES=%s", task, os.uname().nodename,
                os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"))
    result = ProtocolRunner(**job["runner"]).run(task)
    logger.info("%s: best %s; %d run(s) trained", task, result.best, result.executed)
    return 0


if __name__ == "__main__":
    sys.exit(run_job_file(Path(sys.argv[1])))
