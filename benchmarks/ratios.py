"""Timing ratios measured side by side: median of interleaved repeats, in one process.

    python benchmarks/ratios.py [--repeats 21] [--width 1024] [--depth 2]

Prints two markdown tables: the median step time of each workload divided by plain AdamW's, and
the Gram matrix (and Gram + combine) divided by one read of the k·n gradients — the memory-traffic
floor of any Gram computation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from workloads import Batch, workloads

from gradbalance import engine


def interleaved_medians(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, float]:
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def step_table(args: argparse.Namespace) -> None:
    medians = interleaved_medians(
        workloads(Batch(), width=args.width, depth=args.depth), args.repeats
    )
    baseline = medians["adamw (summed loss)"]
    print(f"\nMLP width {args.width}, depth {args.depth}, batch 256, k = 2")
    print("| workload | median step / AdamW step |")
    print("|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median / baseline:.2f} |")


def gram_table(args: argparse.Namespace) -> None:
    print("\nfloat32 gradients, one (k, n) block")
    print("| k | n | Gram / read once | Gram + combine / read once |")
    print("|---|---|---|---|")
    for k in (2, 3, 8):
        for n in (100_000, 1_000_000, 10_000_000):
            blocks = [torch.randn(k, n)]
            coefficients = torch.full((k,), 1 / k, dtype=torch.float64)
            medians = interleaved_medians(
                {
                    "read": blocks[0].sum,
                    "gram": lambda blocks=blocks: engine.gram_matrix(blocks),
                    "gram+combine": lambda blocks=blocks, c=coefficients: (
                        engine.gram_matrix(blocks),
                        engine.combine(blocks, c),
                    ),
                },
                args.repeats,
            )
            read = medians["read"]
            print(
                f"| {k} | {n:.0e} | {medians['gram'] / read:.2f} "
                f"| {medians['gram+combine'] / read:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    step_table(args)
    gram_table(args)


if __name__ == "__main__":
    main()
