"""The ``wegeft-vision`` CLI end to end: fit -> test -> predict -> export -> plain timm, DDP, and
the errors bad input gets."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.training import fit_toy_run, make_toy_task
from wegeft_vision.cli import cli_main, main
from wegeft_vision.data import FGVC_DATASETS, VTAB_TASKS
from wegeft_vision.errors import RunFolderInUseError, UserError
from wegeft_vision.training import ViTClassifier

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One fit (2 epochs) that tests its final weights, shared by the tests below."""
    root = tmp_path_factory.mktemp("cli")
    make_toy_task(root / "data", task="toy_odd", extra_test=1)
    return fit_toy_run(root)


def toy_test_split(run: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split as the datamodule serves it: (images, labels)."""
    datamodule = run["cli"].datamodule
    batches = list(datamodule.test_dataloader())
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_fit_logs_metrics_and_test_accuracy_is_right(run: dict) -> None:
    metrics = run["metrics"]
    for name in ("train/loss", "val/acc", "val/acc_top5", "val/loss", "test/acc",
                 "test/acc_top5", "test/loss"):
        assert name in metrics, name
    images, labels = toy_test_split(run)
    model = ViTClassifier.from_checkpoint(run["ckpt"])
    with torch.no_grad():
        logits = model(images)
    assert metrics["test/acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert metrics["test/acc_top5"] == pytest.approx(top5)
    assert (run["ckpt"].parent.parent / "config.yaml").is_file()
    assert run["ckpt"].name == "last.ckpt"


def test_test_and_validate_load_the_checkpoint(run: dict) -> None:
    cli = cli_main(["test", "--config", str(run["config"]), "--ckpt_path", str(run["ckpt"])])
    assert float(cli.trainer.callback_metrics["test/acc"]) == pytest.approx(
        run["metrics"]["test/acc"])
    cli = cli_main(["validate", "--config", str(run["config"]), "--ckpt_path", str(run["ckpt"])])
    assert float(cli.trainer.callback_metrics["val/acc"]) == pytest.approx(
        run["metrics"]["val/acc"])


def test_export_predicts_like_the_lightning_model_in_plain_timm(run: dict,
                                                                tmp_path: Path) -> None:
    cli = cli_main(["predict", "--config", str(run["config"]), "--ckpt_path", str(run["ckpt"])])
    with open(Path(cli.trainer.log_dir) / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    images, labels = toy_test_split(run)
    assert [int(r["index"]) for r in rows] == list(range(len(labels)))
    assert [int(r["label"]) for r in rows] == labels.tolist()
    lightning_probs = torch.tensor([[float(r[f"p{c}"]) for c in range(6)] for r in rows])

    out = tmp_path / "export"
    assert cli_main(["export", "--ckpt_path", str(run["ckpt"]), "--output_dir", str(out)]) is None
    torch.save(images, tmp_path / "images.pt")
    script = textwrap.dedent(f"""
        import json, sys
        import timm, torch
        out = {str(out)!r}
        cfg = json.load(open(out + "/config.json"))
        args = {{k: v for k, v in cfg["model_args"].items() if k != "num_classes"}}
        named = timm.create_model(cfg["architecture"], pretrained=True,
                                  num_classes=cfg["num_classes"], **args,
                                  pretrained_cfg_overlay=dict(file=out + "/model.safetensors",
                                                              num_classes=cfg["num_classes"],
                                                              custom_load=False))
        local = timm.create_model("local-dir:" + out, pretrained=True)
        assert not any(m.startswith("wegeft_vision") for m in sys.modules)
        images = torch.load({str(tmp_path / "images.pt")!r})
        with torch.no_grad():
            probs = [m.eval()(images).softmax(-1) for m in (named, local)]
        data = timm.data.resolve_data_config({{}}, model=local)
        torch.save({{"named": probs[0], "local": probs[1], "mean": data["mean"]}},
                   {str(tmp_path / "timm.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env=ENV, cwd=tmp_path)
    result = torch.load(tmp_path / "timm.pt")
    for key in ("named", "local"):
        assert torch.equal(result[key].argmax(1), lightning_probs.argmax(1))
        torch.testing.assert_close(result[key], lightning_probs, rtol=1e-4, atol=1e-5)
    assert tuple(result["mean"]) == (0.5, 0.5, 0.5)
    with pytest.raises(FileExistsError, match=r"model.safetensors.* already exist; pass "
                                              r"overwrite=True"):
        cli_main(["export", "--ckpt_path", str(run["ckpt"]), "--output_dir", str(out)])


@pytest.mark.parametrize("task", ["toy", "toy_odd"])
def test_ddp_test_accuracy_equals_single_process(run: dict, tmp_path: Path, task: str) -> None:
    args = ["test", "--config", str(run["config"]), "--ckpt_path", str(run["ckpt"]),
            "--data.init_args.task", task, "--trainer.logger.init_args.save_dir", str(tmp_path)]
    single = cli_main([*args, "--trainer.logger.init_args.name", "single"]).trainer
    command = [sys.executable, "-m", "wegeft_vision.cli", *args, "--trainer.strategy", "ddp",
               "--trainer.devices", "2"]
    result = subprocess.run(command, env={**ENV, "OMP_WAIT_POLICY": "PASSIVE"}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    assert "terminate called" not in result.stderr  # a rank aborting at exit
    [metrics_file] = tmp_path.glob("toy/version_*/metrics.csv")
    with open(metrics_file) as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("test/acc")]
    expected = {k: float(v) for k, v in single.callback_metrics.items()}
    assert float(logged[-1]["test/acc"]) == pytest.approx(expected["test/acc"], abs=1e-7)
    assert float(logged[-1]["test/loss"]) == pytest.approx(expected["test/loss"], rel=1e-5)


# Bad input: clear errors before any training step.
def test_unknown_config_key_is_rejected(run: dict, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(run["config"]), "--model.learning_rate", "0.1"])
    assert "learning_rate" in capsys.readouterr().err


def test_unknown_backbone_suggests_names(run: dict) -> None:
    with pytest.raises(ValueError, match=r"unknown timm backbone 'vit_tiny_patch16_2244'.*"
                                         r"did you mean .*vit_tiny_patch16_224"):
        cli_main(["fit", "--config", str(run["config"]),
                  "--model.backbone", "vit_tiny_patch16_2244"])


def test_missing_data_root_fails_before_training(run: dict, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_root"
    with pytest.raises(FileNotFoundError, match=r"no_such_root"):
        cli_main(["fit", "--config", str(run["config"]), "--data.init_args.root", str(missing),
                  "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    assert not list(tmp_path.glob("logs/**/*.ckpt"))


def test_checkpoint_for_another_class_count_is_refused(run: dict) -> None:
    with pytest.raises(ValueError, match=r"checkpoint .*last.ckpt was trained with "
                                         r"num_classes=6, but this model has num_classes=7"):
        cli_main(["test", "--config", str(run["config"]), "--ckpt_path", str(run["ckpt"]),
                  "--data.init_args.num_classes", "7"])


def test_adapter_is_chosen_by_class_path(run: dict) -> None:
    lora = '{"class_path": "wegeft_vision.LoRAConfig", "init_args": {"rank": 2}}'
    cli = cli_main(["--config", str(run["config"]), "--model.adapter", lora], run=False)
    assert type(cli.model.adapter_config).__name__ == "LoRAConfig"
    assert cli.model.adapter_config.rank == 2 and cli.model.num_classes == 6
    assert cli.datamodule.data_config.mean == (0.5, 0.5, 0.5)
    exported = json.loads(json.dumps(cli.model.hparams["adapter"]))
    assert exported["class_path"].endswith("LoRAConfig")


# The shipped configs.
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def printed_config(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("benchmark, folder, key, names", [
    ("vtab1k", "vtab1k", "task", sorted(VTAB_TASKS)),
    ("fgvc", "fgvc", "dataset", sorted(FGVC_DATASETS)),
])
def test_benchmark_configs_cover_every_task(benchmark: str, folder: str, key: str, names: list,
                                            capsys: pytest.CaptureFixture) -> None:
    seen = []
    for path in sorted((CONFIGS / folder).glob("*.yaml")):
        config = printed_config(["-c", str(CONFIGS / f"{benchmark}.yaml"), "-c", str(path)], capsys)
        data = config["data"]["init_args"]
        seen.append(data[key])
        assert data["root"] == yaml.safe_load((CONFIGS / f"{benchmark}.yaml").read_text())[
            "data"]["init_args"]["root"]
        assert config["model"]["backbone"] == "vit_base_patch16_224.augreg_in21k"
        assert config["trainer"]["logger"]["init_args"]["name"].startswith(f"{benchmark}/")
        assert config["trainer"]["max_epochs"] == 100 and config["test_after_fit"] is True
    assert sorted(seen) == names


def test_method_configs_compose_with_the_paper_defaults(capsys: pytest.CaptureFixture) -> None:
    base = ["-c", str(CONFIGS / "vtab1k.yaml"), "-c", str(CONFIGS / "vtab1k" / "dtd.yaml")]
    default = printed_config(base, capsys)["model"]
    paper = printed_config([*base, "-c", str(CONFIGS / "methods" / "wegeft.yaml")], capsys)["model"]
    assert default == paper
    assert paper["adapter"]["class_path"].endswith("WeGeFTConfig")
    assert paper["adapter"]["init_args"] == {**paper["adapter"]["init_args"], "rank": 16,
                                             "targets": ["attn.proj"], "shared": True}
    assert (paper["drop_path_rate"], paper["warmup_epochs"], paper["warmup_lr"],
            paper["min_lr"], paper["label_smoothing"]) == (0.1, 10.0, 1e-7, 1e-6, 0.0)
    expected = {"lora": ("LoRAConfig", {"rank": 8, "targets": ["attn.proj"]}),
                "wegeft_all": ("WeGeFTConfig", {"rank": 16, "targets": "all"}),
                "linear_probe": ("LinearProbeConfig", {}), "full": ("FullFinetuneConfig", {})}
    for method, (cls, args) in expected.items():
        model = printed_config([*base, "-c", str(CONFIGS / "methods" / f"{method}.yaml")],
                               capsys)["model"]
        assert model["adapter"]["class_path"].endswith(cls)
        assert {k: model["adapter"].get("init_args", {})[k] for k in args} == args
    few = printed_config(["-c", str(CONFIGS / "fewshot.yaml")], capsys)["data"]
    assert few["class_path"].endswith("FewShotDataModule") and few["init_args"]["shots"] == 16


def test_demo_config_runs_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    """The shipped demo, one epoch: real data and backbone from data/, integer batch limits."""
    monkeypatch.chdir(CONFIGS.parent)
    cli = cli_main(["fit", "-c", "configs/demo.yaml", "--trainer.max_epochs", "1",
                    "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.trainer.num_val_batches == [1]
    assert cli.datamodule.num_classes == cli.model.num_classes == 5
    assert len(cli.datamodule.datasets["train"]) == 40  # 8 shots of 5 classes
    test_acc = float(cli.trainer.callback_metrics["test/acc"])
    assert 0.2 < test_acc <= 1.0
    summary = capsys.readouterr().out.split("=== wegeft-vision summary ===")[-1]
    val_acc = float(cli.trainer.callback_metrics["val/acc"])
    assert "trainable 21,504" in summary and "+ head 485" in summary
    assert f"best {val_acc:.4f} (epoch 1 of 1), last {val_acc:.4f} (epoch 1 of 1)" in summary
    assert f"test:         acc {test_acc:.4f}" in summary
    log_dir = Path(cli.trainer.log_dir)
    assert f"checkpoint:   {log_dir / 'checkpoints' / 'last.ckpt'} (latest epoch)" in summary
    assert f"logs:         {log_dir}" in summary and str(tmp_path) in str(log_dir)


@pytest.mark.parametrize("text, expected", [("1", 1), ("3", 3), ("1.0", 1.0), ("0.25", 0.25)])
def test_trainer_limits_keep_int_batches_apart_from_float_fractions(text: str,
                                                                     expected: float) -> None:
    # Lightning reads an int as batches and a float as a fraction: "1" must stay one batch
    # whichever order typing's cache holds the Trainer's Union[int, float] in.
    cli = cli_main(["-c", str(CONFIGS / "demo.yaml"), "--trainer.limit_val_batches", text,
                    "--trainer.logger", "false"], run=False)
    assert cli.trainer.limit_val_batches == expected
    assert type(cli.trainer.limit_val_batches) is type(expected)


# --ckpt_path with the user's --model.* values, from any folder.
def config_without_weights(run: dict, path: Path) -> Path:
    config = yaml.safe_load(run["config"].read_text())
    del config["model"]["weights_path"]
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_is_reused_from_another_folder_and_a_typed_weights_path_wins(
        run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_without_weights(run, tmp_path / "no_weights.yaml")
    (tmp_path / "train").mkdir()
    shutil.copy(run["root"] / "backbone.safetensors", tmp_path / "train" / "weights.safetensors")
    monkeypatch.chdir(tmp_path / "train")
    fit = cli_main(["fit", "--config", str(config), "--model.weights_path", "weights.safetensors",
                    "--trainer.max_epochs", "1", "--trainer.logger.init_args.save_dir", "logs"])
    ckpt = Path(fit.trainer.checkpoint_callback.best_model_path).resolve()
    stored = torch.load(ckpt, weights_only=True)["hyper_parameters"]["weights_path"]
    assert stored == str(tmp_path / "train" / "weights.safetensors")

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    args = ["test", "--config", str(config), "--ckpt_path", str(ckpt),
            "--trainer.logger", "false"]
    tested = cli_main(args)  # the stored absolute path, from another folder
    accuracy = float(tested.trainer.callback_metrics["test/acc"])
    moved = tmp_path / "moved" / "backbone.safetensors"
    moved.parent.mkdir()
    (tmp_path / "train" / "weights.safetensors").rename(moved)
    with pytest.raises(FileNotFoundError, match=r"weights_path .*train/weights.safetensors does "
                                                r"not exist"):
        cli_main(args)
    tested = cli_main([*args, "--model.weights_path", "../moved/backbone.safetensors"])
    assert tested.model.hparams.weights_path == str(moved)
    assert float(tested.trainer.callback_metrics["test/acc"]) == pytest.approx(accuracy)




@pytest.mark.parametrize("subcommand, override, refused", [
    ("test", ["--model.adapter.init_args.rank", "8"],
     r"checkpoint .*last.ckpt was trained with adapter=WeGeFTConfig\(rank=4.*but this model has "
     r"adapter=WeGeFTConfig\(rank=8"),
    # Refused before the model is built: depth 3 could not load the depth-2 weights file.
    ("validate", ["--model.backbone_kwargs", '{"depth": 3}'],
     r"checkpoint .*last.ckpt was trained with backbone_kwargs=\{'depth': 2.*but this model has "
     r"backbone_kwargs=\{'depth': 3\}"),
    ("fit", ["--model.lr", "0.5"], r"checkpoint .*last.ckpt was trained with other settings than "
                                   r"this fit's: lr=0.5 \(checkpoint: 0.01\). A resumed fit "
                                   r"continues the checkpoint's model, optimizer and schedule"),
    ("test", ["--model.lr", "0.5"], None),  # changes nothing in an evaluation: honoured
])
def test_ckpt_path_refuses_overrides_it_cannot_honour(run: dict, subcommand: str,
                                                     override: list, refused, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # without a logger, LightningCLI writes config.yaml into the cwd
    args = [subcommand, "--config", str(run["config"]), "--ckpt_path", str(run["ckpt"]),
            "--trainer.logger", "false", *override]
    if refused is None:
        cli = cli_main(args)
        assert cli.model.hparams.lr == 0.5
        assert float(cli.trainer.callback_metrics["test/acc"]) == pytest.approx(
            run["metrics"]["test/acc"])
        return
    with pytest.raises(ValueError, match=refused):
        cli_main(args)


# User errors: one line naming the culprit, a traceback only on request.
@pytest.mark.parametrize("args, message", [
    (["--data.init_args.root", "{tmp}/no_such_root"],
     r"MissingFileError: root folder .*no_such_root does not exist"),
    (["--data.init_args.task", "toyy"], r"UserError: .*'toyy'"),
    (["--data.init_args.batch_size", "0"], r"UserError: batch_size must be a positive int, got 0"),
    (["--model.adapter.init_args.rank", "-1"], r"UserError: rank must be a positive int, got -1"),
    (["--model.backbone", "vit_tiny_patch16_2244"],
     r"UserError: unknown timm backbone 'vit_tiny_patch16_2244'"),
    (["--ckpt_path", "{tmp}/no.ckpt"], r"MissingFileError: checkpoint .*no.ckpt does not exist"),
    (["--ckpt_path", "{config}"], r"UserError: checkpoint .*fit.yaml is not a file torch can "
                                  r"read"),
    (["--model.warmup_lr", "0.1"], r"UserError: warmup_lr must be in \(0, lr=0.01\]"),
])
def test_user_errors_print_one_line(run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture, args: list, message: str
                                    ) -> None:
    args = [a.format(tmp=tmp_path, config=run["config"]) for a in args]
    monkeypatch.setattr(sys, "argv", ["wegeft-vision", "fit", "--config", str(run["config"]),
                                      "--trainer.logger.init_args.save_dir", str(tmp_path), *args])
    monkeypatch.delenv("WEGEFT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("wegeft-vision: error:")]
    assert re.search(message, line), line
    assert "Traceback" not in err and "Does not validate" not in err and len(err) < 1500, err
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_debug_variable_shows_the_traceback(run: dict, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "wegeft_vision.cli", "fit", "--config", str(run["config"]),
               "--data.init_args.batch_size", "0"]
    quiet = subprocess.run(command, env=ENV, cwd=tmp_path, capture_output=True, text=True,
                           timeout=240)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert "wegeft-vision: error: UserError: batch_size must be a positive int, got 0\n" \
           "(set WEGEFT_DEBUG=1 for the traceback)" in quiet.stderr
    debug = subprocess.run(command, env={**ENV, "WEGEFT_DEBUG": "1"}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=240)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "UserError: batch_size must be a positive int, got 0" in debug.stderr


def test_offline_pretrained_fails_fast_and_names_weights_path(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import os, time
        from wegeft_vision.training import create_backbone
        for endpoint, offline in (("https://huggingface.co", "1"), ("http://127.0.0.1:9", "")):
            os.environ.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE=offline)
            start = time.perf_counter()
            try:
                create_backbone("vit_tiny_patch16_224.augreg_in21k", 3, pretrained=True)
            except Exception as err:
                print(f"{time.perf_counter() - start:.2f}", isinstance(err, ConnectionError),
                      type(err).__name__, err)
    """)
    env = {k: v for k, v in ENV.items() if "proxy" not in k.lower()}
    env.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=240)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr[-3000:]
    for line, reason in zip(lines, ("HF_HUB_OFFLINE is set", "127.0.0.1:9 cannot be reached")):
        seconds, connection, kind, text = line.split(" ", 3)
        assert float(seconds) < 10 and connection == "True", line
        assert kind == "WeightsUnreachableError", line  # a UserError: one line from the CLI
        assert "'vit_tiny_patch16_224.augreg_in21k' are not in the local cache" in text
        assert reason in text and "--model.weights_path" in text


# Loggers.
def test_tensorboard_logger_writes_events(run: dict, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cli = cli_main(["fit", "--config", str(run["config"]), "--trainer.max_epochs", "1",
                    "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
                    "--trainer.logger.init_args.save_dir", str(tmp_path)])
    [events] = Path(cli.trainer.log_dir).glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    [logged] = accumulator.Scalars("val/acc")
    assert logged.value == pytest.approx(float(cli.trainer.callback_metrics["val/acc"]))
    assert str(tmp_path) in cli.trainer.log_dir


# A run folder holds one run.
def folder_files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_fit_into_a_used_run_folder_is_refused_and_a_resume_continues(
        run: dict, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    args = ["fit", "--config", str(run["config"]), "--trainer.logger", "false",
            "--trainer.default_root_dir", str(folder), "--trainer.max_epochs", "1"]
    cli_main(args)
    first = folder_files(folder)
    assert {p.relative_to(folder).as_posix() for p in first} == {"config.yaml",
                                                                  "checkpoints/last.ckpt"}
    with pytest.raises(RunFolderInUseError, match=rf"run folder {re.escape(str(folder))} already "
                                                  r"holds another run \(.*config.yaml"):
        cli_main([*args, "--model.lr", "0.02"])
    assert folder_files(folder) == first  # nothing of the first run changed
    # Its checkpoints folder alone (another ModelCheckpoint, a deleted config) is a run too.
    (folder / "config.yaml").unlink()
    with pytest.raises(RunFolderInUseError, match=r"checkpoints/last.ckpt"):
        cli_main(args)
    (folder / "config.yaml").write_bytes(first[folder / "config.yaml"])

    ckpt = folder / "checkpoints" / "last.ckpt"
    resumed = cli_main([*args, "--ckpt_path", str(ckpt)])  # the run continues in its folder
    assert resumed.trainer.current_epoch == 1
    assert (folder / "config.yaml").read_bytes() == first[folder / "config.yaml"]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["last.ckpt"]


# Settings that disagree, named before the work starts.
def test_image_size_other_than_the_backbones_names_both_settings(
        run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["wegeft-vision", "fit", "--config", str(run["config"]),
                                      "--data.init_args.image_size", "48",
                                      "--trainer.logger.init_args.save_dir", str(tmp_path)])
    monkeypatch.delenv("WEGEFT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert ("wegeft-vision: error: UserError: the data's image size 48x48 (VTAB1kDataModule, "
            "--data.init_args.image_size) differs from the backbone's input size 32x32 "
            "(--model.backbone_kwargs img_size=32): set them equal\n") in capsys.readouterr().err
    assert not list(tmp_path.glob("**/*.ckpt"))


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_other_normalisation_than_the_checkpoints_is_refused(run: dict, tmp_path: Path,
                                                             subcommand: str) -> None:
    args = [subcommand, "--config", str(run["config"]), "--ckpt_path", str(run["ckpt"]),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--data.init_args.mean", "[0, 0, 0]", "--data.init_args.std", "[1, 1, 1]"]
    with pytest.raises(UserError, match=r"checkpoint .*last.ckpt was evaluated with other "
                                        r"preprocessing than VTAB1kDataModule gives \(checkpoint "
                                        r"-> data\): mean \[0.5, 0.5, 0.5\] -> \[0.0, 0.0, 0.0\]; "
                                        r"std \[0.5, 0.5, 0.5\] -> \[1.0, 1.0, 1.0\]"):
        cli_main(args)
    cli = cli_main([*args, "--model.allow_other_preprocessing", "true"])
    assert cli.trainer.state.finished
    # The opt-out is this command's, not the checkpoint's: it is not stored.
    assert "allow_other_preprocessing" not in torch.load(
        run["ckpt"], weights_only=True)["hyper_parameters"]


def test_a_diverging_fit_stops_naming_the_step(run: dict, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["wegeft-vision", "fit", "--config", str(run["config"]),
                                      "--model.lr", "1e6", "--trainer.max_epochs", "10",
                                      "--trainer.logger.init_args.save_dir", str(tmp_path)])
    monkeypatch.delenv("WEGEFT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    [line] = [x for x in capsys.readouterr().err.splitlines()
              if x.startswith("wegeft-vision: error:")]
    found = re.search(r"UserError: the training loss became (nan|inf) at global step (\d+) "
                      r"\(epoch (\d+), batch (\d+); counted from 0\): training diverged\. Lower "
                      r"--model.lr \(now 1000000.0\)", line)
    assert found, line
    # Every step before it logged a finite loss (log_every_n_steps is 1 in the config).
    [metrics_file] = tmp_path.glob("toy/version_*/metrics.csv")
    with open(metrics_file) as handle:
        losses = [float(r["train/loss_step"]) for r in csv.DictReader(handle)
                  if r.get("train/loss_step")]
    step = int(found.group(2))
    assert len(losses) == step and all(math.isfinite(x) for x in losses)
    assert step == 3 * int(found.group(3)) + int(found.group(4))  # 3 steps per epoch


# Subcommands beside Lightning's.
def test_protocol_sweep_and_summarize_run_the_protocols_commands(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import wegeft_vision.protocols as protocols
    seen = {}
    commands = types.ModuleType("wegeft_vision.protocols.commands")
    for name in ("protocol", "sweep", "summarize"):
        setattr(commands, f"{name}_command", lambda argv, name=name: seen.update({name: argv}))
    monkeypatch.setitem(sys.modules, "wegeft_vision.protocols.commands", commands)
    monkeypatch.setattr(protocols, "commands", commands, raising=False)
    for name in ("protocol", "sweep", "summarize"):
        assert cli_main([name, "--out", "results", "-c", "x.yaml"]) is None
    assert seen == {name: ["--out", "results", "-c", "x.yaml"]
                    for name in ("protocol", "sweep", "summarize")}


def test_checkpoint_of_the_cli_names_no_code_to_import(run: dict) -> None:
    """Lightning's _instantiator would make load_from_checkpoint import the module it names."""
    hparams = torch.load(run["ckpt"], weights_only=True)["hyper_parameters"]
    assert not [k for k in hparams if k.startswith("_")]
    assert hparams["adapter"]["class_path"] == "wegeft_vision.adapters.wegeft.WeGeFTConfig"
