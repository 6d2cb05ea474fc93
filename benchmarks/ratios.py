"""Step-time ratios measured side by side: median of interleaved repeats, in one process.

    python benchmarks/ratios.py [--repeats 21] [--width 1024] [--depth 2]

Prints a markdown table of the median step time of each workload divided by plain AdamW's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from workloads import Batch, workloads


def interleaved_medians(steps: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args()
    steps = workloads(Batch(), width=args.width, depth=args.depth)
    medians = interleaved_medians(steps, args.repeats)
    baseline = medians["adamw (summed loss)"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"MLP width {args.width} depth {args.depth}, {args.repeats} interleaved repeats"
    )
    print("| workload | median step / AdamW step |")
    print("|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median / baseline:.2f} |")


if __name__ == "__main__":
    main()
