"""Training-step cost of WeGeFT vs LoRA, HF PEFT LoRA, full fine-tuning and the frozen floor.

All variants are built in one process and timed interleaved (one step of each per repetition),
so machine load hits every variant alike; medians and ratios are reported. Memory: on CUDA the
peak allocated bytes of a step; on CPU the bytes the autograd graph saves for backward (distinct
storages, parameters excluded) and, per variant in its own subprocess, the peak RSS.

    python scripts/benchmark.py --model vit_small_patch16_224 --batch-size 8 --targets all
    python scripts/benchmark.py --model vit_base_patch16_224 --targets attn.proj --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

from wegeft_vision import (FullFinetuneConfig, LoRAConfig, WeGeFTConfig, apply_adapter,
                           count_parameters, merge_adapter)
from wegeft_vision.adapters import WeGeFTLinear
from wegeft_vision.adapters.targets import expand_targets
from wegeft_vision.adapters.functional import plain_form, saved_activation_bytes

VARIANTS = ("floor", "wegeft", "wegeft-no-recompute", "wegeft-plain", "lora", "peft-lora",
            "full")
NUM_CLASSES = 100


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    context: Callable[[], contextlib.AbstractContextManager]
    trainable: int


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def _create(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(args.model, pretrained=False, num_classes=NUM_CLASSES,
                             img_size=args.img_size)


def _set_recompute(model: nn.Module, recompute: bool) -> None:
    for module in model.modules():
        if isinstance(module, WeGeFTLinear):
            module.recompute = recompute


def _peft_lora(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    suffixes = "|".join(t.replace(".", r"\.") for t in expand_targets(args.targets))
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                        target_modules=rf".*\.({suffixes})", modules_to_save=["head"])
    return get_peft_model(model, config)


def build_variant(name: str, args: argparse.Namespace, device: torch.device) -> Variant:
    """One model, trained as ``name`` says, with its optimiser over what it trains."""
    model = _create(args)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if name == "floor":
        for param in model.parameters():
            param.requires_grad_(False)
        for param in model.get_classifier().parameters():
            param.requires_grad_(True)
        # The gradient flows through every block down to the token embeddings, the least any
        # method that adapts every block must do; the image gradient (a conv backward) is not.
        model.patch_embed.register_forward_hook(lambda module, inputs, out: out.requires_grad_())
    elif name.startswith("wegeft"):
        apply_adapter(model, WeGeFTConfig(rank=args.rank, targets=args.targets))
        _set_recompute(model, name == "wegeft")
        if name == "wegeft-plain":
            context = plain_form
    elif name == "lora":
        apply_adapter(model, LoRAConfig(rank=args.rank, alpha=float(args.rank),
                                        targets=args.targets))
    elif name == "peft-lora":
        model = _peft_lora(model, args)
    elif name == "full":
        apply_adapter(model, FullFinetuneConfig())
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    if name.startswith("wegeft") or name == "lora":
        # Non-zero up-projections, so every low-rank product does real work.
        with torch.no_grad():
            for param in model.adapter.parameters():
                param.normal_(0.0, 0.02)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    return Variant(name, model, optimizer, context=context,
                   trainable=sum(p.numel() for p in params))


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=generator)
    return images.to(device), labels.to(device)


def _forward_loss(variant: Variant, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with variant.context(), _autocast(images.device):
        return F.cross_entropy(variant.model(images).float(), labels)


def train_step(variant: Variant, images: torch.Tensor, labels: torch.Tensor) -> None:
    if variant.optimizer is not None:
        variant.optimizer.zero_grad(set_to_none=True)
    _forward_loss(variant, images, labels).backward()
    if variant.optimizer is not None:
        variant.optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn``."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def saved_bytes(variant: Variant, images: torch.Tensor, labels: torch.Tensor) -> int:
    loss = _forward_loss(variant, images, labels)
    count = saved_activation_bytes(loss, list(variant.model.parameters()))
    del loss
    return count


def cuda_peak(variant: Variant, images: torch.Tensor, labels: torch.Tensor) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_step(variant, images, labels)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def measure_rss(name: str, args: argparse.Namespace) -> Optional[float]:
    """Peak RSS growth (MB) over the built model in a fresh process running two steps of ``name``.

    Linux only (reads /proc); None where the run fails.
    """
    command = [sys.executable, os.path.abspath(__file__), "--rss-child", name,
               "--model", args.model, "--batch-size", str(args.batch_size),
               "--img-size", str(args.img_size), "--rank", str(args.rank),
               "--targets", *args.targets]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"peak-RSS run of {name} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["peak_rss_mb"] - report["before_mb"]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # the kernel reports kB


def rss_child(args: argparse.Namespace) -> None:
    device = torch.device("cpu")
    variant = build_variant(args.rss_child, args, device)
    images, labels = _batch(args, device)
    # Reset the high-water mark (Linux: "5" clears VmHWM), so imports and building don't count.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mb("VmRSS")
    for _ in range(2):
        train_step(variant, images, labels)
    print(json.dumps({"peak_rss_mb": _status_mb("VmHWM"), "before_mb": before}))


def inference_times(args: argparse.Namespace, device: torch.device, reps: int
                    ) -> dict[str, list[float]]:
    """Plain timm model vs WeGeFT merged back into plain layers and unmerged, timed interleaved."""
    plain = _create(args).to(device).eval()
    adapted = _create(args)
    apply_adapter(adapted, WeGeFTConfig(rank=args.rank, targets=args.targets))
    with torch.no_grad():
        for param in adapted.adapter.parameters():
            param.normal_(0.0, 0.02)
    merged = merge_adapter(copy.deepcopy(adapted)).to(device).eval()
    images, _ = _batch(args, device)
    # Unmerged: the no-grad path of validation during training.
    models = {"timm (plain)": plain, "WeGeFT merged": merged,
              "WeGeFT unmerged": adapted.to(device).eval()}
    times: dict[str, list[float]] = {name: [] for name in models}

    def infer(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), _autocast(device):
                model(images)
        return run

    for rep in range(reps + 1):
        for name, model in models.items():
            wall, cpu = _timed(infer(model), device)
            if rep > 0:  # the first round warms up
                times[name].append(cpu if device.type == "cpu" else wall)
    return times


def _paired_ratio(times: dict[str, list[float]], name: str, ref: str) -> Optional[float]:
    if ref not in times:
        return None
    return statistics.median(t / r for t, r in zip(times[name], times[ref]))


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_table(variants: list[Variant], wall: dict[str, list[float]],
                cpu: dict[str, list[float]], basis: dict[str, list[float]],
                memory: dict[str, int], rss: dict[str, Optional[float]], batch_size: int,
                device: torch.device) -> None:
    mem_label = "peak allocated" if device.type == "cuda" else "saved activations"
    on_cpu = device.type == "cpu"
    columns = ["variant", "trainable params", "s / step", "images / s"]
    columns += ["CPU s / step"] if on_cpu else []
    columns += ["x floor", "x LoRA", "x PEFT LoRA", f"{mem_label} (MB)", "x floor", "x LoRA"]
    if rss:
        columns.append("step peak RSS (MB)")
    print("\n| " + " | ".join(columns) + " |\n" + "| --- " * len(columns) + "|")
    floor_m, lora_m = memory.get("floor"), memory.get("lora")
    for v in variants:
        step = statistics.median(wall[v.name])
        cells = [v.name, f"{v.trainable:,}", f"{step:.3f}", f"{batch_size / step:.1f}"]
        cells += [f"{statistics.median(cpu[v.name]):.3f}"] if on_cpu else []
        cells += [_fmt(_paired_ratio(basis, v.name, "floor")),
                 _fmt(_paired_ratio(basis, v.name, "lora")),
                 _fmt(_paired_ratio(basis, v.name, "peft-lora")),
                 f"{memory[v.name] / 1e6:.1f}", _fmt_ratio(memory[v.name], floor_m),
                 _fmt_ratio(memory[v.name], lora_m)]
        if rss:
            cells.append("-" if rss[v.name] is None else f"{rss[v.name]:.0f}")
        print("| " + " | ".join(cells) + " |")


def summary(variants: list[Variant], wall: dict[str, list[float]], cpu: dict[str, list[float]],
            basis: dict[str, list[float]], memory: dict[str, int],
            rss: dict[str, Optional[float]]) -> dict[str, dict[str, Optional[float]]]:
    """The table's numbers per variant, for plots (``--json``)."""
    floor_m, lora_m = memory.get("floor"), memory.get("lora")
    return {v.name: {
        "trainable": v.trainable,
        "step_wall_s": statistics.median(wall[v.name]),
        "step_cpu_s": statistics.median(cpu[v.name]),
        "step_x_floor": _paired_ratio(basis, v.name, "floor"),
        "step_x_lora": _paired_ratio(basis, v.name, "lora"),
        "step_x_peft_lora": _paired_ratio(basis, v.name, "peft-lora"),
        "memory_mb": memory[v.name] / 1e6,
        "memory_x_floor": memory[v.name] / floor_m if floor_m else None,
        "memory_x_lora": memory[v.name] / lora_m if lora_m else None,
        "step_peak_rss_mb": rss.get(v.name),
    } for v in variants}


