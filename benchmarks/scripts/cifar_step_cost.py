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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians, peak_bytes

from gradbalance import (
    IndefiniteSubspaceProjector,
    VkDProjector,
    classification_losses,
)
from gradbalance.experiments.cifar_models import make_cifar_model
from gradbalance.experiments.cifar_recipe import CifarRecipe, make_optimizer
from gradbalance.experiments.dot import DistillationOrientedTrainer, DotUpdate

PAIRS = {
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"),
    "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2"),
}
RECIPE = CifarRecipe()
WEIGHTS = (RECIPE.kd_weight, RECIPE.ce_weight)  # (distillation, task), mdistiller's KD


@dataclass(frozen=True)
class Row:
    """How a row updates the student: ``balance`` (a mode of MultiObjectiveOptimizer; None: the
    fixed weighted sum), ``dot`` (DOT's trainer), a feature ``projector``, torchjd's IMTL-G."""

    balance: str | None = None
    dot: bool = False
    projector: type[nn.Module] | None = None
    imtl_g: bool = False


ROWS = {
    "kd": Row(),
    "dot": Row(dot=True),
    "mokd-exact": Row(balance="exact"),
    "mokd-representation": Row(balance="representation"),
    "mokd-amortized": Row(balance="amortized"),
    "imtl-g": Row(balance="exact", imtl_g=True),
    "vkd": Row(projector=VkDProjector),
    "mokd-subspace": Row(balance="exact", projector=IndefiniteSubspaceProjector),
}

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
    its training step on the fixed batch."""
    return {
        name: lambda row=row: build_step(row, teacher, student_name, inputs, labels)
        for name, row in ROWS.items()
    }


def build_step(
    row: Row, teacher: nn.Module, student_name: str, inputs: torch.Tensor, labels: torch.Tensor
) -> Step:
    torch.manual_seed(1)
    student = make_cifar_model(student_name).to(inputs.device).train()
    params = list(student.parameters())
    projector = None
    if row.projector is not None:
        projector = row.projector(teacher.feature_dim, student.feature_dim).to(inputs.device)
        params += projector.parameters()
    update = _update(row, params)

    def step() -> None:
        with torch.no_grad():
            target = teacher(inputs)
        output = student(inputs)
        features = {}
        if projector is not None:
            features = dict(
                projector=projector,
                student_features=output.features,
                teacher_features=target.features,
            )
        losses = classification_losses(
            output.logits, labels, target.logits, temperature=RECIPE.temperature, **features
        ).objectives("paper")  # [distillation, task]
        update(losses, output.features)

    return step


def _update(row: Row, params: list[nn.Parameter]) -> Callable[[list[torch.Tensor], Any], None]:
    if row.dot:
        dot = DotUpdate(
            DistillationOrientedTrainer(
                params, lr=RECIPE.lr, momentum=RECIPE.momentum, weight_decay=RECIPE.weight_decay
            ),
            weights=WEIGHTS,
        )
        return lambda losses, features: dot(losses, None)
    if row.balance is None:
        sgd = make_optimizer(params, RECIPE)

        def fixed(losses: list[torch.Tensor], features: torch.Tensor) -> None:
            sgd.zero_grad()
            sum(w * loss for w, loss in zip(WEIGHTS, losses, strict=True)).backward()
            sgd.step()

        return fixed
    options = {"weighting": _imtl_g()} if row.imtl_g else {}
    balanced = make_optimizer(params, RECIPE, balance=row.balance, **options)

    def balance(losses: list[torch.Tensor], features: torch.Tensor) -> None:
        balanced.zero_grad()
        shared = features if row.balance == "representation" else None
        balanced.backward(losses, representation=shared)
        balanced.step()

    return balance


def _imtl_g() -> nn.Module:
    from torchjd.aggregation import IMTLGWeighting  # the torchjd extra

    return IMTLGWeighting()


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
