"""Compare WeGeFT with linear probing, LoRA, DoRA, VeRA, VPT, BitFit, full fine-tuning and
training from scratch on the demo.

Every method starts from the same demo backbone (``data/demo_backbone.safetensors``; scratch from
the same architecture, randomly initialised) and gets the same budget: the same steps, batch size,
schedule, gradient clipping and augmentation, on a K-shot list of the target digits (5-9). Each
method picks its learning rate from a grid of the same size by mean VALIDATION accuracy over the
seeds (val200, per shot count); the table reports TEST accuracy (mean +- std over the seeds) of
the runs at that lr, measured after the last step.

    python scripts/compare_demo.py [--jobs 2] [--shots 2 8 16] [--seeds 0 1 2] \
        [--out docs/demo_comparison.md]

Writes the table to ``--out`` and the same numbers as JSON next to it (``--json``, default the
.md path with .json): per method its trainable parameters, lr grid and, per shot count, the
selected lr, mean val accuracy, mean and std of the test accuracy and the per-seed test
accuracies (in the order of ``seeds``), all in %.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import resource
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pretrain_demo_backbone import (MAX_SHIFT, accuracy, create_backbone, load_split, normalize,
                                    random_shift)
from wegeft_vision import (AdapterConfig, BitFitConfig, DoRAConfig, FullFinetuneConfig,
                           LinearProbeConfig, LoRAConfig, VeRAConfig, VPTConfig, WeGeFTConfig,
                           apply_adapter, count_parameters)

TARGET_TASK = "digits"
NUM_CLASSES = 5


@dataclass(frozen=True)
class Method:
    """A row of the table: an adapter on the pretrained backbone, or full training from scratch."""

    name: str
    config: Callable[[], AdapterConfig]
    lrs: tuple[float, ...]
    pretrained: bool = True


# Three learning rates per method, a factor 2 apart around the optimum that a pilot on val200
# found for it (8 shots, 3 seeds, lr 1e-4 to 1e-1, first without warm-up and clipping): heads and
# low-rank edits want larger steps than updates of every weight. WeGeFT's rank (16, from 8, 16,
# 32, 64, per-layer generators and separate q/k/v generators) was chosen by the same pilot's val
# accuracy; r=8 is shown as well. DoRA, VeRA, VPT and BitFit got the same pilot with warm-up and
# clipping (8 shots, 3 seeds, lr 1e-3 to 1e-1, VeRA on to 0.8): VeRA's vectors scale frozen
# random factors and want the largest steps; DoRA's optimum is LoRA's. VPT's and BitFit's grids
# were moved one step down after a first full run selected their lowest lr on val at 2 of 3
# shot counts.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("linear probe", LinearProbeConfig, (5e-2, 1e-1, 2e-1)),
    Method("WeGeFT r=8, all, shared", lambda: WeGeFTConfig(rank=8, targets="all"),
           (5e-3, 1e-2, 2e-2)),
    Method("WeGeFT r=16, all, shared", lambda: WeGeFTConfig(rank=16, targets="all"),
           (5e-3, 1e-2, 2e-2)),
    Method("LoRA r=8, all", lambda: LoRAConfig(rank=8, targets="all"), (5e-3, 1e-2, 2e-2)),
    Method("DoRA r=8, all", lambda: DoRAConfig(rank=8, targets="all"), (5e-3, 1e-2, 2e-2)),
    Method("VeRA r=256, all", lambda: VeRAConfig(rank=256, targets="all"), (5e-2, 1e-1, 2e-1)),
    Method("VPT-deep, 5 tokens", lambda: VPTConfig(num_tokens=5, deep=True), (1e-2, 2e-2, 4e-2)),
    Method("BitFit, linear biases", lambda: BitFitConfig(biases="linear"), (5e-3, 1e-2, 2e-2)),
    Method("full fine-tuning", FullFinetuneConfig, (5e-4, 1e-3, 2e-3)),
    Method("scratch", FullFinetuneConfig, (5e-4, 1e-3, 2e-3), pretrained=False),
)}


@dataclass(frozen=True)
class Budget:
    """What every method gets: AdamW, linear warm-up then cosine to 0, clipped gradients."""

    steps: int = 100
    batch_size: int = 32
    warmup_steps: int = 10
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    augment: bool = True

    def describe(self) -> str:
        shifts = f", random +-{MAX_SHIFT} px shifts" if self.augment else ", no augmentation"
        return (f"{self.steps} steps at batch min({self.batch_size}, train size), AdamW "
                f"(wd {self.weight_decay:g}), {self.warmup_steps} warm-up steps then cosine to 0, "
                f"gradient norm clipped at {self.clip_norm:g}{shifts}")


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]


@functools.lru_cache(maxsize=None)
def load_target(data: Path, split: str) -> Split:
    """A list file of the target task, read once per process."""
    return Split(*load_split(data, TARGET_TASK, split))


def build_model(method: Method, backbone: Path) -> nn.Module:
    model = create_backbone(NUM_CLASSES, backbone if method.pretrained else None)
    return apply_adapter(model, method.config())


def train(model: nn.Module, data: Split, lr: float, budget: Budget, seed: int) -> None:
    """Train the parameters ``apply_adapter`` left trainable; batches cycle shuffled epochs."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=budget.weight_decay)
    warmup, steps = budget.warmup_steps, budget.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(budget.batch_size, len(data.labels))
    order = torch.empty(0, dtype=torch.int64)
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(data.labels), generator=generator)])
        batch, order = order[:batch_size], order[batch_size:]
        images = data.images[batch]
        if budget.augment:
            images = random_shift(images, MAX_SHIFT, generator)
        loss = F.cross_entropy(model(normalize(images)), data.labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, budget.clip_norm)
        optimizer.step()
        schedule.step()


