"""Protocols on a cluster: submitit jobs (local subprocesses here, the code SLURM runs), the
requeue after a preemption, the sbatch scripts, a Lightning checkpoint resume, and the
multi-node Lightning config."""
from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

pytest.importorskip("submitit")

from wegeft_vision.protocols import cluster, runner, sweep  # noqa: E402
from wegeft_vision.protocols.records import read_record, read_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "data" / "digits_vtab" / "digits"
# A few batches of the demo's digits through the demo config's pretrained tiny ViT.
FAST = ["--data.num_classes=5", "--data.init_args.num_workers=0",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]


@pytest.fixture
def digits(tmp_path, monkeypatch):
    """Two tasks (the digits demo under two names), run from the repository root with one
    thread per process; the job subprocesses inherit this environment."""
    root = tmp_path / "data"
    root.mkdir()
    for name in ("digits", "digits_b"):
        (root / name).symlink_to(DIGITS)
    monkeypatch.chdir(REPO)  # configs/demo.yaml names its backbone file relative to it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The jobs unpickle this module's functions: let their interpreter find it.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return root


def _sweep_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--benchmark", "vtab", "--data-root", str(root), "--method", "wegeft",
            "--config=configs/demo.yaml", "--out", str(out), "--tasks", "digits,digits_b",
            "--grid", "model.lr=0.01", "--grid", "model.weight_decay=0", "--search-epochs", "1",
            "--final-epochs", "1", *extra, "--", *FAST]


def _by_key(out: Path) -> dict:
    results = read_results(out / "records")
    assert results.problems == []
    return {r.key: r for r in results.records}


def test_submitit_local_sweep_gives_the_local_launchers_records(digits, tmp_path):
    assert sweep.main(_sweep_args(digits, tmp_path / "local")) == 0
    assert sweep.main(_sweep_args(digits, tmp_path / "jobs", "--launcher", "submitit-local",
                                  "--time-min", "10")) == 0
    local, jobs = _by_key(tmp_path / "local"), _by_key(tmp_path / "jobs")
    assert len(local) == 4 and local.keys() == jobs.keys()  # 2 tasks x (1 search + 1 final)
    for key, record in local.items():
        other = jobs[key]
        assert (other.val_acc, other.test_acc, other.epochs, other.settings_digest) == \
            (record.val_acc, record.test_acc, record.epochs, record.settings_digest), key
    # Each task was one job with its own log in submitit's folder.
    assert len(list((tmp_path / "jobs" / "submitit").glob("*_0_log.out"))) == 2


def preempt_before_second_run(marker: Path, spec: runner.RunSpec) -> runner.RunOutcome:
    """The run executor of the preemption test: before the job's second run it sends itself
    the signal SLURM sends on preemption or near the time limit (USR2 for submitit)."""
    records = list((marker.parent / "records").rglob("*.json"))
    if records and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(60)  # submitit's handler checkpoints and exits before this ends
    return runner.cli_executor(spec)


def test_preempted_job_is_requeued_and_redoes_no_finished_run(digits, tmp_path):
    out = tmp_path / "out"
    marker = out / "preempted"
    protocol = runner.ProtocolRunner(
        out, digits, "vtab", "wegeft", configs=[REPO / "configs/demo.yaml"], overrides=FAST,
        grid={"model.lr": [0.01], "model.weight_decay": [0.0]}, search_epochs=1,
        final_epochs=1, executor=functools.partial(preempt_before_second_run, marker))
    task = runner.resolve_task("vtab", "digits", data_root=digits)
    (job,) = cluster.submit(protocol, [task], "submitit-local", {"timeout_min": 10},
                            tmp_path / "submitit")
    result = job.result()
    assert marker.exists(), "the job was never preempted"
    preempted_at = marker.stat().st_mtime
    records = sorted(read_results(out / "records").records,
                     key=lambda r: r.finished_at)
    assert len(records) == 2 and result.executed == 1  # the requeued job skipped the first run
    first = records[0]
    assert first.phase == "search" and records[1].phase == "final"
    assert _finished_epoch(first) < preempted_at < _finished_epoch(records[1])
    log = Path(job.paths.stdout).read_text() + Path(job.paths.stderr).read_text()
    assert "Calling checkpoint method" in log and "Requeued job" in log
    assert "skipping vtab/digits wegeft search (model.lr=0.01" in log


def _finished_epoch(record) -> float:
    from datetime import datetime

    return datetime.fromisoformat(record.finished_at).timestamp()


