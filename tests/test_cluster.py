"""Protocols on a cluster: submitit jobs (local subprocesses here, the code SLURM runs), the
requeue after a preemption, the sbatch scripts, a Lightning checkpoint resume, processes
sharing one results folder (claims), and the multi-node Lightning config."""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

pytest.importorskip("submitit")

from wegeft_vision.errors import UserError  # noqa: E402
from wegeft_vision.protocols import cluster, resolve_task, runner  # noqa: E402
from wegeft_vision.protocols.claims import read_claim, try_claim  # noqa: E402
from wegeft_vision.protocols.commands import sweep_command  # noqa: E402
from wegeft_vision.protocols.records import read_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "data" / "digits_vtab" / "digits"
# A few batches of the demo's digits through the demo config's pretrained tiny ViT.
FAST = {"data.init_args.num_classes": 5, "data.init_args.num_workers": 0,
        "trainer.limit_train_batches": 2, "trainer.limit_val_batches": 2,
        "trainer.limit_test_batches": 2, "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False}


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


def _sweep_args(root: Path, out: Path, *extra: str, lrs: str = "0.01") -> list[str]:
    return ["--benchmark", "vtab", "--data_root", str(root), "--method", "wegeft",
            "--configs+", "configs/demo.yaml", "--out", str(out), "--tasks", "[digits, digits_b]",
            "--grid", f"{{model.lr: [{lrs}], model.weight_decay: [0]}}", "--search_epochs", "1",
            "--final_epochs", "1", "--overrides", json.dumps(FAST), *extra]


def _by_key(out: Path) -> dict:
    results = read_results(out / "records")
    assert results.problems == []
    return {r.key: r for r in results.records}


def test_submitit_local_sweep_gives_the_local_launchers_records(digits, tmp_path):
    assert sweep_command(_sweep_args(digits, tmp_path / "local")) == 0
    assert sweep_command(_sweep_args(digits, tmp_path / "jobs", "--launcher", "submitit-local",
                                     "--time_min", "10")) == 0
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
    return runner.train_run(spec)


def test_preempted_job_is_requeued_and_redoes_no_finished_run(digits, tmp_path):
    out = tmp_path / "out"
    marker = out / "preempted"
    protocol = runner.ProtocolRunner(
        out, digits, "vtab", "wegeft", configs=[REPO / "configs/demo.yaml"], overrides=FAST,
        grid={"model.lr": [0.01], "model.weight_decay": [0.0]}, search_epochs=1,
        final_epochs=1, executor=functools.partial(preempt_before_second_run, marker))
    task = resolve_task("vtab", "digits", data_root=digits)
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
    specs, kill = [], [True]

    def killed_once(spec):
        specs.append((spec.resume_from, spec.epochs))
        if kill:
            kill.clear()
            cli = spec.build()
            cli.trainer.callbacks.append(FailInSecondEpoch())
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return runner.train_run(spec)

    protocol = runner.ProtocolRunner(tmp_path / "out", digits, "vtab", "wegeft",
                                     configs=[REPO / "configs/demo.yaml"], overrides=FAST,
                                     search=False, final_epochs=2, executor=killed_once)
    task = resolve_task("vtab", "digits", data_root=digits)
    with pytest.raises(RuntimeError, match="killed in epoch 2"):
        protocol.run(task)
    spec = protocol.spec(task, "final", {}, 0)
    last = spec.run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and runner.checkpoint_epoch(last) == 0
    assert not list((tmp_path / "out" / "claims").rglob("*.claim"))  # released on the error
    result = protocol.run(task)
    assert result.executed == 1 and specs == [(None, 2), (last, 2)]
    assert result.final[0].epochs == 2
    # Other settings must not resume that checkpoint: the run folder starts afresh.
    specs.clear()
    other = runner.ProtocolRunner(tmp_path / "out", digits, "vtab", "wegeft",
                                  configs=[REPO / "configs/demo.yaml"], overrides=FAST,
                                  search=False, final_epochs=3, executor=killed_once)
    assert other.run(task).final[0].epochs == 3
    assert specs == [(None, 3)]


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
    args = _sweep_args(digits, tmp_path / "out", "--launcher", "slurm", "--cluster_config",
                       str(config), "--partition", "a100", "--mem_gb", "48",
                       "--array_parallelism", "3", "--jobs_per", "run", lrs="0.01, 0.02")
    assert sweep_command(args) == 0
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
    ("gpus_per_nod: 1\n", "submitit refused the job parameters.*gpus_per_nod"),
])
def test_bad_cluster_configs_are_refused_before_anything_is_submitted(digits, tmp_path,
                                                                      content, message):
    config = tmp_path / "cluster.yaml"
    config.write_text(content)
    with pytest.raises(UserError, match=message):
        sweep_command(_sweep_args(digits, tmp_path / "out", "--launcher", "submitit-local",
                                  "--cluster_config", str(config)))
    with pytest.raises(UserError, match="--devices and --workers are for --launcher local"):
        sweep_command(_sweep_args(digits, tmp_path / "out", "--launcher", "slurm",
                                  "--workers", "2"))
    assert not (tmp_path / "out" / "records").exists()


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


# --- processes sharing one results folder: claims ---------------------------------------------

PROTOCOL = ("import sys; from wegeft_vision.protocols.commands import protocol_command; "
            "sys.exit(protocol_command(sys.argv[1:]))")


