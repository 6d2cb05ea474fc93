"""Would a torch.compile'd Gram matrix pay on CPU? The measurement behind docs/performance.md.

    python benchmarks/studies/compiled_gram.py [--repeats 15]

The candidate computes the same float32 products of pieces of 4096 elements summed in float64 as
``gradbalance._kernels.torch_backend.gram``, written as elementwise products and sums that inductor
fuses into one loop over the buffer. Two tables, ratios of interleaved medians: the Gram matrix
alone against one read of a float32 ``(2, n)`` buffer, and the exact-mode step on the 1.6 M
parameter MLP with each Gram against plain AdamW.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from gradbalance import _kernels as kernels
from gradbalance._kernels import torch_backend

# The timing helpers and workloads of the scripts, benchmarks/scripts/{timing,workloads}.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from timing import interleaved_medians
from workloads import ADAMW, EXACT, Batch, workloads

PIECE = torch_backend.GRAM_BLOCK_SIZE


def _piece_products(pieces: torch.Tensor) -> torch.Tensor:
    """``G[i, j]`` for i ≤ j of ``pieces`` ``(k, P, PIECE)``: float32 per piece, float64 sums."""
    k = pieces.shape[0]
    pairs = [(pieces[i] * pieces[j]).sum(-1).double().sum() for i in range(k) for j in range(i, k)]
    return torch.stack(pairs)


_compiled_piece_products = torch.compile(_piece_products, dynamic=False)


def compiled_gram(flat: torch.Tensor) -> torch.Tensor:
    k, n = flat.shape
    whole = n - n % PIECE
    upper = _compiled_piece_products(flat[:, :whole].view(k, -1, PIECE))
    rows, cols = torch.triu_indices(k, k)
    gram = torch.zeros(k, k, dtype=torch.float64)
    gram[rows, cols] = upper
    gram[cols, rows] = upper
    rest = flat[:, whole:]
    return gram + (rest @ rest.T).double()


def gram_table(repeats: int) -> None:
    print("| n | eager Gram / read | compiled Gram / read | relative error of compiled G |")
    print("|---|---|---|---|")
    for n in (10**6, 10**7):
        flat = torch.randn(2, n)
        medians = interleaved_medians(
            {
                "read": flat.sum,
                "eager": lambda flat=flat: torch_backend.gram(flat),
                "compiled": lambda flat=flat: compiled_gram(flat),
            },
            repeats,
        )
        exact = flat.double() @ flat.double().T
        error = ((compiled_gram(flat) - exact).abs().max() / exact.abs().max()).item()
        read = medians["read"]
        print(
            f"| {n:.0e} | {medians['eager'] / read:.2f} | {medians['compiled'] / read:.2f} "
            f"| {error:.1e} |"
        )


def step_table(repeats: int) -> None:
    steps = workloads(Batch(), [ADAMW, EXACT], width=1024, depth=2)
    compiled_backend = SimpleNamespace(gram=compiled_gram, combine=torch_backend.combine)
    eager_exact = steps[EXACT]
    compiled_exact = workloads(Batch(), [EXACT], width=1024, depth=2)[EXACT]

    def with_backend(step, backend):
        def run() -> None:
            kernels.backend_for = lambda flat: backend
            step()

        return run

    medians = interleaved_medians(
        {
            ADAMW: steps[ADAMW],
            "exact, eager Gram": with_backend(eager_exact, torch_backend),
            "exact, compiled Gram": with_backend(compiled_exact, compiled_backend),
        },
        repeats,
    )
    print("\n| workload | median step / AdamW step |\n|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median / medians[ADAMW]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats\n")
    gram_table(args.repeats)
    step_table(args.repeats)


if __name__ == "__main__":
    main()
