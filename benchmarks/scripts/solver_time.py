"""Time per solve of ``min_norm_weights`` (CPU), median of interleaved repeats, in one process.

    python benchmarks/scripts/solver_time.py [--repeats 21] [--instances 8] [--no-old]

For k = 3, 8, 16, 32 it draws ``--instances`` random Gram matrices (n = 2k Gaussian gradients,
row norms 10^U(−3, 3)); one sample is the time to solve them all, divided by their number. The
samples of every (solver, k) pair are taken in an interleaved loop, so drifts in the machine's
speed hit all of them alike. For comparison it also times the face enumeration of 2^k − 1 faces
that ``min_norm_weights`` used before, read with ``git show REF:gradbalance/weighting.py``
(``--old-ref``, default HEAD); it refuses k > 16, and its k = 16 solves make the run take
minutes. ``--no-old`` skips it (seconds).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from gradbalance.weighting import min_norm_weights

TASKS = (3, 8, 16, 32)
OLD_MAX_TASKS = 16


def gram_matrices(k: int, count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    matrices = []
    for _ in range(count):
        jacobian = torch.randn(k, 2 * k, generator=generator, dtype=torch.float64)
        jacobian *= 10.0 ** (6 * torch.rand(k, 1, generator=generator, dtype=torch.float64) - 3)
        matrices.append(jacobian @ jacobian.T)
    return matrices


def old_module(ref: str) -> ModuleType:
    """``gradbalance/weighting.py`` at git ``ref``, imported from a temporary file."""
    root = Path(__file__).resolve().parents[2]
    source = subprocess.run(
        ["git", "show", f"{ref}:gradbalance/weighting.py"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_weighting.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_weighting", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interleaved_medians(
    calls: dict[tuple[str, int], Callable[[], object]],
    repeats: int,
    per_call: dict[tuple[str, int], int],
) -> dict[tuple[str, int], float]:
    """Median seconds per solve of each call; the order rotates every repeat."""
    keys = list(calls)
    for key in keys:  # warm-up: imports, caches (the old face masks), allocator
        calls[key]()
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
    for repeat in range(repeats):
        for key in keys[repeat % len(keys) :] + keys[: repeat % len(keys)]:
            start = time.perf_counter()
            calls[key]()
            samples[key].append((time.perf_counter() - start) / per_call[key])
    return {key: statistics.median(values) for key, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--no-old", action="store_true", help="skip the old face enumeration")
    parser.add_argument("--old-ref", default="HEAD", help="git ref of the old weighting.py")
    args = parser.parse_args()

    solvers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"new": min_norm_weights}
    if not args.no_old:
        solvers["old"] = old_module(args.old_ref).min_norm_weights
    calls, per_call = {}, {}
    for k in TASKS:
        matrices = gram_matrices(k, args.instances, seed=k)
        for name, solve in solvers.items():
            if name == "old" and k > OLD_MAX_TASKS:
                continue
            calls[name, k] = lambda solve=solve, matrices=matrices: [solve(g) for g in matrices]
            per_call[name, k] = len(matrices)
    medians = interleaved_medians(calls, args.repeats, per_call)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, python "
        f"{sys.version.split()[0]}; median of {args.repeats} interleaved repeats, "
        f"{args.instances} Gram matrices each"
    )
    print()
    print("| k | new (ms / solve) | old enumeration (ms / solve) | old / new |")
    print("|---|---|---|---|")
    for k in TASKS:
        new = medians["new", k] * 1e3
        old = medians.get(("old", k))
        old_text = f"{old * 1e3:.3f}" if old is not None else "refused (k > 16)"
        ratio = f"{old * 1e3 / new:.0f}×" if old is not None else "–"
        if args.no_old:
            old_text, ratio = "not run", "–"
        print(f"| {k} | {new:.3f} | {old_text} | {ratio} |")


if __name__ == "__main__":
    main()
