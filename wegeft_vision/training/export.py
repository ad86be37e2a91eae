"""Turn a training checkpoint into a plain timm model, optionally ONNX, optionally on the hub.

The output folder holds the merged weights (``model.safetensors``), timm's ``config.json`` with
the preprocessing the run evaluated with, a model card (``README.md``) and the run's
configuration (``training_config.yaml``). It loads with timm alone (timm >= 1.0.16)::

    model = timm.create_model("local-dir:<folder>", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))

and the transform gives the tensors the run's evaluation saw (VTAB-1k: resize to the input size;
FGVC: resize the short side, centre crop). Once pushed, ``"hf-hub:user/name"`` loads the same.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import timm
import torch
from timm.data import resolve_data_config

try:
    from timm.models import save_for_hf
except ImportError:  # public from timm 1.0.16, as is "local-dir:" loading
    save_for_hf = None

from ..adapters import merge_adapter
from .model_card import run_folder, write_model_card
from .module import ViTClassifier

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
ONNX_NAME = "model.onnx"
# The weights of an ONNX model too large for one protobuf file (2 GiB), beside it.
ONNX_DATA_NAME = ONNX_NAME + ".data"
# Up to this many bytes of weights, model.onnx holds them itself and loads when copied alone;
# the rest of the 2 GiB is left to the graph.
ONNX_INLINE_BYTES = 2**31 - 2**28
TRAINING_CONFIG_NAME = "training_config.yaml"
# Every file an export may hold: replaced or removed together, so a folder (or a hub repo) never
# mixes files of two exports. pytorch_model.bin is what timm's own push_to_hf_hub adds.
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, ONNX_NAME, ONNX_DATA_NAME,
                TRAINING_CONFIG_NAME, "pytorch_model.bin")
# The parts of timm's pretrained config that describe the architecture; the rest (tag, licence,
# source, paper, test-time sizes, the source's labels) describes the backbone's pretraining.
ARCHITECTURE_CFG_KEYS = ("architecture", "first_conv", "classifier", "fixed_input_size",
                         "pool_size")
DATA_CFG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
ONNX_MODULES = ("onnx", "onnxscript")


def export_pretrained_cfg(model: torch.nn.Module, data_config: Optional[dict[str, Any]],
                          license: Optional[str], where: str) -> dict[str, Any]:
    """timm's pretrained config for the export: the architecture's keys, the run's preprocessing
    (``data_config``, timm's form) and the exporter's licence."""
    source = model.pretrained_cfg
    cfg = {k: source[k] for k in ARCHITECTURE_CFG_KEYS + DATA_CFG_KEYS if k in source}
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # backbone_kwargs may have changed the pretrained size
        cfg["input_size"] = [3, *img_size]
    missing = [k for k in DATA_CFG_KEYS if k not in (data_config or {})]
    if missing:
        warnings.warn(f"{where} does not record the run's evaluation preprocessing "
                      f"({', '.join(missing)}): config.json takes them from the backbone's "
                      "pretrained config, which may not be what the run evaluated with",
                      stacklevel=3)
    cfg.update({k: v for k, v in (data_config or {}).items() if k in DATA_CFG_KEYS})
    cfg.update(num_classes=model.num_classes, custom_load=False)
    if license:
        cfg["license"] = license
    return cfg


def export_checkpoint(ckpt_path: Union[str, Path], output_dir: Union[str, Path],
                      weights_path: Optional[str] = None,
                      format: Literal["safetensors", "onnx"] = "safetensors",
                      license: Optional[str] = None, push_to_hub: Optional[str] = None,
                      private: Optional[bool] = None, revision: Optional[str] = None,
                      overwrite: bool = False) -> list[Path]:
    """Merge a checkpoint's adapter into its backbone and write a plain timm model.

    Args:
        ckpt_path: a checkpoint written by ``wegeft-vision fit``.
        output_dir: folder to write; created if missing.
        weights_path: backbone weights file, if it moved since training.
        format: ``safetensors`` writes the timm folder; ``onnx`` also writes ``model.onnx`` (the
            merged model, dynamic batch; needs ``pip install "wegeft-vision[onnx]"``).
        license: licence of the exported model (a hub id such as ``apache-2.0``), written to
            the model card and config.json; not copied from the backbone.
        push_to_hub: ``user/name``: upload the folder to this Hugging Face hub repository
            (created if missing); the token comes from ``HF_TOKEN`` or ``hf auth login``.
        private: create the hub repository private (None: the hub's default for the owner).
        revision: hub branch to push to (created if missing; default: main).
        overwrite: replace an earlier export in ``output_dir``. The new export is written
            beside it first and swapped in only once complete: a failure or a kill before the
            swap leaves the earlier export as it was. Other files in the folder are kept.

    Returns:
        The paths of the files the export wrote (``model.safetensors`` first), all in
        ``output_dir``.
    """
    if save_for_hf is None:
        raise ImportError(f"export needs timm >= 1.0.16 (timm.models.save_for_hf, "
                          f"\"local-dir:\" loading); this is timm {timm.__version__}")
    if format not in ("safetensors", "onnx"):
        raise ValueError(f"format must be 'safetensors' or 'onnx', got {format!r}")
    if format == "onnx":
        absent = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
        if absent:
            raise ImportError(f"--format onnx needs {', '.join(absent)}: pip install "
                              "\"wegeft-vision[onnx]\"")
    ckpt_path, output_dir = Path(ckpt_path), Path(output_dir)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    existing = [str(output_dir / n) for n in EXPORT_FILES if (output_dir / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist; pass overwrite=True "
                              "(--overwrite true) to replace them")

    overrides = {} if weights_path is None else {"weights_path": weights_path}
    module = ViTClassifier.from_checkpoint(ckpt_path, **overrides)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    info = module.checkpoint_info or {}
    where = f"checkpoint {ckpt_path}"
    pretrained_cfg = export_pretrained_cfg(module.model, info.get("data_config"), license, where)
    count = module.parameter_count()
    model = merge_adapter(module.model).eval()
    model.pretrained_cfg = pretrained_cfg  # what save_for_hf writes, in every timm version

    # Written into a folder beside output_dir (same file system, so the swap is renames), which
    # only a complete export leaves.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.export-", dir=output_dir.parent))
    try:
        # save_for_hf (timm's public API) takes data_config only from timm 1.0.31; the
        # preprocessing travels in model.pretrained_cfg instead. model_args are given explicitly
        # because timm before 1.0.31 records none.
        model_args = dict(module.hparams.backbone_kwargs or {})
        if getattr(model, "reg_token", None) is not None:  # merged VPT-shallow: register tokens
            model_args["reg_tokens"] = model.num_reg_tokens
        label_names = {"label_names": info["class_names"]} if info.get("class_names") else {}
        save_for_hf(model, str(staging), model_config=label_names, model_args=model_args,
                    safe_serialization=True)
        _check_config(staging / CONFIG_NAME, pretrained_cfg)
        config_yaml = run_folder(ckpt_path) / "config.yaml"
        if config_yaml.is_file():
            shutil.copyfile(config_yaml, staging / TRAINING_CONFIG_NAME)
        if format == "onnx":
            export_onnx(model, staging / ONNX_NAME, pretrained_cfg["input_size"])
        files = sorted({CARD_NAME, *(p.name for p in staging.iterdir())},
                       key=lambda name: (name != WEIGHTS_NAME, name))
        write_model_card(staging / CARD_NAME, module=module, count=count, checkpoint=checkpoint,
                         ckpt_path=ckpt_path, license=license, files=files)
        _swap_in(staging, output_dir, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if push_to_hub:
        push_export(output_dir, push_to_hub, private=private, revision=revision, files=files)
    return [output_dir / name for name in files]


def _swap_in(staging: Path, output_dir: Path, files: list[str]) -> None:
    """Replace the export in ``output_dir`` by the files of ``staging``: the old export's files
    are renamed aside, the new ones renamed in, and the old ones removed. A failure during the
    renames puts the old export back; other files in ``output_dir`` are not touched."""
    output_dir.mkdir(exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.replaced-", dir=output_dir.parent))
    old = [name for name in dict.fromkeys((*EXPORT_FILES, *files))
           if (output_dir / name).exists()]
    moved_in: list[str] = []
    try:
        for name in old:
            os.replace(output_dir / name, aside / name)
        for name in files:
            os.replace(staging / name, output_dir / name)
            moved_in.append(name)
    except BaseException:
        for name in moved_in:
            os.replace(output_dir / name, staging / name)
        for name in old:
            if (aside / name).exists():
                os.replace(aside / name, output_dir / name)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _check_config(path: Path, expected: dict[str, Any]) -> None:
    """Read config.json back the way timm does: its eval preprocessing must be the run's."""
    written = json.loads(path.read_text())["pretrained_cfg"]
    resolved = resolve_data_config(pretrained_cfg=written)
    wrong = {k: (resolved[k], expected[k]) for k in DATA_CFG_KEYS
             if k in expected and json.loads(json.dumps(resolved[k])) !=
             json.loads(json.dumps(expected[k]))}
    if wrong:
        raise RuntimeError(f"{path}: timm resolves the preprocessing differently from the run's "
                           f"(timm's, the run's): {wrong}")


def export_onnx(model: torch.nn.Module, path: Path, input_size: list[int]) -> None:
    """Write ``model`` to ONNX with input ``images`` (batch, C, H, W), dynamic batch, and
    output ``logits``.

    The weights go into the file itself when they fit protobuf's 2 GiB (ONNX_INLINE_BYTES), so
    that ``model.onnx`` loads wherever it is copied; a larger model keeps them in
    ``model.onnx.data`` beside it, which must travel with it.
    """
    example = torch.zeros(2, *input_size)
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    torch.onnx.export(model, (example,), str(path), input_names=["images"],
                      output_names=["logits"], dynamo=True, verbose=False,
                      external_data=size > ONNX_INLINE_BYTES,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))


def push_export(folder: Union[str, Path], repo_id: str, private: Optional[bool] = None,
                revision: Optional[str] = None, files: Optional[list[str]] = None) -> Any:
    """Upload an export folder to the Hugging Face hub as one commit.

    The folder is uploaded as written (not re-serialised): the hub gets the files and the card
    that were checked here, and an earlier export's files in the repository are removed in the
    same commit, so its card cannot outlive its weights. ``files`` (names) limits the upload
    to the export's own files (default: the export files the folder holds), so that other
    files in the folder are not published.
    """
    if files is None:
        files = [name for name in EXPORT_FILES if (Path(folder) / name).is_file()]
    from huggingface_hub import HfApi

    api = HfApi()  # token: HF_TOKEN or the cached `hf auth login`, as huggingface_hub resolves it
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                             commit_message="Add model exported by wegeft-vision",
                             allow_patterns=list(files), delete_patterns=list(EXPORT_FILES))