@dataclass(frozen=True)
class Task:
    """One training run: a method (by name) at one lr on one few-shot list."""

    method: str
    shots: int
    seed: int
    lr: float
    data: Path
    backbone: Path
    budget: Budget


def run(task: Task) -> tuple[float, float]:
    """Train once; returns (val accuracy, test accuracy) after the last step."""
    torch.manual_seed(task.seed)  # head and adapter initialisation
    model = build_model(METHODS[task.method], task.backbone)
    train(model, load_target(task.data, f"train_shot{task.shots}_seed{task.seed}"), task.lr,
          task.budget, task.seed)
    val, test = load_target(task.data, "val200"), load_target(task.data, "test")
    return (accuracy(model, normalize(val.images), val.labels),
            accuracy(model, normalize(test.images), test.labels))


@dataclass(frozen=True)
class Cell:
    """One method at one shot count, at its selected lr."""

    lr: float
    val: float
    test_mean: float
    test_std: float
    tests: tuple[float, ...]  # per seed, in the order the seeds were given


def select(runs: dict[float, list[tuple[float, float]]]) -> Cell:
    """The lr with the best mean val accuracy over the seeds, and its test accuracy (%)."""
    best = max(runs, key=lambda lr: statistics.mean(v for v, _ in runs[lr]))
    tests = [100.0 * t for _, t in runs[best]]
    return Cell(best, 100.0 * statistics.mean(v for v, _ in runs[best]), statistics.mean(tests),
                statistics.stdev(tests) if len(tests) > 1 else 0.0, tuple(tests))


def trainable_parameters(method: Method, backbone: Path) -> tuple[int, int]:
    """(adapter, head) trainable parameter counts."""
    count = count_parameters(build_model(method, backbone))
    return count.trainable, count.head


def as_json(cells: dict[tuple[str, int], Cell], methods: Sequence[Method], shots: Sequence[int],
            params: dict[str, tuple[int, int]], seeds: Sequence[int], budget: Budget,
            command: str, runtime: str) -> dict:
    """The table's numbers for plotting: accuracies in %, std over seeds (n-1), lr selected."""
    return {
        "metric": "test accuracy (%) on the 596 test images of digits 5-9",
        "seeds": list(seeds), "shots": list(shots), "budget": budget.describe(),
        "command": command, "runtime": runtime, "torch": torch.__version__,
        "methods": {m.name: {
            "trainable_params": params[m.name][0], "head_params": params[m.name][1],
            "lr_grid": list(m.lrs),
            "shots": {str(k): {"lr": cells[m.name, k].lr, "val_mean": cells[m.name, k].val,
                               "mean": cells[m.name, k].test_mean,
                               "std": cells[m.name, k].test_std,
                               "per_seed": list(cells[m.name, k].tests)} for k in shots},
        } for m in methods},
    }


