"""``wegeft-vision export``: the preprocessing timm reads from the export, ONNX, the model card
and the hub upload (stubbed at huggingface_hub's boundary)."""
from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import yaml
from PIL import Image

from tests.helpers.data import make_datamodule
from tests.helpers.models import vit_kwargs
from tests.helpers.training import BACKBONE, BACKBONE_KWARGS, fit_toy_run
from wegeft_vision.adapters import WeGeFTConfig
from wegeft_vision.cli import cli_main
from wegeft_vision.training import ViTClassifier
from wegeft_vision.training.export import EXPORT_FILES, export_checkpoint
from wegeft_vision.training.model_card import run_accuracy

IMAGE_SIZE = 16
TINY = vit_kwargs("narrow", img_size=IMAGE_SIZE)
MEAN, STD = (0.2, 0.4, 0.6), (0.1, 0.2, 0.3)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One fit (2 epochs, tested after fit) of the toy VTAB task, shared by the tests below."""
    return fit_toy_run(tmp_path_factory.mktemp("export"))


def fit_checkpoint(kind: str, root: Path) -> tuple[Path, L.LightningDataModule]:
    """A one-step fit on a ``make_datamodule`` dataset of ``kind``; its checkpoint."""
    dm = make_datamodule(kind, root / "data", image_size=IMAGE_SIZE, mean=MEAN, std=STD,
                         batch_size=64, num_workers=0)
    dm.setup("fit")
    model = ViTClassifier(BACKBONE, dm.num_classes, adapter=WeGeFTConfig(rank=2),
                          pretrained=False, backbone_kwargs=TINY, drop_path_rate=0.0)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, dm)
    trainer.save_checkpoint(root / "run.ckpt")
    return root / "run.ckpt", dm


# 1. config.json: timm's eval transform is the run's.
@pytest.mark.parametrize("kind", ["vtab", "fgvc", "folder"])
def test_timm_eval_transform_of_the_export_gives_the_test_tensors(tmp_path: Path,
                                                                   kind: str) -> None:
    ckpt, dm = fit_checkpoint(kind, tmp_path)
    export_checkpoint(ckpt, tmp_path / "export", license="mit")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())["pretrained_cfg"]
    # Only the run's data, architecture keys and the given licence; nothing of the backbone's
    # pretraining (its tag, licence, source, test-time size).
    geometry = {"vtab": (1.0, "squash"), "fgvc": (224 / 256, "center"),
                "folder": (224 / 256, "center")}[kind]
    assert (cfg["crop_pct"], cfg["crop_mode"]) == geometry
    assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (MEAN, STD)
    assert cfg["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE] and cfg["license"] == "mit"
    assert not {"tag", "hf_hub_id", "url", "test_input_size", "test_crop_pct"} & set(cfg)

    local = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    if kind == "folder":  # the only kind with class names
        assert local.pretrained_cfg["label_names"] == dm.class_names
        card = (tmp_path / "export" / "README.md").read_text()
        assert f"| Classes | {dm.num_classes}: {', '.join(dm.class_names)} |" in card
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=local))
    dm.setup("test")
    images, labels = next(iter(dm.test_dataloader()))
    samples = dm.datasets["test"].samples  # image i has label i (make_datamodule)
    assert {Image.open(s.path).size for s in samples} >= {(23, 31), (40, 27)}  # resized
    timm_images = torch.stack([transform(Image.open(samples[i].path).convert("RGB"))
                               for i in labels.tolist()])
    # Both resize with PIL: what is left is float32 rounding (measured max 9.5e-7). A crop one
    # pixel off, or timm's default crop_pct 0.875 for VTAB, moves values by whole grey levels.
    torch.testing.assert_close(timm_images, images, rtol=0, atol=1e-5)
    # That plain timm predicts as the trained model: test_cli's export test, in a fresh process.


def test_checkpoint_without_the_eval_preprocessing_warns(run: dict, tmp_path: Path) -> None:
    checkpoint = torch.load(run["ckpt"], weights_only=True)
    for key in ("crop_pct", "crop_mode"):
        checkpoint["wegeft_vision"]["data_config"].pop(key, None)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match=r"old.ckpt does not record the run's evaluation "
                                         r"preprocessing \(crop_pct, crop_mode\): config.json "
                                         r"takes them from the backbone's pretrained config"):
        export_checkpoint(tmp_path / "old.ckpt", tmp_path / "old")
    backbone_cfg = timm.models.get_pretrained_cfg(BACKBONE)
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())["pretrained_cfg"]
    assert (cfg["crop_pct"], cfg["crop_mode"]) == (backbone_cfg.crop_pct, backbone_cfg.crop_mode)
    assert (cfg["mean"], cfg["input_size"]) == ([0.5] * 3, [3, 32, 32])  # what it does record

    checkpoint["wegeft_vision"]["data_config"] = None  # trained without a datamodule
    torch.save(checkpoint, tmp_path / "bare.ckpt")
    with pytest.warns(UserWarning, match=r"\(input_size, interpolation, mean, std, crop_pct, "
                                         r"crop_mode\)"):
        export_checkpoint(tmp_path / "bare.ckpt", tmp_path / "bare")
    cfg = json.loads((tmp_path / "bare" / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32]  # the model's size, not the backbone's 224
    assert tuple(cfg["mean"]) == tuple(backbone_cfg.mean)


# 2. ONNX.
def onnx_logits(model_file: Path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    [logits] = session.run(["logits"], {"images": images.numpy()})
    return torch.from_numpy(logits)


def test_onnx_export_matches_pytorch_and_overwrite_removes_it(
        run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wegeft_vision.training import export

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # batch 3:
    # not the batch of 2 the export traced with
    trained = ViTClassifier.from_checkpoint(run["ckpt"])  # adapter unmerged
    with torch.no_grad():
        expected = trained(images)
    out = tmp_path / "export"
    # A model too large for one protobuf file keeps its weights in model.onnx.data, which the
    # card lists and which travels with model.onnx.
    monkeypatch.setattr(export, "ONNX_INLINE_BYTES", 0)
    written = export_checkpoint(run["ckpt"], out, format="onnx")
    assert {p.name for p in written} == {"model.safetensors", "config.json", "README.md",
                                         "training_config.yaml", "model.onnx", "model.onnx.data"}
    assert "`model.onnx.data`" in (out / "README.md").read_text()
    shutil.copytree(out, tmp_path / "copied")
    # Measured max |difference| 1.2e-7 on logits up to 0.24 (float32, another kernel order).
    torch.testing.assert_close(onnx_logits(tmp_path / "copied" / "model.onnx", images), expected,
                               rtol=1e-4, atol=1e-5)

    # Under 2 GiB (every model here) the weights are inside model.onnx: copied alone, it loads.
    monkeypatch.undo()
    cli_main(["export", "--ckpt_path", str(run["ckpt"]), "--output_dir", str(out),
              "--format", "onnx", "--overwrite", "true"])
    assert not (out / "model.onnx.data").exists()  # the earlier export's weights went with it
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(out / "model.onnx", alone / "model.onnx")
    torch.testing.assert_close(onnx_logits(alone / "model.onnx", images), expected,
                               rtol=1e-4, atol=1e-5)

    export_checkpoint(run["ckpt"], out, overwrite=True)
    assert not (out / "model.onnx").exists()  # a stale ONNX file would contradict the weights
    assert "model.onnx" not in (out / "README.md").read_text()


def test_onnx_format_without_onnx_installed_says_what_to_install(
        run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"--format onnx needs onnxscript: pip install "
                                          r"\"wegeft-vision\[onnx\]\""):
        export_checkpoint(run["ckpt"], tmp_path / "export", format="onnx")
    assert not (tmp_path / "export").exists()


# 3. Model card and hub.
def test_model_card_describes_the_run(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "export"
    cli_main(["export", "--ckpt_path", str(run["ckpt"]), "--output_dir", str(out),
              "--license", "cc-by-4.0"])
    card = (out / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(front)
    assert meta["license"] == "cc-by-4.0" and meta["library_name"] == "timm"
    assert "base_model" not in meta  # the backbone came from a local weights file
    rows = dict(line.strip("|").split(" | ", 1) for line in body.splitlines()
                if line.startswith("| ") and " | " in line)
    rows = {k.strip(): v.strip(" |") for k, v in rows.items()}
    assert rows["Backbone"].startswith(f"`{BACKBONE}`")
    assert rows["Method"] == "WeGeFT" and rows["Rank"] == "4"
    assert rows["Targets"] == "`('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')`"
    # WeGeFT, one generator per target shared over the blocks: phi and psi of d_in 24 (qkv,
    # proj, fc1) and of d_in 96 (fc2), rank 4; the head 24 x 6 + 6. Backbone: timm's own count.
    adapter = 3 * (2 * 24 * 4) + 2 * 96 * 4
    backbone = sum(p.numel() for p in timm.create_model(
        BACKBONE, num_classes=0, **BACKBONE_KWARGS).parameters())
    assert rows["Trainable parameters"] == (
        f"{adapter:,} ({100 * adapter / backbone:.3f}% of the backbone's {backbone:,}) "
        f"+ head {24 * 6 + 6:,}")
    assert rows["Data"].startswith("VTAB1kDataModule(task=toy, split=train800")
    assert rows["Test accuracy (top-1)"] == f"{100 * run['metrics']['test/acc']:.2f}%"
    assert rows["Validation accuracy (top-1)"] == f"{100 * run['metrics']['val/acc']:.2f}%"
    step = torch.load(run["ckpt"], weights_only=True)["global_step"]
    assert f"`metrics.csv` logged at this checkpoint's step ({step})." in " ".join(body.split())
    assert rows["Training command"] == "`wegeft-vision fit --config training_config.yaml`"
    assert rows["License"] == "cc-by-4.0"
    trained = yaml.safe_load((out / "training_config.yaml").read_text())
    assert trained["model"]["adapter"]["init_args"]["rank"] == 4


def test_run_accuracy_reads_only_the_rows_of_the_checkpoints_weights(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,test/acc,val/acc,val/acc_top5\n"
        "0,2,,0.25,0.5\n"      # validation of the step-3 weights
        "1,5,,0.75,1.0\n"      # validation of the step-6 weights
        "2,3,0.125,,\n"        # a test of the step-3 weights
        "2,6,0.625,,\n")       # a test of the step-6 weights
    assert run_accuracy(tmp_path / "metrics.csv", 6) == {
        "val/acc": 0.75, "val/acc_top5": 1.0, "test/acc": 0.625}
    assert run_accuracy(tmp_path / "metrics.csv", 3) == {
        "val/acc": 0.25, "val/acc_top5": 0.5, "test/acc": 0.125}
    assert run_accuracy(tmp_path / "metrics.csv", 9) == {}
    assert run_accuracy(tmp_path / "missing.csv", 6) == {}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list:
    """huggingface_hub's HfApi with its network calls replaced by a recorder: each call is
    (name, kwargs); an upload also copies the folder it would send."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        sent = tmp_path / f"sent{len(calls)}"
        allowed = kwargs.get("allow_patterns") or ["*"]
        shutil.copytree(kwargs["folder_path"], sent, ignore=lambda folder, names: [
            n for n in names if not any(fnmatch.fnmatch(n, p) for p in allowed)])
        calls.append(("upload_folder", {**kwargs, "sent": sent, "token": self.token}))
        return "commit"

    for name, stub in (("create_repo", create_repo), ("create_branch", create_branch),
                       ("upload_folder", upload_folder)):
        monkeypatch.setattr(HfApi, name, stub)
    return calls


