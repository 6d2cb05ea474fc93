"""How close is representation mode's π to exact mode's, on ``gradbalance distill``'s default run?

Trains the ``mokd-exact`` student of ``gradbalance distill``'s default setting (MNIST-1D, its
teacher and student, lr, schedule, augmentation and batch order for ``--seed``) and, at every
step, on the same batch and the same model state, also computes the π that representation mode
(``mokd-representation``) would choose there: the min-norm point of the Gram matrix of the
log-loss gradients with respect to the student's features and logits
(:func:`gradbalance.experiments.methods.shared_representation`), by ``torch.autograd.grad`` and
:func:`gradbalance.weighting.min_norm_weights`. That π is only observed, never stepped with, so
the run is exact mode's own trajectory (the same final accuracy as ``gradbalance distill
--methods mokd-exact``'s seed). Reports, over the run's steps, for π_distill (exact vs
representation): the Pearson correlation, mean and max |Δπ|, and the share of steps on which
the two disagree on which objective gets more weight.

Then times one training step (forward, losses, balanced backward, AdamW step) of ``mokd-exact``,
``mokd-representation`` and ``kd-fixed`` (one ordinary backward) on one batch, side by side: the
median of interleaved repeats (``timing.interleaved_medians``), as ratios.

    python benchmarks/studies/representation_pi.py [--epochs 40] [--seed 0] [--repeats 100]
                                                   [--out FILE]

The teacher comes from ``--teacher-cache`` (default: the one ``gradbalance distill`` caches in
runs/mnist1d), trained there first when missing. Run with ``OMP_NUM_THREADS=1`` (``--threads``
sets torch's threads; 1 as in ``gradbalance distill``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gradbalance.experiments.config import DistillConfig
from gradbalance.experiments.data import Splits
from gradbalance.experiments.datasets import dataset, load_dataset, make_student
from gradbalance.experiments.methods import (
    METHODS,
    Balanced,
    MethodSettings,
    TeacherTargets,
    build,
    shared_representation,
)
from gradbalance.experiments.models import FeatureClassifier, Output
from gradbalance.experiments.teacher import load_or_train_teacher, teacher_schedule
from gradbalance.experiments.training import TrainConfig, train
from gradbalance.weighting import min_norm_weights

# The timing helper of the scripts, benchmarks/scripts/timing.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from timing import interleaved_medians

DEFAULTS = DistillConfig().resolved()
TIMED = ("mokd-exact", "mokd-representation", "kd-fixed")


def representation_weights(losses: list[torch.Tensor], output: Output) -> torch.Tensor:
    """π of representation mode for these losses (min_losses 0, as ``build`` sets none): the
    min-norm point of the Gram matrix of ``∇_z log L_i`` over z = the shared representation."""
    tensors = shared_representation(output)
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, tensors, retain_graph=True)
        row = torch.cat([grad.flatten() for grad in grads]).to(torch.float64)
        rows.append(row / loss.detach().to(torch.float64))
    jacobian = torch.stack(rows)
    return min_norm_weights(jacobian @ jacobian.T)


class Observed:
    """Exact mode's update, with representation mode's π computed first on the same graph."""

    def __init__(self, update: Balanced) -> None:
        self.update = update
        self.optimizer = update.optimizer
        self.exact: list[torch.Tensor] = []
        self.representation: list[torch.Tensor] = []

    def __call__(self, losses: list[torch.Tensor], output: Output) -> dict[str, torch.Tensor]:
        self.representation.append(representation_weights(losses, output))
        stats = self.update(losses, output)
        self.exact.append(stats["weights"].detach().clone())
        return stats


def settings() -> MethodSettings:
    return MethodSettings(
        DEFAULTS.lr, DEFAULTS.weight_decay, DEFAULTS.temperature, 0, DEFAULTS.normalize
    )


def student_for(splits: Splits, seed: int) -> FeatureClassifier:
    """The student ``gradbalance distill`` trains for ``seed`` (the same initialisation)."""
    torch.manual_seed(seed)
    return make_student(DEFAULTS.dataset, splits.input_shape, splits.num_classes).to(
        DEFAULTS.device
    )


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson's r; None where a series is constant (π at a vertex on every step)."""
    if a.std() == 0 or b.std() == 0:
        return None
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def describe(r: float | None) -> str:
    return "n/a (a constant series)" if r is None else f"{r:.3f}"


def agreement(exact: torch.Tensor, representation: torch.Tensor) -> dict[str, float | None]:
    """π_distill of the two modes compared over the steps."""
    delta = (exact - representation).abs()
    favoured = torch.sign(exact - 0.5) != torch.sign(representation - 0.5)
    return {
        "steps": len(exact),
        "pearson": pearson(exact, representation),
        "mean_abs_delta": delta.mean().item(),
        "median_abs_delta": delta.median().item(),
        "max_abs_delta": delta.max().item(),
        "disagree_share": favoured.double().mean().item(),
        "mean_pi_distill_exact": exact.mean().item(),
        "mean_pi_distill_representation": representation.mean().item(),
        "boundary_share_exact": ((exact == 0) | (exact == 1)).double().mean().item(),
        "boundary_share_representation": (
            ((representation == 0) | (representation == 1)).double().mean().item()
        ),
    }


