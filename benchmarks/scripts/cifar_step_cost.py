"""What each row of the CIFAR-100 benchmark costs per training step, relative to KD's step.

    nice python benchmarks/scripts/cifar_step_cost.py [--repeats 5] [--threads 1] [--json FILE]
    python benchmarks/scripts/cifar_step_cost.py --quick        # tiny batch, one repeat

One training step of each row on the headline pairs (resnet32x4 → resnet8x4, wrn_40_2 →
wrn_16_2), random images at batch 64 (the recipe's), on the CPU with one thread: the frozen
teacher's forward (eval mode, no gradient), the student's forward, the losses (T = 4) and the
row's update, all under mdistiller's SGD (lr 0.05, momentum 0.9, weight decay 5e-4):

* ``kd``: ``0.9 · T²·KL + 0.1 · CE`` (mdistiller's KD), one backward, SGD;
* ``dot``: DOT's two-momentum SGD on the same weighted pair (``experiments/dot.py``);
* ``mokd-exact`` / ``-representation`` / ``-amortized``: ``[T²·KL, CE]`` through
  ``MultiObjectiveOptimizer(base=torch.optim.SGD)`` in that mode (representation: the student's
  pooled features); ``imtl-g``: exact mode with torchjd's ``IMTLGWeighting``;
* ``vkd``: the distillation objective ``T²·KL + L_feat`` with a ``VkDProjector`` of the student's
  features onto the teacher's, fixed weights 0.9 / 0.1, SGD; ``mokd-subspace``: the same with an
  ``IndefiniteSubspaceProjector``, balanced in exact mode.

The steps of all rows run interleaved, every repeat in a fresh random order, and the table gives
their medians (``timing.interleaved_medians``). Peak memory is ``timing.peak_bytes``: on CPU the
sum of the torch allocator's allocation and free events recorded by the profiler (exact bytes of
tensors, counted from before the row's student and optimizer are built, the second step of
two), on CUDA ``torch.cuda.max_memory_allocated``. The teacher and the batch exist before and are
in no row's figure; the teacher's activations are. ``gpu_check.py`` reuses :func:`row_builders`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians, peak_bytes

from gradbalance.experiments.cifar_models import make_cifar_model
from gradbalance.experiments.cifar_recipe import CifarRecipe
from gradbalance.experiments.methods import (
    CIFAR_METHODS,
    MethodSettings,
    TeacherTargets,
    build,
    parse_method,
)

PAIRS = {
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"),
    "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2"),
}
RECIPE = CifarRecipe()
# The rows of gradbalance distill --dataset cifar100, built by the same code: KD first, the
# reference of the ratios; the student alone and the grid's other weights cost what KD does.
ROWS = ("kd", *(name for name in CIFAR_METHODS if name not in ("student", "kd", "kd-w1", "kd-w3")))
SETTINGS = MethodSettings(
    lr=RECIPE.lr,
    weight_decay=RECIPE.weight_decay,
    temperature=RECIPE.temperature,
    features=False,
    optimizer="sgd",
)

Step = Callable[[], None]


def random_batch(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 100, (batch,), generator=generator)
    return inputs.to(device), labels.to(device)


def frozen_teacher(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return make_cifar_model(name).to(device).eval().requires_grad_(False)


def row_builders(
    teacher: nn.Module, student_name: str, inputs: torch.Tensor, labels: torch.Tensor
) -> dict[str, Callable[[], Step]]:
    """Per row, a function that builds a fresh student (and projector and optimizer) and returns
    its training step on the fixed batch, teacher forward included."""
    return {
        name: lambda name=name: build_step(name, teacher, student_name, inputs, labels)
        for name in ROWS
    }


def build_step(
    name: str, teacher: nn.Module, student_name: str, inputs: torch.Tensor, labels: torch.Tensor
) -> Step:
    """One training step of row ``name``, as ``gradbalance distill`` takes it
    (:func:`gradbalance.experiments.methods.build`)."""
    torch.manual_seed(1)
    student = make_cifar_model(student_name).to(inputs.device).train()
    targets = TeacherTargets(teacher, None)  # the teacher runs on every batch
    objectives, update = build(parse_method(name), student, targets, SETTINGS)
    index = torch.arange(len(labels), device=inputs.device)

    def step() -> None:
        output = student(inputs)
        update(objectives(output, inputs, labels, index), output)

    return step


def measure(
    pair: str, batch: int, repeats: int, warmup: int, device: torch.device, rows: list[str]
) -> dict[str, Any]:
    """Median step time and peak memory of each row of ``pair``, and their ratios to ``kd``'s."""
    teacher_name, student_name = PAIRS[pair]
    inputs, labels = random_batch(batch, device)
    teacher = frozen_teacher(teacher_name, device)
    every = row_builders(teacher, student_name, inputs, labels)
    builders = {name: every[name] for name in rows}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    steps = {name: build() for name, build in builders.items()}
    seconds = interleaved_medians(steps, repeats, warmup=warmup, synchronize=sync)
    del steps
    peaks = {name: peak_bytes(build, device) for name, build in builders.items()}
    return {
        "pair": pair,
        "batch": batch,
        "seconds": seconds,
        "peak_bytes": peaks,
        "time": {name: value / seconds["kd"] for name, value in seconds.items()},
        "memory": {name: value / peaks["kd"] for name, value in peaks.items()},
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['pair']} (batch {result['batch']})",
        "",
        "| row | ms per step | × kd | peak MiB | × kd |",
        "|---|---|---|---|---|",
    ]
    for name, value in result["seconds"].items():
        lines.append(
            f"| {name} | {value * 1e3:.0f} | {result['time'][name]:.2f} | "
            f"{result['peak_bytes'][name] / 2**20:.0f} | {result['memory'][name]:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=RECIPE.batch_size)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--quick", action="store_true", help="batch 2, one repeat, no warm-up")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    if "kd" not in args.rows:
        parser.error("--rows must include kd, the reference of the ratios")
    if args.quick:
        args.batch, args.repeats, args.warmup = 2, 1, 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {device}")
    results = []
    for pair in args.pairs:
        results.append(measure(pair, args.batch, args.repeats, args.warmup, device, args.rows))
        print("\n" + markdown(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
