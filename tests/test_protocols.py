"""Protocols: records, grids, tables, plots, and the search -> final chain on tiny data."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import statistics
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from _data_helpers import make_fewshot, make_fgvc, make_vtab_task
from wegeft_vision.protocols import (PAPER_GRID, RunKey, RunRecord, expand_grid, fewshot_table,
                                     fgvc_table, parse_grid, ppt_score, read_record,
                                     read_results, resolve_task, vtab_table, write_record)
from wegeft_vision.protocols.report import write_summary
from wegeft_vision.protocols.summary import fewshot_csv

# The paper's groups, typed here from REFERENCE.md rather than read from the registry, so that
# the table's means are checked against an independent computation.
GROUPS = {
    "Natural": ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn",
                "sun397"],
    "Specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    "Structured": ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc",
                   "dsprites_ori", "smallnorb_azi", "smallnorb_ele"],
}
VTAB = [t for tasks in GROUPS.values() for t in tasks]
FGVC = ["CUB_200_2011", "nabirds", "OxfordFlowers", "StanfordDogs", "StanfordCars"]


def make_record(**fields) -> RunRecord:
    base = dict(benchmark="vtab", task="dtd", method="wegeft", phase="final", seed=0,
                hparams={"model.lr": 1e-3, "model.weight_decay": 0.0}, val_acc=0.5,
                test_acc=0.6, epochs=100, trainable_params=24_576,
                backbone_params=85_798_656, head_params=36_143, wall_time_s=12.5,
                peak_memory_mb=1024.0, memory_kind="cuda_max_allocated",
                finished_at="2026-01-01T00:00:00+00:00")
    base.update(fields)
    return RunRecord(**base)


# --- records ------------------------------------------------------------------------------

def test_record_round_trip_and_deterministic_path(tmp_path):
    record = make_record(shots=None, versions={"timm": "1.0"})
    path = write_record(tmp_path, record)
    assert path == tmp_path / record.key.relative_path()
    assert path.relative_to(tmp_path).parts[:4] == ("vtab", "wegeft", "dtd", "final")
    assert read_record(path) == record
    assert not list(path.parent.glob("*.tmp*"))  # the atomic write leaves no temporary file
    other = make_record(hparams={"model.weight_decay": 0.0, "model.lr": 1e-3})
    assert other.key == record.key  # hyperparameter order does not make another run


def test_corrupt_records_are_reported_and_skipped(tmp_path, caplog):
    good = [make_record(task=t) for t in ("dtd", "svhn")]
    for record in good:
        write_record(tmp_path, record)
    bad = tmp_path / "vtab" / "bad"
    bad.mkdir(parents=True)
    (bad / "truncated.json").write_text('{"benchmark": "vtab", "task": ')
    missing = make_record().to_dict()
    del missing["test_acc"]
    (bad / "missing.json").write_text(json.dumps(missing))
    (bad / "percent.json").write_text(json.dumps(make_record(test_acc=0.5).to_dict()
                                                 | {"test_acc": 61.2}))
    (bad / "list.json").write_text("[1, 2]")
    results = read_results(tmp_path)
    assert sorted(r.task for r in results.records) == ["dtd", "svhn"]
    assert len(results.problems) == 4
    text = "\n".join(results.problems)
    for name, reason in (("truncated.json", "Expecting value"),
                         ("missing.json", "missing field.s. test_acc"),
                         ("percent.json", r"test_acc must be a fraction in \[0, 1\]"),
                         ("list.json", "expected a JSON object")):
        assert any(name in p and re.search(reason, p) for p in results.problems), \
            (name, text)
    assert all(p.startswith("corrupt record") and p.endswith("skipped")
               for p in results.problems)
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 4
    with pytest.raises(ValueError, match=r"corrupt record .*truncated\.json"):
        read_record(bad / "truncated.json")


def test_duplicate_records_keep_the_newest_and_say_so(tmp_path):
    old = make_record(test_acc=0.40, finished_at="2026-01-01T00:00:00+00:00")
    new = make_record(test_acc=0.45, finished_at="2026-02-01T00:00:00+00:00")
    old_path = write_record(tmp_path / "machine_a", old)
    new_path = write_record(tmp_path / "machine_b", new)
    results = read_results(tmp_path / "machine_b", tmp_path / "machine_a")
    assert len(results.records) == 1 and results.records[0].test_acc == 0.45
    assert results.paths[new.key] == new_path
    (problem,) = results.problems
    assert problem.startswith("2 records for vtab/dtd wegeft final")
    assert f"using {new_path}" in problem and f"ignoring {old_path}" in problem


def test_read_results_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="results folder .*nowhere does not exist"):
        read_results(tmp_path / "nowhere")


# --- grids and task names -----------------------------------------------------------------

def test_grid_parsing_and_expansion():
    grid = parse_grid(["model.lr=1e-4,2.5e-3", "--model.weight_decay=0", "model.tag=a"])
    assert grid == {"model.lr": [1e-4, 2.5e-3], "model.weight_decay": [0], "model.tag": ["a"]}
    assert expand_grid({"a": [1, 2], "b": [3, 4]}) == [
        {"a": 1, "b": 3}, {"a": 1, "b": 4}, {"a": 2, "b": 3}, {"a": 2, "b": 4}]
    assert len(expand_grid(PAPER_GRID)) == 24


@pytest.mark.parametrize("specs, message", [
    (["model.lr="], "grid parameter 'model.lr' has no values"),
    (["model.lr=, ,"], "grid parameter 'model.lr' has no values"),
    ([], "the search grid has no parameters"),
    (["model.lr"], "grid entry 'model.lr' must look like"),
    (["model.lr=1", "model.lr=2"], "grid parameter 'model.lr' is given twice"),
    (["model.lr=1,1"], "grid parameter 'model.lr' repeats a value"),
])
def test_bad_grids(specs, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(specs)


def test_task_names_resolve_and_suggest(tmp_path):
    assert resolve_task("vtab", "cifar100").task == "cifar"
    assert resolve_task("fgvc", "cub").task == "CUB_200_2011"
    assert resolve_task("fewshot", "aircraft", shots=4).shots == 4
    with pytest.raises(ValueError, match=r"unknown VTAB-1k task 'eurosta' \(did you mean "
                                         r"'eurosat'\?\).*has no folder 'eurosta'"):
        resolve_task("vtab", "eurosta", data_root=tmp_path)
    with pytest.raises(ValueError, match=r"unknown benchmark 'vtab1k' \(did you mean 'vtab'"):
        resolve_task("vtab1k", "dtd")
    with pytest.raises(ValueError, match="shots must be given for few-shot tasks"):
        resolve_task("fewshot", "food101")
    (tmp_path / "digits").mkdir()
    assert resolve_task("vtab", "digits", data_root=tmp_path).task == "digits"


# --- tables -------------------------------------------------------------------------------

def _vtab_records(rng: np.random.Generator) -> tuple[list[RunRecord], dict]:
    """wegeft: all 19 tasks x 2 seeds; lora: 3 tasks x 1 seed; plus search runs to ignore."""
    accs = {"wegeft": {t: rng.uniform(0.2, 0.95, size=2) for t in VTAB},
            "lora": {t: rng.uniform(0.2, 0.95, size=1) for t in ("dtd", "eurosat", "kitti")}}
    records = []
    for method, tasks in accs.items():
        for task, values in tasks.items():
            for seed, acc in enumerate(values):
                records.append(make_record(method=method, task=task, seed=seed,
                                           test_acc=float(acc),
                                           trainable_params=24_576 if method == "wegeft"
                                           else 147_456))
            records.append(make_record(method=method, task=task, phase="search",
                                       test_acc=None, val_acc=0.99))
    return records, accs


def test_vtab_table_means_match_an_independent_computation():
    records, accs = _vtab_records(np.random.default_rng(0))
    table = vtab_table(records)
    rows = {row["Method"]: row for row in csv.DictReader(io.StringIO(table.to_csv()))}
    per_task = {t: 100 * np.mean(accs["wegeft"][t]) for t in VTAB}
    wegeft = rows["wegeft"]
    for task in VTAB:
        assert float(wegeft[task]) == pytest.approx(per_task[task], abs=1e-9)
    group_means = {g: np.mean([per_task[t] for t in tasks]) for g, tasks in GROUPS.items()}
    for group, mean in group_means.items():
        assert float(wegeft[group]) == pytest.approx(mean, abs=1e-9)
    overall = np.mean(list(per_task.values()))
    assert float(wegeft["Mean"]) == pytest.approx(overall, abs=1e-9)
    # The two definitions differ for these numbers, so the check above tells them apart.
    assert abs(overall - np.mean(list(group_means.values()))) > 0.05
    assert float(wegeft["Params (M)"]) == pytest.approx(0.024576)
    assert float(wegeft["Params (%)"]) == pytest.approx(100 * 24_576 / 85_798_656)
    assert float(wegeft["PPT"]) == pytest.approx(overall * math.exp(-math.log10(1.0024576)))

    lora = rows["lora"]
    lora_tasks = [100 * accs["lora"][t][0] for t in ("dtd", "eurosat", "kitti")]
    assert lora["cifar"] == ""
    assert [float(lora[g]) for g in GROUPS] == pytest.approx(lora_tasks)  # one task per group
    assert float(lora["Mean"]) == pytest.approx(np.mean(lora_tasks), abs=1e-9)
    markdown = table.to_markdown()
    assert f"| {np.mean(lora_tasks):.2f}* |" in markdown
    assert "lora: mean over 3 of 19 tasks" in markdown
    assert "wegeft: mean over" not in markdown


def test_ppt_score_against_a_hand_computed_value():
    # V-PETL's LoRA: 72.25 % with 0.29 M params -> 72.25 * exp(-log10(1.029)) = 71.359
    assert ppt_score(72.25, 0.29e6) == pytest.approx(71.3586, abs=1e-3)
    assert ppt_score(80.0, 0) == 80.0


def test_published_rows_sit_next_to_ours():
    records, _ = _vtab_records(np.random.default_rng(1))
    markdown = vtab_table(records, published=True).to_markdown()
    assert "| WeGeFT (published) |" in markdown and "| 74.09 |" in markdown
    fgvc = fgvc_table([make_record(benchmark="fgvc", task=d, test_acc=0.8) for d in FGVC],
                      published=True)
    rows = {row["Method"]: row for row in csv.DictReader(io.StringIO(fgvc.to_csv()))}
    assert float(rows["wegeft"]["Mean"]) == pytest.approx(80.0)
    assert float(rows["WeGeFT (published)"]["StanfordCars"]) == 84.28
    assert float(rows["WeGeFT (published)"]["Mean"]) == 89.39


def test_fewshot_table_mean_and_std_over_seeds():
    rng = np.random.default_rng(2)
    accs = {(d, k): rng.uniform(0.1, 0.9, size=3) for d in ("food101", "oxford_pets")
            for k in (1, 2, 4, 8, 16)}
    records = [make_record(benchmark="fewshot", task=d, shots=k, seed=s, test_acc=float(a))
               for (d, k), values in accs.items() for s, a in enumerate(values)]
    table = fewshot_table(records)
    markdown = table.to_markdown()
    values = 100 * accs[("oxford_pets", 4)]
    assert f"{values.mean():.2f} ± {values.std(ddof=1):.2f}" in markdown
    rows = list(csv.DictReader(io.StringIO(fewshot_csv(records))))
    assert len(rows) == 10
    row = next(r for r in rows if r["dataset"] == "food101" and r["shots"] == "16")
    values = 100 * accs[("food101", 16)]
    assert float(row["mean"]) == pytest.approx(values.mean())
    assert float(row["std"]) == pytest.approx(values.std(ddof=1))
    assert row["seeds"] == "3"


def _assert_png(path: Path) -> None:
    assert path.suffix == ".png" and path.stat().st_size > 1000
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"


def test_summary_files_from_synthetic_records(tmp_path):
    records, _ = _vtab_records(np.random.default_rng(3))
    records += [make_record(benchmark="fewshot", task="food101", shots=k, seed=s,
                            test_acc=0.1 * k / 16 + 0.05 * s) for k in (1, 4, 16) for s in (0, 1)]
    for record in records:
        write_record(tmp_path / "results" / "records", record)
    (tmp_path / "results" / "records" / "broken.json").write_text("{")
    written, results = write_summary([tmp_path / "results"], tmp_path / "summary")
    names = sorted(p.name for p in written)
    assert names == ["fewshot.csv", "fewshot_shots.png", "summary.md", "vtab.csv",
                     "vtab_params.png", "vtab_tasks.png"]
    for path in written:
        if path.suffix == ".png":
            _assert_png(path)
    summary = (tmp_path / "summary" / "summary.md").read_text()
    assert "### VTAB-1k top-1 accuracy (%)" in summary
    assert "### Few-shot FGVC" in summary
    assert "broken.json" in summary and len(results.problems) == 1


# --- the whole chain on tiny data ---------------------------------------------------------

TINY_CONFIG = """\
trainer:
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
model:
  backbone: vit_tiny_patch16_224
  pretrained: false
  backbone_kwargs: {img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}
  adapter:
    class_path: wegeft_vision.WeGeFTConfig
    init_args: {rank: 4, targets: [attn.proj]}
  drop_path_rate: 0.0
  warmup_epochs: 0
