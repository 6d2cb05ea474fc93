"""Step time of two versions of gradbalance side by side, in one process, interleaved.

    git worktree add /tmp/old <commit>
    python benchmarks/scripts/compare_step_time.py /tmp/old [--repeats 21]
    python benchmarks/scripts/compare_step_time.py /tmp/old --this /tmp/old   # A/A: the noise floor

Loads the other checkout's package under another name next to this one and times, on the same
batch, plain AdamW and each version's exact and amortized steps (the workloads of
``workloads.py``), every repeat in a fresh random order. Prints this version's median step /
the other's, and both against AdamW: the check that a change made no step slower.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from timing import interleaved_medians
from workloads import Batch, mlp, mlp_shape, parameter_count, plain_adamw

# (label, number of losses, mlp() keyword arguments)
CASES = [
    ("MLP 1.6 M, k = 2", 2, {"width": 1024, "depth": 2}),
    ("MLP 1e5, k = 2", 2, mlp_shape(1e5)),
    ("MLP 1e7, k = 2", 2, mlp_shape(1e7)),
    ("MLP 1e6, k = 8", 8, mlp_shape(1e6)),
]
MODES = ("amortized", "exact")


def load_package(checkout: Path, name: str) -> ModuleType:
    """The ``gradbalance`` package of ``checkout``, imported as module ``name``."""
    root = checkout.resolve() / "gradbalance"
    spec = importlib.util.spec_from_file_location(
        name, root / "__init__.py", submodule_search_locations=[str(root)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def balanced_step(package: ModuleType, batch: Batch, mode: str, **model_kwargs: int):
    model = mlp(**model_kwargs)
    optimizer = package.MultiObjectiveOptimizer(model.parameters(), mode=mode, lr=1e-4, fused=True)

    def step() -> None:
        optimizer.zero_grad()
        optimizer.backward(batch.losses(model))
        optimizer.step()

    # Exact mode may time its first steps to choose its per-task backward: past that, first.
    while mode == "exact" and optimizer.balancer.vectorize is None:
        step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout (e.g. a git worktree)")
    parser.add_argument(
        "--this",
        type=Path,
        default=Path(__file__).resolve().parents[2],
        help="default: this checkout",
    )
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    versions = {
        "this": load_package(args.this, "gradbalance_this"),
        "other": load_package(args.other, "gradbalance_other"),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print("\n| workload | mode | this / other | this / AdamW | other / AdamW |")
    print("|---|---|---|---|---|")
    for label, num_losses, model_kwargs in CASES:
        batch = Batch(num_losses)
        calls = {"adamw": plain_adamw(batch, **model_kwargs)}
        for version, package in versions.items():
            for mode in MODES:
                calls[version, mode] = balanced_step(package, batch, mode, **model_kwargs)
        medians = interleaved_medians(calls, args.repeats)
        n = parameter_count(**model_kwargs)
        for mode in MODES:
            this, other = medians["this", mode], medians["other", mode]
            adamw = medians["adamw"]
            print(
                f"| {label} (n = {n:,}) | {mode} | {this / other:.3f} | {this / adamw:.2f} | "
                f"{other / adamw:.2f} |"
            )


if __name__ == "__main__":
    main()
