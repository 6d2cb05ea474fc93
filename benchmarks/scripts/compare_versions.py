"""How far two versions of gradbalance drift apart on the same 60 steps: float rounding or not?

    git worktree add /tmp/old 410a083
    python benchmarks/scripts/compare_versions.py /tmp/old .

Trains the test problem of ``tests/helpers.py`` (float32, AdamW lr 1e-2) for 60 steps in exact and
amortized mode, once with each version's package (each run in its own interpreter), and prints the
largest difference of π over the steps and of the final parameters.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[2] / "tests"
STEPS = 60
RUN = f"""
import sys, torch
sys.path[:0] = [sys.argv[1], {str(TESTS)!r}]
import gradbalance
from gradbalance import MultiObjectiveOptimizer
assert gradbalance.__file__.startswith(sys.argv[1]), gradbalance.__file__  # the version asked for
from helpers import TeacherStudentProblem
out = {{}}
for mode in ("exact", "amortized"):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, lr=1e-2)
    weights = []
    for _ in range({STEPS}):
        opt.zero_grad()
        opt.backward(problem.losses())
        opt.step()
        weights.append(opt.weights.clone())
    out[mode] = (torch.stack(weights), [p.detach().clone() for p in problem.model.parameters()])
torch.save(out, sys.argv[2])
"""


def trajectories(checkout: str, path: str) -> dict:
    subprocess.run([sys.executable, "-c", RUN, str(Path(checkout).resolve()), path], check=True)
    return torch.load(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", help="a checkout of gradbalance (the folder holding gradbalance/)")
    parser.add_argument("second")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        first = trajectories(args.first, f"{folder}/first.pt")
        second = trajectories(args.second, f"{folder}/second.pt")
    for mode in first:
        pi = (first[mode][0] - second[mode][0]).abs().max().item()
        params = max(
            (a - b).abs().max().item()
            for a, b in zip(*(run[mode][1] for run in (first, second)), strict=True)
        )
        print(f"{mode}: max π difference {pi:.1e}, max parameter difference {params:.1e}")


if __name__ == "__main__":
    main()
