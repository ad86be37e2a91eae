"""Turn a training checkpoint into a plain timm model: merged weights plus timm's config.json.

The output folder loads with timm alone, no wegeft_vision import::

    timm.create_model("local-dir:<folder>", pretrained=True)

or, spelling out the name, class count and architecture arguments from config.json::

    timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
                      pretrained_cfg_overlay=dict(file="<folder>/model.safetensors",
                                                  num_classes=cfg["num_classes"]),
                      **model_args)  # config.json's model_args without num_classes

(``num_classes`` in the overlay keeps timm from dropping the fine-tuned head, which it does
when the class count differs from the pretrained config's.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf

from ..adapters import merge_adapter
from .module import ViTClassifier

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def export_checkpoint(ckpt_path: Union[str, Path], output_dir: Union[str, Path],
                      checkpoint_path: Optional[str] = None, overwrite: bool = False) -> Path:
    """Merge a checkpoint's adapter into its backbone and write ``model.safetensors`` and
    ``config.json`` (timm's format: architecture, num_classes, model_args, pretrained_cfg with
    the training normalisation, label_names) to ``output_dir``.

    Args:
        ckpt_path: a checkpoint written by ``wegeft-vision fit``.
        output_dir: folder to write; created if missing.
        checkpoint_path: backbone weights file, if it moved since training.
        overwrite: replace files already in ``output_dir``.

    Returns:
        The path of the weights file.
    """
    ckpt_path, output_dir = Path(ckpt_path), Path(output_dir)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    targets = [output_dir / WEIGHTS_NAME, output_dir / CONFIG_NAME]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist; pass overwrite=True "
                              "(--overwrite true) to replace them")
    overrides = {} if checkpoint_path is None else {"checkpoint_path": checkpoint_path}
    module = ViTClassifier.from_checkpoint(ckpt_path, **overrides)
    info = module.checkpoint_info or {}
    model = merge_adapter(module.model).eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(targets[0]), metadata={"format": "pt"})
    model_config = {"label_names": info["class_names"]} if info.get("class_names") else {}
    save_config_for_hf(model, str(targets[1]), model_config=model_config,
                       data_config=info.get("data_config"))
    return targets[0]