class FailInSecondEpoch(Callback):
    """Stands in for a kill during epoch 2 (after epoch 1's checkpoint was written)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("killed in epoch 2")


def test_interrupted_run_resumes_from_its_lightning_checkpoint(digits, tmp_path):
    from wegeft_vision.cli import cli_main

    calls, kill = [], [True]

    def killed_once(spec):
        calls.append(spec.cli_args())
        if kill:
            kill.clear()
            cli_main(spec.cli_args() + ["--trainer.callbacks+=test_cluster.FailInSecondEpoch"])
        return runner.cli_executor(spec)

    protocol = runner.ProtocolRunner(tmp_path / "out", digits, "vtab", "wegeft",
                                     configs=[REPO / "configs/demo.yaml"], overrides=FAST,
                                     final_epochs=2, executor=killed_once)
    task = runner.resolve_task("vtab", "digits", data_root=digits)
    with pytest.raises(RuntimeError, match="killed in epoch 2"):
        protocol.run(task)
    spec = protocol.spec(task, "final", {}, 0)
    last = spec.run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and runner._checkpoint_epoch(last) == 0
    result = protocol.run(task)
    assert result.executed == 1 and len(calls) == 2
    assert f"--ckpt_path={last}" in calls[1] and result.final[0].epochs == 2
    assert f"--ckpt_path={last}" in result.final[0].cli_args
    # Other settings must not resume that checkpoint: the run folder starts afresh.
    calls.clear()
    other = runner.ProtocolRunner(tmp_path / "out", digits, "vtab", "wegeft",
                                  configs=[REPO / "configs/demo.yaml"], overrides=FAST,
                                  final_epochs=3, executor=killed_once)
    assert other.run(task).final[0].epochs == 3
    assert not any(a.startswith("--ckpt_path") for a in calls[0])


FAKE_SBATCH = """#!/bin/sh
n=$(ls "$SBATCH_COPIES" | wc -l)
cp "$1" "$SBATCH_COPIES/$n.sh"
echo "Submitted batch job $((1000 + n))"
"""


def test_slurm_scripts_carry_the_options_and_the_search_dependency(digits, tmp_path,
                                                                   monkeypatch, capsys):
    """--launcher slurm with a stand-in sbatch that keeps the scripts submitit writes."""
    bin_dir, copies = tmp_path / "bin", tmp_path / "scripts"
    bin_dir.mkdir()
    copies.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\n")  # submitit looks for it to know it is on SLURM
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_COPIES", str(copies))
    config = tmp_path / "cluster.yaml"
    config.write_text((REPO / "configs/cluster/slurm.yaml").read_text())
    args = _sweep_args(digits, tmp_path / "out", "--launcher", "slurm", "--cluster-config",
                       str(config), "--partition", "a100", "--mem-gb", "48",
                       "--array-parallelism", "3", "--jobs-per", "run")
    args[args.index("model.lr=0.01")] = "model.lr=0.01,0.02"
    assert sweep.main(args) == 0
    search, final = (copies / "0.sh").read_text(), (copies / "1.sh").read_text()
    for script in (search, final):
        assert "#SBATCH --partition=a100" in script  # the option wins over the YAML's gpu
        assert "#SBATCH --mem=48GB" in script
        assert "#SBATCH --time=720" in script
        assert "#SBATCH --gpus-per-node=1" in script and "#SBATCH --cpus-per-task=8" in script
        assert "#SBATCH --signal=USR2@" in script
    assert "#SBATCH --array=0-3%3" in search  # 2 tasks x 2 grid points
    assert "#SBATCH --array=0-1%2" in final  # the two tasks' protocols (capped at 2)
    assert "#SBATCH --dependency=afterany:1000" in final
    assert "dependency" not in search
    assert "submitted 2 job(s) to SLURM: 1001_0, 1001_1" in capsys.readouterr().out
    assert not (tmp_path / "out" / "records").exists()  # nothing ran here


@pytest.mark.parametrize("content, message", [
    ("- a\n- b\n", "must hold a mapping of submitit parameters, got list"),
    ("gpus_per_nod: 1\n", "submitit refused the job parameters"),
])
def test_bad_cluster_configs_are_refused_before_anything_is_submitted(digits, tmp_path,
                                                                      capsys, content, message):
    config = tmp_path / "cluster.yaml"
    config.write_text(content)
    with pytest.raises(SystemExit):
        sweep.main(_sweep_args(digits, tmp_path / "out", "--launcher", "submitit-local",
                               "--cluster-config", str(config)))
    err = capsys.readouterr().err
    assert message in err and ("gpus_per_nod" in err or "list" in err)
    with pytest.raises(SystemExit):
        sweep.main(_sweep_args(digits, tmp_path / "out", "--launcher", "slurm",
                               "--workers", "2"))
    assert "--devices and --workers are for --launcher local" in capsys.readouterr().err


def test_multinode_config_gives_lightning_the_slurm_world(monkeypatch):
    """configs/cluster/multinode.yaml under srun on 2 nodes x 4 tasks: Lightning takes the
    ranks from SLURM (rank 5 = node 1, local rank 1). CPU stands in for the GPUs here."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from wegeft_vision.cli import cli_main

    monkeypatch.chdir(REPO)
    # The DDP strategy sets the process-wide rank_zero_only.rank to this world's 5; restored at
    # teardown, or every later in-process run would skip rank-zero work (CSV logs, checkpoints).
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    slurm = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "5",
             "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "wegeft",
             "SLURM_NODELIST": "gpu[01-02]"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("sys.argv", ["wegeft-vision"])
    cli = cli_main(["--config=configs/demo.yaml", "--config=configs/cluster/multinode.yaml",
                    "--trainer.accelerator=cpu", "--data.init_args.num_workers=0"], run=False)
    trainer = cli.trainer
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 4, 8)
    assert (trainer.global_rank, trainer.node_rank, trainer.local_rank) == (5, 1, 1)
    assert cli.datamodule.batch_size == 4