def _fmt_ratio(value: Optional[float], ref: Optional[float]) -> str:
    return "-" if value is None or not ref else f"{value / ref:.3f}"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", nargs="+", default=["all"],
                        help="layer suffixes or presets (attn, mlp, all)")
    parser.add_argument("--reps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-rss", action="store_true", help="skip the per-variant RSS runs")
    parser.add_argument("--no-inference", action="store_true")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given, but CUDA is not available")
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    names = [n for n in args.variants if n != "peft-lora" or peft_available()]
    if "peft-lora" in args.variants and "peft-lora" not in names:
        print("peft is not installed: skipping HF PEFT LoRA (pip install 'wegeft-vision[peft]')",
              file=sys.stderr)

    variants = [build_variant(name, args, device) for name in names]
    images, labels = _batch(args, device)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"# {args.model}, batch {args.batch_size}, {args.img_size} px, rank {args.rank}, "
          f"targets {' '.join(args.targets)}, {device.type} ({precision}, "
          f"{torch.get_num_threads()} threads), {args.reps} interleaved reps, torch "
          f"{torch.__version__}, timm {timm.__version__}", flush=True)
    load = [os.getloadavg()[0]]  # the machine's 1-minute load: was it shared while measured?

    memory = {v.name: (cuda_peak(v, images, labels) if device.type == "cuda"
                       else saved_bytes(v, images, labels)) for v in variants}
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    for rep in range(args.reps + 1):
        for variant in variants:
            elapsed = _timed(lambda: train_step(variant, images, labels), device)
            if rep > 0:  # the first round warms up (allocator, kernels, optimiser state)
                wall[variant.name].append(elapsed[0])
                cpu[variant.name].append(elapsed[1])
        load.append(os.getloadavg()[0])
    rss = ({} if args.no_rss or device.type == "cuda"
           else {v.name: measure_rss(v.name, args) for v in variants})

    # On a shared CPU, process CPU time (one thread) is the stable measure of work; ratios are
    # medians of per-round ratios, so a slow round slows the reference as much as the variant.
    basis = cpu if device.type == "cpu" else wall
    print_table(variants, wall, cpu, basis, memory, rss, args.batch_size, device)
    print(f"\nload average (1 min) during the timed steps: {min(load):.1f} to {max(load):.1f} on "
          f"{os.cpu_count()} CPUs")
    results = {"args": vars(args), "device": device.type, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "timm": timm.__version__, "load_average": load,
               "memory_kind": ("cuda_peak_allocated" if device.type == "cuda"
                               else "saved_activations"),
               "summary": summary(variants, wall, cpu, basis, memory, rss),
               "step_wall_s": wall, "step_cpu_s": cpu, "memory_bytes": memory, "peak_rss_mb": rss,
               "trainable": {v.name: v.trainable for v in variants}}
    if not args.no_inference:
        del variants
        inference = inference_times(args, device, args.reps)
        unit = "CPU s" if device.type == "cpu" else "s"
        print(f"\n| inference (no grad) | {unit} / batch | images / s | x timm |\n"
              "| --- | --- | --- | --- |")
        for name, values in inference.items():
            t = statistics.median(values)
            ratio = _paired_ratio(inference, name, "timm (plain)")
            print(f"| {name} | {t:.3f} | {args.batch_size / t:.1f} | {_fmt(ratio)} |")
        results["inference_s"] = inference
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