def by_quarter(exact: torch.Tensor, representation: torch.Tensor) -> list[dict[str, float | None]]:
    quarters = torch.arange(len(exact)).tensor_split(4)
    return [
        {
            "steps": [int(q[0]), int(q[-1])],
            "pearson": pearson(exact[q], representation[q]),
            "mean_abs_delta": (exact[q] - representation[q]).abs().mean().item(),
        }
        for q in quarters
    ]


def step_times(
    splits: Splits, teacher: FeatureClassifier, seed: int, repeats: int
) -> dict[str, float]:
    """Median seconds of one training step of each method of :data:`TIMED` on one batch."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(splits.y_train), generator=generator)[: DEFAULTS.batch_size]
    inputs = dataset(DEFAULTS.dataset).augmentation(splits.x_train[index], generator)
    labels = splits.y_train[index]

    def step_of(name: str):
        student = student_for(splits, seed)
        objectives, update = build(
            METHODS[name], student, TeacherTargets(teacher, None), settings()
        )

        def step() -> None:
            output = student(inputs)
            update(objectives(output, inputs, labels, index), output)

        return step

    calls = {name: step_of(name) for name in TIMED}
    # Exact mode measures vmap against k passes on its first six steps: warm up past them.
    return interleaved_medians(calls, repeats, warmup=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument(
        "--teacher-cache",
        type=Path,
        default=DEFAULTS.out / f"teacher-{DEFAULTS.dataset}.pt",
        help="the teacher gradbalance distill caches (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=100, help="timing repeats (0: no timing)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    splits = load_dataset(DEFAULTS.dataset).to(DEFAULTS.device)
    spec = dataset(DEFAULTS.dataset)
    network = spec.teachers[DEFAULTS.teacher]
    args.teacher_cache.parent.mkdir(parents=True, exist_ok=True)
    teacher, cached = load_or_train_teacher(
        DEFAULTS.teacher,
        network,
        splits,
        teacher_schedule(network, DEFAULTS.teacher_epochs),
        spec.teacher_augmentation,
        args.teacher_cache,
    )
    student = student_for(splits, args.seed)
    targets = TeacherTargets(teacher, None)
    objectives, update = build(METHODS["mokd-exact"], student, targets, settings())
    observed = Observed(update)
    schedule = TrainConfig(args.epochs, DEFAULTS.batch_size, DEFAULTS.lr, DEFAULTS.weight_decay)
    history = train(student, objectives, observed, splits, schedule, args.seed, spec.augmentation)
    exact = torch.stack(observed.exact)[:, 0]
    representation = torch.stack(observed.representation)[:, 0]
    results = {
        "command": "python benchmarks/studies/representation_pi.py "
        f"--epochs {args.epochs} --seed {args.seed} --repeats {args.repeats}",
        "torch": torch.__version__,
        "threads": args.threads,
        "epochs": args.epochs,
        "seed": args.seed,
        "teacher_cached": cached,
        "final_accuracy_exact": history.final_accuracy,
        "train_seconds": history.seconds,
        "pi_distill": agreement(exact, representation),
        "pi_distill_by_quarter": by_quarter(exact, representation),
    }
    accuracy = history.final_accuracy
    print(f"mokd-exact seed {args.seed}, {args.epochs} epochs: accuracy {accuracy:.3f}")
    summary = results["pi_distill"]
    print(
        f"π_distill exact vs representation over {summary['steps']} steps: "
        f"Pearson {describe(summary['pearson'])}, mean |Δπ| {summary['mean_abs_delta']:.3f}, "
        f"max |Δπ| {summary['max_abs_delta']:.3f}, favour different objectives on "
        f"{100 * summary['disagree_share']:.1f} % of the steps"
    )
    print(
        f"mean π_distill: exact {summary['mean_pi_distill_exact']:.3f}, "
        f"representation {summary['mean_pi_distill_representation']:.3f}; at 0 or 1: exact "
        f"{100 * summary['boundary_share_exact']:.1f} %, representation "
        f"{100 * summary['boundary_share_representation']:.1f} %"
    )
    for quarter in results["pi_distill_by_quarter"]:
        first, last = quarter["steps"]
        print(
            f"  steps {first}-{last}: Pearson {describe(quarter['pearson'])}, "
            f"mean |Δπ| {quarter['mean_abs_delta']:.3f}"
        )
    if args.repeats:
        medians = step_times(splits, teacher, args.seed, args.repeats)
        exact_time, plain_time = medians["mokd-exact"], medians["kd-fixed"]
        results["step_seconds"] = medians
        results["step_ratio_to_exact"] = {name: t / exact_time for name, t in medians.items()}
        results["step_ratio_to_kd_fixed"] = {name: t / plain_time for name, t in medians.items()}
        print(
            f"one step, median of {args.repeats} interleaved repeats "
            "(ratio to mokd-exact, to kd-fixed):"
        )
        for name, seconds in medians.items():
            ratios = f"{seconds / exact_time:.2f}  {seconds / plain_time:.2f}"
            print(f"  {name:20s} {1e3 * seconds:7.2f} ms  {ratios}")
    results["wall_seconds"] = time.perf_counter() - start
    print(f"wall time {results['wall_seconds']:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
