"""Protocols as submitit jobs: SLURM job arrays, or the same jobs in local subprocesses.

The ``slurm`` launcher submits one job per task (its whole protocol: search, then final runs) as
one SLURM job array; with ``jobs_per="run"`` every search run is a job of its own (for wide
grids) and each task's final runs follow in a second array that starts when the searches have
ended (a SLURM dependency). The ``submitit-local`` launcher runs the very same pickled jobs in
local subprocesses through submitit's LocalExecutor and waits for them.

A job that is preempted or reaches its time limit gets submitit's signal; its ``checkpoint``
hook hands submitit the same job again, which requeues it. The requeued job skips every run
that has its record and resumes the interrupted run from its Lightning checkpoint
(``last.ckpt``, written every epoch), so no finished work is done twice.

Job parameters are submitit's (``AutoExecutor.update_parameters``): ``timeout_min``,
``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ``slurm_partition``,
``slurm_array_parallelism``, ``slurm_account``, ``slurm_setup`` ...; a YAML file of them
(``cluster_config``, see configs/cluster/slurm.yaml) is read first, the other options win over
it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ..errors import MissingFileError, UserError
from .benchmarks import TaskRef
from .grid import expand_grid
from .records import HParamValue, RunRecord
from .runner import ProtocolResult, ProtocolRunner

logger = logging.getLogger("wegeft_vision.protocols")

LAUNCHERS = ("local", "slurm", "submitit-local")
# One run of the paper's protocol takes minutes to hours on a GPU; a longer task is requeued
# after its time limit and continues where it stopped.
DEFAULT_PARAMETERS: dict[str, Any] = {"timeout_min": 12 * 60, "gpus_per_node": 1,
                                      "cpus_per_task": 8, "mem_gb": 32, "tasks_per_node": 1}
# ClusterOptions field -> submitit parameter.
OPTIONS = {"partition": "slurm_partition", "gpus_per_job": "gpus_per_node",
           "cpus_per_job": "cpus_per_task", "mem_gb": "mem_gb", "time_min": "timeout_min",
           "array_parallelism": "slurm_array_parallelism"}


def _configure_logging() -> None:
    # A job is a fresh process: without this its progress lines would not reach its log.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


@dataclass
class ProtocolJob:
    """One task's protocol (search, then final runs) as a submitit job."""

    runner: ProtocolRunner
    task: TaskRef

    def __call__(self) -> ProtocolResult:
        _configure_logging()
        return self.runner.run(self.task)

    def checkpoint(self) -> Any:
        """submitit calls this on preemption or timeout; the returned job is requeued."""
        import submitit

        # Nothing to save here: records and Lightning checkpoints are on disk already.
        return submitit.helpers.DelayedSubmission(ProtocolJob(self.runner, self.task))


@dataclass
class SearchRunJob:
    """One search run (one grid point of one task) as a submitit job."""

    runner: ProtocolRunner
    task: TaskRef
    point: dict[str, HParamValue]

    def __call__(self) -> RunRecord:
        _configure_logging()
        spec = self.runner.spec(self.task, "search", self.point, self.runner.seeds[0])
        return self.runner.run_all([spec])[0][0]

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(
            SearchRunJob(self.runner, self.task, self.point))


@dataclass
class ClusterOptions:
    """Where the protocol's jobs run.

    Args:
        launcher: local: this machine; slurm: SLURM jobs through submitit; submitit-local: the
            same jobs in local subprocesses.
        cluster_config: YAML file of submitit parameters (timeout_min, slurm_partition,
            gpus_per_node, ...); the options below win over it.
        partition: SLURM partition.
        gpus_per_job: GPUs per job (default 1).
        cpus_per_job: CPUs per job (default 8).
        mem_gb: memory per job in GB (default 32).
        time_min: time limit per job in minutes (default 720); a job that reaches it is
            requeued and resumes.
        array_parallelism: at most this many jobs of the array run at once.
        jobs_per: task: one job per task's protocol; run: one job per search run, then one job
            per task for its final runs.
        submitit_dir: submitit's folder for job scripts and logs (default: <out>/submitit).
    """

    launcher: str = "local"
    cluster_config: Optional[Path] = None
    partition: Optional[str] = None
    gpus_per_job: Optional[int] = None
    cpus_per_job: Optional[int] = None
    mem_gb: Optional[int] = None
    time_min: Optional[int] = None
    array_parallelism: Optional[int] = None
    jobs_per: str = "task"
    submitit_dir: Optional[Path] = None

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise UserError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.jobs_per not in ("task", "run"):
            raise UserError(f"jobs_per must be 'task' or 'run', got {self.jobs_per!r}")

    def parameters(self) -> dict[str, Any]:
        """submitit parameters: defaults, then the YAML file, then the options."""
        parameters = dict(DEFAULT_PARAMETERS)
        if self.cluster_config is not None:
            path = Path(self.cluster_config)
            if not path.is_file():
                raise MissingFileError(f"cluster config {path} does not exist")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise UserError(f"cluster config {path} must hold a mapping of submitit "
                                f"parameters, got {type(loaded).__name__}")
            parameters.update(loaded)
        for option, name in OPTIONS.items():
            value = getattr(self, option)
            if value is not None:
                if not isinstance(value, str) and value <= 0:
                    raise UserError(f"{option} must be positive, got {value}")
                parameters[name] = value
        return parameters