data:
  init_args:
    batch_size: 16
    image_size: 32
    mean: [0.5, 0.5, 0.5]
    std: [0.5, 0.5, 0.5]
    num_workers: 0
"""
# WeGeFT r=4 on attn.proj, one generator shared by both blocks: 2 * d_in * r = 2 * 32 * 4.
TINY_TRAINABLE = 256


def tiny_backbone_params() -> int:
    import timm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """VTAB-1k (search 2x1 -> 2 seeds), FGVC (search 2x1 -> 1 seed), few-shot (2 shots x 2
    seeds) on tiny data through the real training CLI, then the summary."""
    from wegeft_vision.protocols import runner, sweep
    from wegeft_vision.protocols.report import main as summarize

    base = tmp_path_factory.mktemp("chain")
    config = base / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    vtab_root, fgvc_root, fewshot_root = base / "vtab", base / "fgvc", base / "fewshot"
    for task, classes in (("eurosat", 10), ("kitti", 4)):
        labels = {"train800": 20, "val200": 10, "test": 10}
        make_vtab_task(vtab_root, task, {k: [i % classes for i in range(n)]
                                         for k, n in labels.items()}, size=(32, 32))
    make_fgvc(fgvc_root / "OxfordFlowers", ".", {
        "train": {f"jpg/image_{i:05d}.jpg": i + 1 for i in range(102)},
        "val": {f"jpg/image_{i:05d}.jpg": i % 102 + 1 for i in range(102, 112)},
        "test": {f"jpg/image_{i:05d}.jpg": i % 102 + 1 for i in range(112, 122)}})
    pets = list(range(37))
    make_fewshot(fewshot_root, "oxford_pets", "images", {
        **{f"train_meta.list.num_shot_{k}.seed_{s}": pets * k for k in (1, 2) for s in (0, 1)},
        "val_meta.list": pets[:8], "test_meta.list": pets[:12]})
    out = base / "results"
    common = ["--method", "wegeft", f"--config={config}", "--out", str(out),
              "--search-epochs", "1", "--final-epochs", "1"]
    # VTAB-1k through the run_protocol command line; `--` passes arguments to the training CLI.
    argv = ["--benchmark", "vtab", "--data-root", str(vtab_root), "--task", "eurosat",
            "--grid", "model.lr=1e-3,3e-2", "--grid", "model.weight_decay=0",
            "--seeds", "0,1", *common, "--", "--data.batch_size=10"]
    # As from a shell: sys.argv holds the protocol's own arguments while it calls the CLI.
    with mock.patch.object(sys, "argv", ["run_protocol.py", *argv]), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert runner.main(argv) == 0
    fgvc = runner.ProtocolRunner(out, fgvc_root, "fgvc", "wegeft", configs=[config],
                                 grid={"model.lr": [1e-3, 3e-2], "model.weight_decay": [0.0]},
                                 search_epochs=1, final_epochs=1)
    fgvc_result = fgvc.run(runner.resolve_task("fgvc", "flowers"))
    assert sweep.main(["--benchmark", "fewshot", "--data-root", str(fewshot_root),
                       "--tasks", "oxford_pets", "--shots", "1,2", "--seeds", "0,1",
                       *common]) == 0
    assert summarize([str(out), "--published"]) == 0
    return {"out": out, "vtab_root": vtab_root, "config": config, "fgvc": fgvc,
            "fgvc_result": fgvc_result, "common": common,
            "warnings": [str(w.message) for w in caught]}


def test_chain_search_picks_the_best_and_final_runs_use_it(chain):
    results = read_results(chain["out"] / "records")
    assert results.problems == []
    vtab = [r for r in results.records if r.benchmark == "vtab"]
    search = sorted((r for r in vtab if r.phase == "search"), key=lambda r: r.hparams["model.lr"])
    final = sorted((r for r in vtab if r.phase == "final"), key=lambda r: r.seed)
    assert [r.hparams for r in search] == [{"model.lr": 1e-3, "model.weight_decay": 0},
                                           {"model.lr": 3e-2, "model.weight_decay": 0}]
    # Highest val accuracy wins; a tie goes to the first grid point (lr 1e-3).
    best = search[1] if search[1].val_acc > search[0].val_acc else search[0]
    assert [r.seed for r in final] == [0, 1]
    assert all(r.hparams == best.hparams and r.task == "eurosat" for r in final)
    backbone = tiny_backbone_params()
    for record in vtab:
        accuracy = record.val_acc if record.phase == "search" else record.test_acc
        assert record.epochs == 1 and 0.0 <= accuracy <= 1.0
        assert record.trainable_params == TINY_TRAINABLE and record.backbone_params == backbone
        assert record.head_params == 32 * 10 + 10
        assert record.adapter["class_path"].endswith(".WeGeFTConfig")
        assert record.adapter["init_args"]["rank"] == 4
        assert record.versions["timm"] and record.versions["torch"]
        assert record.memory_kind == "process_peak_rss" and record.peak_memory_mb > 10
        assert record.wall_time_s > 0 and record.config_digest
        assert "--data.batch_size=10" in record.cli_args
    assert all(r.test_acc is None for r in search) and all(r.test_acc is not None for r in final)
    # By default only final runs keep their checkpoints.
    runs = chain["out"] / "runs" / "vtab" / "wegeft" / "eurosat"
    assert not list((runs / "search").rglob("*.ckpt"))
    assert len({p.parent.parent for p in (runs / "final").rglob("*.ckpt")}) == 2
    fgvc = chain["fgvc_result"]
    assert len(fgvc.search) == 2 and len(fgvc.final) == 1 and fgvc.executed == 3
    assert fgvc.final[0].task == "OxfordFlowers" and fgvc.final[0].head_params == 32 * 102 + 102
    fewshot = sorted((r.shots, r.seed) for r in results.records if r.benchmark == "fewshot")
    assert fewshot == [(1, 0), (1, 1), (2, 0), (2, 1)]


def test_chain_runs_do_not_warn_about_args_and_command_line(chain):
    assert len(chain["warnings"]) > 0  # warnings were recorded at all
    assert not [w for w in chain["warnings"] if "not recommended to provide both" in w]


def test_chain_rerun_does_no_work(chain, monkeypatch):
    from wegeft_vision import cli
    from wegeft_vision.protocols import runner

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(cli, "cli_main", no_training)
    records = sorted((chain["out"] / "records").rglob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in records}
    assert chain["fgvc"].run(runner.resolve_task("fgvc", "OxfordFlowers")).executed == 0
    assert runner.main(["--benchmark", "vtab", "--data-root", str(chain["vtab_root"]),
                        "--task", "eurosat", "--grid", "model.lr=1e-3,3e-2",
                        "--grid", "model.weight_decay=0", "--seeds", "0,1", *chain["common"],
                        "--", "--data.batch_size=10"]) == 0
    assert {p: p.stat().st_mtime_ns for p in records} == before


def test_chain_reruns_a_corrupt_record_only(chain, caplog):
    from wegeft_vision.protocols import runner

    fgvc = chain["fgvc"]
    final = RunKey.make("fgvc", "OxfordFlowers", "wegeft", "final", 0, chain["fgvc_result"].best)
    path = fgvc.records_dir / final.relative_path()
    expected = read_record(path)
    path.write_text(path.read_text()[:40])  # as if the disk filled up mid-write
    calls = []

    def counting(spec):
        calls.append(spec.key)
        return runner.cli_executor(spec)

    fgvc.executor = counting
    result = fgvc.run(runner.resolve_task("fgvc", "OxfordFlowers"))
    assert calls == [final] and result.executed == 1
    assert "running it again" in caplog.text and str(path) in caplog.text
    again = read_record(path)
    assert again.hparams == expected.hparams and again.finished_at > expected.finished_at


def test_chain_tables_and_plots(chain):
    summary_dir = chain["out"] / "summary"
    records = read_results(chain["out"] / "records").records
    finals = {(r.benchmark, r.task): [] for r in records if r.phase == "final"}
    for r in records:
        if r.phase == "final":
            finals[(r.benchmark, r.task)].append(100 * r.test_acc)
    rows = {row["Method"]: row for row in csv.DictReader((summary_dir / "vtab.csv").open())}
    eurosat = statistics.fmean(finals[("vtab", "eurosat")])
    assert float(rows["wegeft"]["eurosat"]) == pytest.approx(eurosat)
    # One Specialized task done: the group mean and the overall mean are that task's accuracy.
    assert float(rows["wegeft"]["Specialized"]) == pytest.approx(eurosat)
    assert float(rows["wegeft"]["Mean"]) == pytest.approx(eurosat)
    assert rows["wegeft"]["Natural"] == ""
    assert float(rows["wegeft"]["Params (%)"]) == pytest.approx(
        100 * TINY_TRAINABLE / tiny_backbone_params())
    assert "WeGeFT (published)" in rows
    fgvc_rows = {row["Method"]: row for row in csv.DictReader((summary_dir / "fgvc.csv").open())}
    assert float(fgvc_rows["wegeft"]["OxfordFlowers"]) == pytest.approx(
        finals[("fgvc", "OxfordFlowers")][0])
    fewshot = list(csv.DictReader((summary_dir / "fewshot.csv").open()))
    assert [(r["dataset"], r["shots"], r["seeds"]) for r in fewshot] == [
        ("oxford_pets", "1", "2"), ("oxford_pets", "2", "2")]
    summary = (summary_dir / "summary.md").read_text()
    assert "wegeft: mean over 1 of 19 tasks" in summary
    for name in ("vtab_tasks", "vtab_params", "fgvc_tasks", "fgvc_params", "fewshot_shots"):
        _assert_png(summary_dir / f"{name}.png")


def test_sweep_pins_each_process_to_a_device(chain, tmp_path):
    from wegeft_vision.protocols import sweep

    out = tmp_path / "sweep"
    args = ["--benchmark", "vtab", "--data-root", str(chain["vtab_root"]), "--method", "probe",
            f"--config={chain['config']}", "--out", str(out), "--tasks", "eurosat,kitti",
            "--no-search", "--final-epochs", "1", "--devices", "7,9",
            "--", "--model.adapter=wegeft_vision.LinearProbeConfig"]
    assert sweep.main(args) == 0
    finals = read_results(out / "records").records
    assert sorted((r.task, r.head_params) for r in finals) == [("eurosat", 32 * 10 + 10),
                                                                ("kitti", 32 * 4 + 4)]
    assert all(r.trainable_params == 0 and r.hparams == {} for r in finals)
    logs = sorted((out / "logs").glob("*.log"))
    assert [p.name for p in logs] == ["vtab_probe_eurosat.log", "vtab_probe_kitti.log"]
    devices = {line.rsplit("=", 1)[1] for p in logs for line in p.read_text().splitlines()
               if "CUDA_VISIBLE_DEVICES=" in line}
    assert devices == {"7", "9"}


def test_runner_rejects_bad_input_before_training(chain, tmp_path, capsys):
    from wegeft_vision.protocols import runner

    def make(**kwargs):
        args = dict(out_dir=tmp_path, data_root=chain["vtab_root"], benchmark="vtab",
                    method="wegeft", configs=[chain["config"]])
        return runner.ProtocolRunner(**(args | kwargs))

    with pytest.raises(ValueError, match="override '--model.lr=1' sets 'model.lr', which the "
                                         "search grid varies"):
        make(grid={"model.lr": [1e-3]}, overrides=["--model.lr=1"])
    with pytest.raises(ValueError, match="'trainer.max_epochs', which the protocol controls"):
        make(overrides=["--trainer.max_epochs=3"])
    with pytest.raises(ValueError, match="grid parameter 'model.lr' has no values"):
        make(grid={"model.lr": []})
    with pytest.raises(FileNotFoundError, match="config file .*missing.yaml does not exist"):
        make(configs=[tmp_path / "missing.yaml"])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        make(seeds=[0, 0])
    with pytest.raises(SystemExit):
        runner.main(["--benchmark", "vtab", "--data-root", str(chain["vtab_root"]),
                     "--task", "eurosta", "--method", "wegeft", "--out", str(tmp_path)])
    assert "unknown VTAB-1k task 'eurosta' (did you mean 'eurosat'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main(["--benchmark", "vtab", "--data-root", str(chain["vtab_root"]),
                     "--task", "eurosat", "--method", "wegeft", "--out", str(tmp_path),
                     "--grid", "model.lr="])
    assert "grid parameter 'model.lr' has no values" in capsys.readouterr().err


# --- record identity: settings that change the result make other runs ------------------------

def _fake_cli(calls: list):
    """Stands in for the training CLI: records each command line; accuracies follow the lr."""
    from types import SimpleNamespace

    import torch

    from wegeft_vision.adapters.model import ParameterCount

    def cli_main(args):
        calls.append(args)
        value = dict(a[2:].split("=", 1) for a in args[1:] if a.startswith("--") and "=" in a)
        acc = torch.tensor(min(0.9, 10 * float(value.get("model.lr", 0.01))))
        model = SimpleNamespace(parameter_count=lambda: ParameterCount(256, 330, 60_000, 60_586),
                                adapter_config=SimpleNamespace(to_dict=lambda: {"rank": 4}))
        trainer = SimpleNamespace(callback_metrics={"val/acc": acc, "test/acc": acc / 2},
                                  current_epoch=int(value["trainer.max_epochs"]))
        return SimpleNamespace(trainer=trainer, model=model)
    return cli_main


def test_changed_settings_make_new_runs_and_identical_ones_none(tmp_path, monkeypatch, caplog):
    import shutil

    from wegeft_vision import cli
    from wegeft_vision.protocols import runner

    calls: list = []
    monkeypatch.setattr(cli, "cli_main", _fake_cli(calls))
    root = tmp_path / "vtab"
    make_vtab_task(root, "eurosat", {"train800": [0, 1], "val200": [0, 1], "test": [1, 0]})
    config, weights = tmp_path / "tiny.yaml", tmp_path / "backbone.safetensors"
    config.write_text(TINY_CONFIG)
    weights.write_bytes(b"weights v1")
    out = tmp_path / "results"

    def run(*extra, data_root=root, overrides=()):
        calls.clear()
        argv = ["--benchmark", "vtab", "--data-root", str(data_root), "--task", "eurosat",
                "--method", "wegeft", f"--config={config}", "--out", str(out),
                "--grid", "model.lr=1e-3,3e-2", "--grid", "model.weight_decay=0",
                "--search-epochs", "1", "--final-epochs", "1", *extra,
                "--", f"--model.weights_path={weights}", *overrides]
        assert runner.main(argv) == 0
        return sorted(("search" if "--test_after_fit=false" in a else "final",
                       next(x for x in a if x.startswith("--trainer.max_epochs")))
                      for a in calls)

    assert len(run()) == 3  # 2 search runs, 1 final run
    assert run() == []  # identical settings: nothing to do
    assert run("--search-epochs", "2") == [
        ("search", "--trainer.max_epochs=2")] * 2  # the same best: the final run stands
    assert "other settings (epochs 1 -> 2)" in caplog.text
    assert run("--search-epochs", "2", "--final-epochs", "3") == [
        ("final", "--trainer.max_epochs=3")]
    base = ("--search-epochs", "2", "--final-epochs", "3")
    assert run(*base) == []
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert len(run(*base, data_root=copy)) == 3  # another data root
    assert len(run(*base)) == 3  # and back: the records name the copy's root now
    caplog.clear()
    with open(root / "eurosat" / "test.txt", "a") as f:  # a list file's content: test only
        f.write("images/test/000000.jpg 0\n")
    assert [c[0] for c in run(*base)] == ["final"]
    assert "data.files.eurosat/test.txt" in caplog.text
    assert len(run(*base, overrides=["--data.batch_size=4"])) == 3  # passed-through arguments
    config.write_text(TINY_CONFIG.replace("drop_path_rate: 0.0", "drop_path_rate: 0.1"))
    assert len(run(*base, overrides=["--data.batch_size=4"])) == 3  # config content
    weights.write_bytes(b"weights v2")
    assert len(run(*base, overrides=["--data.batch_size=4"])) == 3  # weights file content
    assert run(*base, overrides=["--data.batch_size=4"]) == []
    record = read_results(out / "records").records[0]
    assert record.settings["weights"] == {"path": str(weights.resolve()),
                                          "sha256": hashlib.sha256(b"weights v2").hexdigest()}
    assert record.settings["data"]["root"] == str(root.resolve())


def test_records_without_settings_are_stale_and_rerun(tmp_path, monkeypatch, caplog):
    from wegeft_vision import cli
    from wegeft_vision.protocols import runner

    calls: list = []
    monkeypatch.setattr(cli, "cli_main", _fake_cli(calls))
    root = tmp_path / "vtab"
    make_vtab_task(root, "eurosat", {"train800": [0, 1], "val200": [0, 1], "test": [1, 0]})
    protocol = runner.ProtocolRunner(tmp_path / "out", root, "vtab", "wegeft", final_epochs=1)
    task = runner.resolve_task("vtab", "eurosat")
    key = RunKey.make("vtab", "eurosat", "wegeft", "final", 0, {})
    old = make_record(task="eurosat", hparams={}, epochs=1)  # as written before settings
    path = write_record(protocol.records_dir, old)
    assert protocol.run(task).executed == 1 and len(calls) == 1
    assert f"record {path} is stale: it predates records that name their settings" in caplog.text
    assert read_record(path).settings_digest and read_record(path).key == key


def test_summary_flags_means_over_different_settings():
    def settings(epochs):
        return {"epochs": epochs, "configs": [{"path": "a.yaml", "sha256": "c0"}],
                "overrides": [], "backbone": "vit", "weights": None,
                "data": {"root": "/data", "args": {}, "files": {}}}

    same = [make_record(task=t, seed=s, test_acc=0.5 + 0.1 * s, settings=settings(100),
                        settings_digest=f"{t}{s}") for t in ("dtd", "svhn") for s in (0, 1)]
    markdown = vtab_table(same).to_markdown()
    assert "†" not in markdown and "different settings" not in markdown
    assert [r["Settings"] for r in csv.DictReader(io.StringIO(vtab_table(same).to_csv()))] == ["1"]
    mixed = same[:3] + [make_record(task="svhn", seed=1, test_acc=0.6, settings=settings(1),
                                    settings_digest="x")]
    table = vtab_table(mixed)
    markdown = table.to_markdown()
    row = next(line for line in markdown.splitlines() if line.startswith("| wegeft |"))
    assert "| 55.00 |" in row and "| 55.00† |" in row  # dtd as is; svhn flagged
    # Seed order: seed 0 ran 100 epochs, seed 1 one epoch.
    assert "wegeft: svhn averages seeds run with 2 different settings (epochs 100 -> 1)" in markdown
    assert "wegeft: Natural mean averages runs with 2 different settings" in markdown
    assert "wegeft: mean averages runs with 2 different settings" in markdown
    assert "wegeft: Specialized" not in markdown
    assert [r["Settings"] for r in csv.DictReader(io.StringIO(table.to_csv()))] == ["2"]
    # An older record without settings does not pass for the same settings either.
    old = same[:3] + [make_record(task="svhn", seed=1, test_acc=0.6)]
    assert "not recorded (an older record)" in vtab_table(old).to_markdown()
    fewshot = [make_record(benchmark="fewshot", task="food101", shots=1, seed=s, test_acc=0.5,
                           settings=settings(100 if s else 1)) for s in (0, 1)]
    assert "50.00 ± 0.00 (n=2)† |" in fewshot_table(fewshot).to_markdown()
    assert list(csv.DictReader(io.StringIO(fewshot_csv(fewshot))))[0]["settings"] == "2"


def test_fewshot_one_seed_has_no_std_in_markdown_nor_csv():
    records = [make_record(benchmark="fewshot", task="food101", shots=2, seed=0, test_acc=0.6)]
    markdown = fewshot_table(records).to_markdown()
    row = next(line for line in markdown.splitlines() if line.startswith("| wegeft |"))
    assert "| 60.00 (n=1) |" in row and "±" not in row
    (row,) = csv.DictReader(io.StringIO(fewshot_csv(records)))
    assert row["std"] == "" and float(row["mean"]) == pytest.approx(60.0)