def markdown(cells: dict[tuple[str, int], Cell], methods: Sequence[Method], shots: Sequence[int],
             params: dict[str, tuple[int, int]], seeds: Sequence[int], budget: Budget,
             command: str, runtime: str) -> str:
    header = "| method | trainable params | " + " | ".join(f"{k}-shot" for k in shots) + " |"
    lines = [header, "|" + " --- |" * (2 + len(shots))]
    for method in methods:
        row = [f"{cells[method.name, k].test_mean:.1f} ± {cells[method.name, k].test_std:.1f}"
               for k in shots]
        trainable, head = params[method.name]
        lines.append(f"| {method.name} | {trainable:,} + head {head:,} | " + " | ".join(row)
                     + " |")
    lr_lines = ["| method | lr grid | " + " | ".join(f"{k}-shot lr (val %)" for k in shots) + " |",
                "|" + " --- |" * (2 + len(shots))]
    for method in methods:
        grid = ", ".join(f"{lr:g}" for lr in method.lrs)
        row = [f"{cells[method.name, k].lr:g} ({cells[method.name, k].val:.1f})" for k in shots]
        lr_lines.append(f"| {method.name} | {grid} | " + " | ".join(row) + " |")
    return "\n".join([
        "Test accuracy (%) on the 596 test images of digits 5-9, mean ± std over few-shot seeds "
        f"{', '.join(map(str, seeds))}; K-shot = K training images per class.",
        "",
        *lines,
        "",
        f"Budget for every method: {budget.describe()}. The lr of each cell was selected by "
        "mean val200 accuracy (100 images) from the method's grid of "
        f"{len(methods[0].lrs)}:",
        "",
        *lr_lines,
        "",
        f"`{command}` took {runtime}, torch {torch.__version__}.",
        "",
    ])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/digits_vtab"))
    parser.add_argument("--backbone", type=Path, default=Path("data/demo_backbone.safetensors"))
    parser.add_argument("--shots", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        metavar="METHOD", help=f"any of: {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=Budget.steps)
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes, one torch thread each (2 suits 2 cores)")
    parser.add_argument("--out", type=Path, default=Path("docs/demo_comparison.md"))
    parser.add_argument("--json", type=Path, default=None,
                        help="the numbers as JSON (default: --out with the suffix .json)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not args.backbone.is_file():
        raise FileNotFoundError(f"{args.backbone} not found: run "
                                "scripts/pretrain_demo_backbone.py first")
    methods = [METHODS[name] for name in args.methods]
    budget = Budget(steps=args.steps)
    for split in ("val200", "test", *(f"train_shot{k}_seed{s}" for k in args.shots
                                      for s in args.seeds)):
        load_target(args.data, split)  # a missing list file fails now, not after minutes
    tasks = [Task(method.name, shots, seed, lr, args.data, args.backbone, budget)
             for method in methods for shots in args.shots
             for seed, lr in itertools.product(args.seeds, method.lrs)]

    start = time.perf_counter()
    cells: dict[tuple[str, int], Cell] = {}
    runs: dict[tuple[str, int], dict[float, list[tuple[float, float]]]] = {}
    per_cell = len(args.seeds) * len(methods[0].lrs)
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:
            # One thread per worker: several multi-threaded workers on few cores spin-wait.
            pool = stack.enter_context(ProcessPoolExecutor(
                args.jobs, initializer=torch.set_num_threads, initargs=(1,)))
            results = pool.map(run, tasks)
        else:
            results = map(run, tasks)
        for task, result in zip(tasks, results):
            key = (task.method, task.shots)
            runs.setdefault(key, {}).setdefault(task.lr, []).append(result)
            if sum(map(len, runs[key].values())) == per_cell:
                cell = cells[key] = select(runs[key])
                print(f"{task.method:26s} {task.shots:2d}-shot  lr {cell.lr:<6g} "
                      f"val {cell.val:5.1f}  test {cell.test_mean:5.1f} ± {cell.test_std:.1f}",
                      flush=True)
    seconds = time.perf_counter() - start
    params = {m.name: trainable_parameters(m, args.backbone) for m in methods}
    command = shlex.join(["python", "scripts/compare_demo.py", *argv])
    # CPU time does not depend on what else runs on the machine; wall time does.
    cpu = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    workers = (f"{args.jobs} worker processes x 1 torch thread" if args.jobs > 1
               else f"1 process x {torch.get_num_threads()} torch threads")
    runtime = f"{seconds / 60:.1f} min wall and {cpu / 60:.1f} CPU-min ({workers})"
    table = markdown(cells, methods, args.shots, params, args.seeds, budget, command, runtime)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")
    json_path = args.json or args.out.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    numbers = as_json(cells, methods, args.shots, params, args.seeds, budget, command, runtime)
    json_path.write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
    print(f"\n{table}\nwrote {args.out} and {json_path}")


if __name__ == "__main__":
    main()