def make_executor(launcher: str, folder: Path, parameters: dict[str, Any]) -> Any:
    """submitit's AutoExecutor for SLURM or for local subprocesses, with ``parameters``."""
    import submitit

    parameters = dict(parameters)
    # submitit takes these when the executor is made, the others in update_parameters.
    made_with = {k: parameters.pop(k) for k in list(parameters)
                 if k.split("_", 1)[-1] in ("max_num_timeout", "python", "max_pickle_size_gb")}
    try:
        executor = submitit.AutoExecutor(
            folder=folder, cluster="slurm" if launcher == "slurm" else "local", **made_with)
        executor.update_parameters(**parameters)
    except (ValueError, TypeError, NameError, AssertionError) as err:
        # submitit's message goes on to list every parameter it knows: keep its first line.
        raise UserError(f"submitit refused the job parameters {sorted(parameters | made_with)}:"
                         f" {str(err).splitlines()[0]}") from err
    return executor


def submit(runner: ProtocolRunner, tasks: Sequence[TaskRef], launcher: str,
           parameters: dict[str, Any], folder: Path, jobs_per: str = "task") -> list[Any]:
    """Submit the protocol of ``tasks``; returns the jobs of the tasks' protocols.

    With ``jobs_per="run"`` the search runs go first, one job each; on SLURM the protocol jobs
    wait for them through a dependency, locally they start once the searches have ended.
    """
    if launcher not in LAUNCHERS[1:]:
        raise ValueError(f"submit needs launcher slurm or submitit-local, got {launcher!r}")
    folder = Path(folder)
    parameters = {"name": f"{runner.benchmark.name}_{runner.method}", **parameters}
    executor = make_executor(launcher, folder, parameters)
    if jobs_per == "run" and runner.grid is not None:
        searches = [SearchRunJob(runner, task, point) for task in tasks
                    for point in expand_grid(runner.grid)]
        with executor.batch():
            search_jobs = [executor.submit(job) for job in searches]
        logger.info("submitted %d search run(s) as job(s) %s", len(search_jobs),
                    _ids(search_jobs))
        if launcher == "slurm":
            extra = dict(parameters.get("slurm_additional_parameters") or {})
            # One dependency on the array's id covers all of its tasks.
            array_id = search_jobs[0].job_id.split("_")[0]
            extra["dependency"] = f"afterany:{array_id}"
            executor.update_parameters(slurm_additional_parameters=extra)
        else:
            for job in search_jobs:
                job.wait()
    elif jobs_per not in ("task", "run"):
        raise ValueError(f"jobs_per must be 'task' or 'run', got {jobs_per!r}")
    with executor.batch():
        jobs = [executor.submit(ProtocolJob(runner, task)) for task in tasks]
    logger.info("submitted %d task protocol(s) as job(s) %s; logs in %s", len(jobs),
                _ids(jobs), folder)
    return jobs


def _ids(jobs: Sequence[Any]) -> str:
    return ", ".join(str(job.job_id) for job in jobs)


def collect(jobs: Sequence[Any], tasks: Sequence[TaskRef]) -> tuple[list[ProtocolResult],
                                                                      list[str]]:
    """Wait for the jobs; their results and a line for each job that failed."""
    results, failed = [], []
    for job, task in zip(jobs, tasks):
        try:
            results.append(job.result())
        except Exception as err:  # one broken task must not hide the others' results
            failed.append(f"{task} (job {job.job_id}: {type(err).__name__}: "
                          f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}; "
                          f"log: {job.paths.stderr})")
    return results, failed


def launch(options: ClusterOptions, runner: ProtocolRunner, tasks: Sequence[TaskRef]
           ) -> Optional[tuple[list[ProtocolResult], list[str]]]:
    """Submit as the options say; for submitit-local also wait and collect the results (None
    for SLURM, whose jobs report in their logs)."""
    folder = options.submitit_dir or runner.out_dir / "submitit"
    jobs = submit(runner, tasks, options.launcher, options.parameters(), folder, options.jobs_per)
    if options.launcher == "slurm":
        print(f"submitted {len(jobs)} job(s) to SLURM: {_ids(jobs)}; logs in {folder}; "
              f"records appear in {runner.records_dir}")
        return None
    return collect(jobs, tasks)
