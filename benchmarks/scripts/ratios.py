"""Timing ratios measured side by side: median of interleaved repeats, in one process.

    python benchmarks/scripts/ratios.py [--repeats 15] [--quick] [--tables step,n,k,gram]

Prints markdown tables, every figure a ratio of medians measured in the same interleaved loop:

- step: each workload's step time / plain AdamW's, MLP of 1.6 M parameters, k = 2;
- n: step time against n ≈ 1e5, 1e6, 1e7 parameters at k = 2;
- k: step time against k = 2, 3, 8 objectives at n ≈ 1e6;
- gram: ``kernels.gram`` (and Gram + ``kernels.combine`` into a preallocated buffer) / one read
  of the k·n gradients — the memory-traffic floor of any Gram computation.

``--quick`` runs tiny sizes with 3 repeats, as a smoke test.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from dataclasses import dataclass

import torch
from timing import interleaved_medians
from workloads import (
    ADAMW,
    AMORTIZED,
    EXACT,
    EXACT_HIDDEN,
    TORCHJD,
    Batch,
    gram_calls,
    mlp_shape,
    parameter_count,
    workloads,
)

TABLES = ("step", "n", "k", "gram")
SCALING_WORKLOADS = [ADAMW, AMORTIZED, EXACT, TORCHJD]
SCALING_COLUMNS = "amortized / AdamW | exact / AdamW | torchjd / AdamW | exact / torchjd"


@dataclass(frozen=True)
class Sizes:
    step_model: dict[str, int]  # mlp() keyword arguments of the step table
    ns: tuple[float, ...]  # target parameter counts of the n table (k = 2)
    ks: tuple[int, ...]  # objectives of the k table and of the Gram table
    k_table_n: float  # target parameter count of the k table
    gram_ns: tuple[int, ...]  # gradient lengths of the Gram table


FULL = Sizes({"width": 1024, "depth": 2}, (1e5, 1e6, 1e7), (2, 3, 8), 1e6, (10**5, 10**6, 10**7))
QUICK = Sizes({"width": 64, "depth": 2}, (1e4, 3e4), (2, 3, 8), 1e4, (10**3, 10**4))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def describe_model(model_kwargs: dict[str, int]) -> str:
    n = parameter_count(**model_kwargs)
    return f"{n:,} (width {model_kwargs['width']}, depth {model_kwargs['depth']})"


def power_of_ten(n: float) -> str:
    return f"{n:.0e}".replace("e+0", "e").replace("e+", "e")


def step_table(sizes: Sizes, repeats: int) -> None:
    medians = interleaved_medians(workloads(Batch(), **sizes.step_model), repeats)
    baseline = medians[ADAMW]
    print(f"\n### Step time, MLP n = {describe_model(sizes.step_model)}, batch 256, k = 2\n")
    print("| workload | median step / AdamW step |")
    print("|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median / baseline:.2f} |")
    print(f"\nexact / torchjd MGDA = {medians[EXACT] / medians[TORCHJD]:.2f}")
    print(f"exact, hidden layers only / exact = {medians[EXACT_HIDDEN] / medians[EXACT]:.2f}")


def scaling_row(label: str, num_losses: int, model_kwargs: dict[str, int], repeats: int) -> None:
    steps = workloads(Batch(num_losses), SCALING_WORKLOADS, **model_kwargs)
    medians = interleaved_medians(steps, repeats)
    adamw = medians[ADAMW]
    ratios = [medians[AMORTIZED] / adamw, medians[EXACT] / adamw, medians[TORCHJD] / adamw]
    ratios.append(medians[EXACT] / medians[TORCHJD])
    print(f"| {label} | " + " | ".join(f"{ratio:.2f}" for ratio in ratios) + " |")


def n_table(sizes: Sizes, repeats: int) -> None:
    print("\n### Step time against n (MLP depth 2, batch 256, k = 2)\n")
    print(f"| n | {SCALING_COLUMNS} |")
    print("|---|---|---|---|---|")
    for target in sizes.ns:
        model_kwargs = mlp_shape(target)
        scaling_row(describe_model(model_kwargs), 2, model_kwargs, repeats)


def k_table(sizes: Sizes, repeats: int) -> None:
    model_kwargs = mlp_shape(sizes.k_table_n)
    print(f"\n### Step time against k (MLP n = {describe_model(model_kwargs)}, batch 256)\n")
    print(f"| k | {SCALING_COLUMNS} |")
    print("|---|---|---|---|---|")
    for num_losses in sizes.ks:
        scaling_row(str(num_losses), num_losses, model_kwargs, repeats)


def gram_row(k: int, n: int, repeats: int) -> None:
    medians = interleaved_medians(gram_calls(k, n), repeats)
    gram, both = (medians[name] / medians["read once"] for name in ("gram", "gram + combine"))
    print(f"| {k} | {power_of_ten(n)} | {gram:.2f} | {both:.2f} |")


def gram_table(sizes: Sizes, repeats: int) -> None:
    print("\n### Gram matrix against one read, float32 gradients in one (k, n) buffer\n")
    print("| k | n | Gram / read once | Gram + combine / read once |")
    print("|---|---|---|---|")
    for k in sizes.ks:
        for n in sizes.gram_ns:
            gram_row(k, n, repeats)


def parse_tables(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    unknown = sorted(set(names) - set(TABLES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown tables {unknown}; choose from {TABLES}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="default 15, 3 with --quick")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--tables", type=parse_tables, default=list(TABLES), help="step,n,k,gram")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats or (3 if args.quick else 15)
    run = {"step": step_table, "n": n_table, "k": k_table, "gram": gram_table}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {repeats} repeats, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    for name in args.tables:
        start = time.perf_counter()
        run[name](sizes, repeats)
        print(f"\n({name}: {time.perf_counter() - start:.0f} s, peak RSS {peak_rss_gib():.2f} GiB)")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