def test_push_to_hub_uploads_the_export_and_its_card(run: dict, tmp_path: Path, hub: list,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")  # neither written nor published
    cli_main(["export", "--ckpt_path", str(run["ckpt"]), "--output_dir", str(out),
              "--push_to_hub", "someone/toy-wegeft", "--private", "true",
              "--revision", "v1", "--license", "apache-2.0"])
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"wrote model.safetensors, README.md, config.json, training_config.yaml to {out}; "
        "pushed to the hub as someone/toy-wegeft")
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert [name for name, _ in hub] == ["create_repo", "create_branch", "upload_folder"]
    assert hub[0][1] == {"repo_id": "someone/toy-wegeft", "private": True, "exist_ok": True}
    assert hub[1][1] == {"repo_id": "someone/toy-wegeft", "branch": "v1", "exist_ok": True}
    upload = hub[2][1]
    assert upload["repo_id"] == "someone/toy-wegeft" and upload["revision"] == "v1"
    assert upload["token"] is None  # huggingface_hub resolves HF_TOKEN / the cached login
    # An earlier export's files go in the same commit, unless re-uploaded.
    assert set(upload["delete_patterns"]) == set(EXPORT_FILES)
    assert "model.onnx.data" in EXPORT_FILES
    sent = upload["sent"]
    assert sorted(p.name for p in sent.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "training_config.yaml"]
    # What was sent is the export (which plain timm loads: test_cli's export test).
    for path in sent.iterdir():
        assert path.read_bytes() == (out / path.name).read_bytes(), path.name
    assert "license: apache-2.0" in (sent / "README.md").read_text()


