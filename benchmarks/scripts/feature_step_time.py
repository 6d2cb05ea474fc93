"""What feature distillation costs per training step on MNIST, against the logits-only rows.

    python benchmarks/scripts/feature_step_time.py [--repeats 15] [--threads 1]

One training step (forward, the method's losses, its update) of each method of
``gradbalance distill --dataset mnist`` on its shapes: the 784-800-800-10 student, the LeNet-like
teacher's 256 features, batch 256, T = 20. The teacher is untrained (its weights do not change
the cost) and its outputs are looked up from a table, as in the real runs. The steps of all
methods run interleaved, each repeat in a fresh random order, and the table gives the median
time and the ratio to ``mokd-exact`` (the logits-only balanced row) — the ratio docs/mnist.md
quotes for the ≤ 2× target of the feature rows.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians

from gradbalance.experiments.datasets import make_student, make_teacher
from gradbalance.experiments.methods import (
    MethodSettings,
    TeacherTargets,
    build,
    parse_method,
)

METHODS = (
    "student",
    "hinton-kd-w1",
    "mokd-exact",
    "vkd",
    "mokd-vkd",
    "mokd-subspace",
    "mokd-subspace-k3",
)
SETTINGS = MethodSettings(lr=1e-3, weight_decay=0.0, temperature=20.0, features=False)
BATCH = 256


def training_step(name: str, inputs: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    torch.manual_seed(0)
    teacher = make_teacher("mnist", (1, 28, 28), 10).eval().requires_grad_(False)
    targets = TeacherTargets(teacher, inputs)
    student = make_student("mnist", (1, 28, 28), 10)
    objectives, update = build(parse_method(name), student, targets, SETTINGS)
    index = torch.arange(BATCH)

    def step() -> None:
        output = student(inputs[index])
        update(objectives(output, inputs[index], labels[index], index), output)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(BATCH, 1, 28, 28, generator=generator)
    labels = torch.randint(10, (BATCH,), generator=generator)
    steps = {name: training_step(name, inputs, labels) for name in METHODS}
    seconds = interleaved_medians(steps, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {BATCH}")
    print("| method | ms per step | × mokd-exact |")
    print("|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value * 1e3:.1f} | {value / seconds['mokd-exact']:.2f} |")


if __name__ == "__main__":
    main()
