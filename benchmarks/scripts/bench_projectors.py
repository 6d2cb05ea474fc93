"""Projector cost and accuracy per geotorch trivialization (docs/projectors.md quotes its output).

    python benchmarks/scripts/bench_projectors.py [--teacher-dim 3024] [--student-dim 192]
                                                  [--batch 256] [--repeats 5] [--trivs cayley expm]

1. One training step, ``proj.loss(z_s, z_t)`` forward + backward on pooled (B, C) features, for
   ``triv="cayley"`` and ``"expm"`` (median of ``--repeats``; expm once, it is slow), and the
   frozen forward used for evaluation.
2. Orthonormality max |PᵀP − I| of both Stiefel matrices after 100 Adam steps at n = 256.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from gradbalance import IndefiniteSubspaceProjector


def seconds(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def orthonormality_error(matrix: torch.Tensor) -> float:
    eye = torch.eye(matrix.shape[1], dtype=matrix.dtype)
    return (matrix.T @ matrix - eye).abs().max().item()


def step_times(args: argparse.Namespace, triv: str, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    proj = IndefiniteSubspaceProjector(args.teacher_dim, args.student_dim, triv=triv)
    z_s = torch.randn(args.batch, args.student_dim, requires_grad=True)
    z_t = torch.randn(args.batch, args.teacher_dim)
    with torch.no_grad():  # move off the zero skew matrix, where expm is trivially cheap
        for param in proj.parameters():
            param.add_(0.01 * torch.randn_like(param))
    losses = []
    forward = seconds(lambda: losses.append(proj.loss(z_s, z_t)), repeats)
    backward = seconds(lambda: losses.pop().backward(), repeats)
    return forward, backward


def frozen_forward_time(args: argparse.Namespace, repeats: int) -> float:
    proj = IndefiniteSubspaceProjector(args.teacher_dim, args.student_dim).freeze()
    z_s = torch.randn(args.batch, args.student_dim)
    z_t = torch.randn(args.batch, args.teacher_dim)
    with torch.no_grad():
        return seconds(lambda: proj.loss(z_s, z_t), repeats)


def error_after_training(triv: str, dim: int = 256, steps: int = 100) -> float:
    torch.manual_seed(0)
    proj = IndefiniteSubspaceProjector(dim, dim // 4, triv=triv)
    opt = torch.optim.Adam(proj.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        proj.loss(torch.randn(64, dim // 4), torch.randn(64, dim)).backward()
        opt.step()
    with torch.no_grad():
        matrices = (proj.teacher_projection, proj.student_projection)
        return max(orthonormality_error(matrix) for matrix in matrices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-dim", type=int, default=3024)
    parser.add_argument("--student-dim", type=int, default=192)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    trivs = ["cayley", "expm"]
    parser.add_argument("--trivs", nargs="+", choices=trivs, default=trivs)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; n_t={args.teacher_dim} "
        f"n_s={args.student_dim} n={max(args.teacher_dim, args.student_dim)} B={args.batch}; "
        f"load average before {os.getloadavg()[0]:.1f}"
    )
    print("| triv | forward s | backward s | forward+backward s | max abs(PᵀP − I), n=256 |")
    print("|---|---|---|---|---|")
    for triv in args.trivs:
        repeats = 1 if triv == "expm" else args.repeats
        forward, backward = step_times(args, triv, repeats)
        error = error_after_training(triv)
        total = forward + backward
        print(f"| {triv} | {forward:.2f} | {backward:.2f} | {total:.2f} | {error:.1e} |")
    frozen = frozen_forward_time(args, args.repeats)
    print(f"frozen (evaluation) forward: {frozen * 1e3:.1f} ms")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