def test_push_without_revision_creates_no_branch(run: dict, tmp_path: Path, hub: list) -> None:
    export_checkpoint(run["ckpt"], tmp_path / "export", push_to_hub="someone/toy")
    assert [name for name, _ in hub] == ["create_repo", "upload_folder"]
    assert hub[0][1]["private"] is None and hub[1][1]["revision"] is None


# 4. Overwriting an export.
def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_overwrite_keeps_the_old_export_until_the_new_one_is_complete(
        run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wegeft_vision.training import export

    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    export_checkpoint(run["ckpt"], out, license="mit")
    before = folder_bytes(out)
    real = export.save_for_hf

    def save_for_hf_then_fail(model, save_directory, **kwargs):
        real(model, save_directory, **kwargs)  # the new weights are written, then the disk fills
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "save_for_hf", save_for_hf_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(run["ckpt"], out, license="apache-2.0", overwrite=True)
    assert folder_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging folder left

    # A failure while the new files are renamed in puts the old export back.
    monkeypatch.undo()
    replace, failed = os.replace, []

    def fail_on_the_card(src, dst):
        if Path(dst) == out / "README.md" and not failed:  # the new card, not the old one back
            failed.append(dst)
            raise PermissionError(f"cannot write {dst}")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_the_card)
    with pytest.raises(PermissionError, match="README.md"):
        export_checkpoint(run["ckpt"], out, license="apache-2.0", overwrite=True)
    monkeypatch.undo()
    assert folder_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    (out / "pytorch_model.bin").write_bytes(b"an older export's file")
    written = export_checkpoint(run["ckpt"], out, license="apache-2.0", overwrite=True)
    assert [p.name for p in written] == ["model.safetensors", "README.md", "config.json",
                                         "training_config.yaml"]
    assert sorted(folder_bytes(out)) == sorted(["notes.txt", *(p.name for p in written)])
    assert "license: apache-2.0" in (out / "README.md").read_text()
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# 5. Arguments.
def test_weights_path_names_the_moved_backbone_weights(run: dict, tmp_path: Path) -> None:
    moved = shutil.copyfile(run["weights"], tmp_path / "moved.safetensors")
    export_checkpoint(run["ckpt"], tmp_path / "a")
    export_checkpoint(run["ckpt"], tmp_path / "b", weights_path=str(moved))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors").read_bytes()
    missing = tmp_path / "gone.safetensors"
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        export_checkpoint(run["ckpt"], tmp_path / "d", weights_path=str(missing))