def test_two_processes_on_one_folder_train_each_run_once(digits, tmp_path):
    """Two protocol processes started together on one --out (a user starting twice, SLURM array
    tasks sharing a folder): every run is trained by one of them, none crashes, and no run
    folder holds a second run's files."""
    out = tmp_path / "out"
    args = ["--benchmark", "vtab", "--data_root", str(digits), "--task", "digits",
            "--method", "wegeft", "--configs+", "configs/demo.yaml", "--out", str(out),
            "--grid", "{model.lr: [0.01, 0.02, 0.03], model.weight_decay: [0]}",
            "--search_epochs", "1", "--final_epochs", "2", "--poll_s", "0.2",
            "--overrides", json.dumps({**FAST, "trainer.limit_train_batches": 4})]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"process{i}.log" for i in (0, 1)]
    processes = []
    for log in logs:
        with open(log, "w") as f:
            processes.append(subprocess.Popen([sys.executable, "-c", PROTOCOL, *args],
                                              stdout=f, stderr=subprocess.STDOUT, env=env))
    codes = [p.wait(timeout=600) for p in processes]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], texts
    trained = [line for text in texts for line in text.splitlines()
               if "wegeft_vision.protocols" not in line and " running vtab/digits" in line]
    assert len(trained) == 4, trained  # 3 search runs + 1 final run, each once
    assert sum(int(text.rsplit("; ", 1)[1].split()[0]) for text in texts) == 4
    records = read_results(out / "records")
    assert records.problems == [] and len(records.records) == 4
    for run_dir in {p.parent for p in (out / "runs").rglob("settings.json")}:
        assert [p.name for p in (run_dir / "logs").iterdir()] == ["version_0"], run_dir
        assert not [p for p in run_dir.rglob("*.ckpt") if p.name != "last.ckpt"]
    assert not list((out / "claims").rglob("*.claim"))


def _claim_file(path: Path, pid: int, host: str, age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host, "started": time.time() - age_s,
                                "token": "theirs"}))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("holder, reason", [
    (lambda: (_dead_pid(), socket.gethostname(), 0.0), "is gone"),
    (lambda: (1, "another-host", 3600.0), "no heartbeat for 3600 s"),
    (lambda: (os.getpid(), socket.gethostname(), 0.0), "earlier process with this pid"),
])
def test_a_stale_claim_is_taken_over(tmp_path, caplog, holder, reason):
    path = _claim_file(tmp_path / "run.claim", *holder())
    claim, seen = try_claim(path, timeout_s=600)
    assert claim is not None and seen is None
    assert reason in caplog.text and "taking over the stale claim" in caplog.text
    assert read_claim(path).pid == os.getpid() and read_claim(path).token != "theirs"
    claim.release()
    assert not path.exists()


@pytest.mark.parametrize("holder", [
    lambda: (os.getppid(), socket.gethostname(), 0.0),  # a live process on this host
    lambda: (1, "another-host", 5.0),  # another host, heartbeat within the timeout
])
def test_a_live_claim_is_respected(tmp_path, holder):
    path = _claim_file(tmp_path / "run.claim", *holder())
    claim, seen = try_claim(path, timeout_s=600)
    assert claim is None and seen.token == "theirs"
    assert read_claim(path).token == "theirs"


def test_the_heartbeat_keeps_a_claim_fresh(tmp_path):
    path = tmp_path / "run.claim"
    claim, _ = try_claim(path, timeout_s=600, heartbeat_s=0.05)
    old = time.time() - 3600
    os.utime(path, (old, old))
    deadline = time.time() + 30
    while path.stat().st_mtime == old and time.time() < deadline:
        time.sleep(0.05)
    assert path.stat().st_mtime > old
    claim.release()


def test_runs_held_by_another_process_are_waited_for(digits, tmp_path):
    """A run another process holds is not trained here: the runner trains the others, then
    takes that run's record when it appears (or the run itself, had the holder died)."""
    from wegeft_vision.adapters.model import ParameterCount

    calls: dict[str, list] = {"here": [], "there": []}

    def fake(where):
        def execute(spec):
            calls[where].append(spec.key.hparams)
            if where == "here":  # meanwhile the other process finishes its run
                other.run_all([held])
            return runner.RunOutcome(val_acc=0.5, test_acc=0.5, epochs=spec.epochs,
                                     params=ParameterCount(1, 1, 10, 12))
        return execute

    def make(where):
        return runner.ProtocolRunner(tmp_path / "out", digits, "vtab", "wegeft",
                                     configs=[REPO / "configs/demo.yaml"], overrides=FAST,
                                     grid={"model.lr": [0.01, 0.02]}, final_epochs=1,
                                     poll_s=0.01, executor=fake(where))

    here, other = make("here"), make("there")
    task = resolve_task("vtab", "digits", data_root=digits)
    held = here.spec(task, "search", {"model.lr": 0.01}, 0)
    claim, _ = try_claim(here.claim_path(held.key))
    original = other.run_all

    def release_then_run(specs):
        claim.release()
        return original(specs)

    other.run_all = release_then_run
    result = here.run(task)
    assert calls["there"] == [(("model.lr", 0.01),)]
    # Here: the free search run, then (a tie goes to the first point) the final run.
    assert calls["here"] == [(("model.lr", 0.02),), (("model.lr", 0.01),)]
    assert [r.hparams for r in result.search] == [{"model.lr": 0.01}, {"model.lr": 0.02}]
    assert result.executed == 2
