"""GPU time of the fused operations, Triton against torch, as multiples of one read of the buffer.

    python benchmarks/scripts/bench_triton.py [--tasks 2 3 8] [--sizes 1e5 1e6 1e7 1e8]
                                              [--repeats 25]

For each k and n, on a float32 ``(k, n)`` buffer: ``flat.sum()`` (one read of k·n values, the
floor for both operations), the Triton and torch Gram matrices, and the Triton and torch
``combine(..., accumulate=False)``. Each repeat times every operation once, in turn (interleaved,
so that clock and thermal drift fall on all alike), after flushing the L2 cache; the table gives
the median. Sizes whose buffers do not fit in a third of the free GPU memory are skipped. Needs a
CUDA GPU; elsewhere it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from gradbalance._kernels import torch_backend

OPERATIONS = ("read", "triton gram", "torch gram", "triton combine", "torch combine")
# Larger than any current GPU's L2 cache: writing it evicts the buffer under test.
L2_FLUSH_BYTES = 256 * 2**20


def operations(flat: torch.Tensor) -> dict[str, Callable[[], object]]:
    from gradbalance._kernels import triton_backend

    k, n = flat.shape
    coefficients = torch.full((k,), 1 / k, dtype=torch.float64, device=flat.device)
    out = torch.empty(n, dtype=flat.dtype, device=flat.device)
    return {
        "read": flat.sum,
        "triton gram": lambda: triton_backend.gram(flat),
        "torch gram": lambda: torch_backend.gram(flat),
        "triton combine": lambda: triton_backend.combine(flat, coefficients, out, accumulate=False),
        "torch combine": lambda: torch_backend.combine(flat, coefficients, out, accumulate=False),
    }


def median_seconds(ops: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for op in ops.values():  # compile the Triton kernels, warm cuBLAS
        op()
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, op in ops.items():
            # Also keeps the GPU busy while the host launches op: host overhead is not timed.
            flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            op()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / 1e3)
    return {name: statistics.median(times) for name, times in samples.items()}


def fits(k: int, n: int) -> bool:
    """Room for the buffer three times over: the torch Gram copies it when n % 4096 != 0."""
    free, _ = torch.cuda.mem_get_info()
    return 3 * k * n * 4 + L2_FLUSH_BYTES < free


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 8])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7, 1e8])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA GPU here; nothing to measure.")
        return
    import triton

    print(
        f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
        f"float32, median of {args.repeats} interleaved repeats, L2 flushed before each"
    )
    print("| k | n | read µs | read GB/s | " + " | ".join(OPERATIONS[1:]) + " |")
    print("|---|---|---|---|" + "---|" * (len(OPERATIONS) - 1))
    for k in args.tasks:
        for n in map(int, args.sizes):
            if not fits(k, n):
                print(f"| {k} | {n:.0e} | skipped: not enough GPU memory |")
                continue
            generator = torch.Generator(device="cuda").manual_seed(0)
            flat = torch.randn(k, n, device="cuda", generator=generator)
            times = median_seconds(operations(flat), args.repeats)
            read = times["read"]
            ratios = " | ".join(f"{times[name] / read:.2f}×" for name in OPERATIONS[1:])
            bandwidth = k * n * 4 / read / 1e9
            print(f"| {k} | {n:.0e} | {read * 1e6:.1f} | {bandwidth:.0f} | {ratios} |")
            del flat
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