# 6. timm versions: pyproject allows timm releases whose save_for_hf has no data_config.
def test_save_for_hf_of_timm_1_0_16_and_what_timm_wrote_is_checked(
        run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wegeft_vision.training import export

    real = export.save_for_hf

    def save_for_hf_1_0_16(model, save_directory, model_config=None, model_args=None,
                           safe_serialization=False):
        model.__dict__.pop("_model_args", None)  # timm < 1.0.31 records no factory arguments
        return real(model, save_directory, model_config=model_config, model_args=model_args,
                    safe_serialization=safe_serialization)

    monkeypatch.setattr(export, "save_for_hf", save_for_hf_1_0_16)
    export_checkpoint(run["ckpt"], tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["model_args"]["depth"] == BACKBONE_KWARGS["depth"]  # given, not only recorded
    assert (cfg["pretrained_cfg"]["crop_pct"], cfg["pretrained_cfg"]["crop_mode"]) == (
        1.0, "squash")

    def save_for_hf_cropping(model, save_directory, **kwargs):
        real(model, save_directory, **kwargs)
        path = Path(save_directory) / "config.json"
        config = json.loads(path.read_text())
        config["pretrained_cfg"].pop("crop_pct")  # as a timm that dropped the key would write
        path.write_text(json.dumps(config))

    monkeypatch.setattr(export, "save_for_hf", save_for_hf_cropping)
    with pytest.raises(RuntimeError, match=r"config.json: timm resolves the preprocessing "
                                           r"differently from the run's \(timm's, the run's\): "
                                           r"\{'crop_pct': \(0.875, 1.0\)\}"):
        export_checkpoint(run["ckpt"], tmp_path / "export", overwrite=True)

    monkeypatch.setattr(export, "save_for_hf", None)  # timm < 1.0.16
    with pytest.raises(ImportError, match=r"export needs timm >= 1\.0\.16 \(timm.models."
                                          r"save_for_hf, \"local-dir:\" loading\); this is timm"):
        export_checkpoint(run["ckpt"], tmp_path / "again")
