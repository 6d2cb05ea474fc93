"""Exact mode against its floor: step time and peak memory per workload and k, side by side.

    python benchmarks/scripts/floor.py [--repeats 21] [--ks 2,4,8] [--workloads mlp,cnn,transformer]
                                       [--quick] [--device cpu|cuda] [--json PATH]

For each workload (a model and a fixed batch) and each number of objectives k, every step variant
runs on its own copy of the model (same seed, same initial weights), all with fused AdamW
(lr 1e-4) as the base optimizer:

- plain: AdamW on the summed loss, the reference every ratio divides by;
- floor: one forward, then k ordinary backward passes accumulated into ``.grad``, one AdamW step:
  the cost any exact per-task method cannot go below without batching the k backward passes;
- exact, amortized: ``MultiObjectiveOptimizer(mode=...)``;
- torchjd: torchjd's autojac MGDA on the log-losses (``workloads.torchjd_step``);
- famo: FAMO (Liu et al. 2023) written by hand in a few lines, what it costs without gradbalance.

Two markdown tables: the median step time over plain's (interleaved repeats, every repeat in a
fresh random order, in one process), and the peak memory of one step above plain's, in units of
one float32 copy of the parameters (4n bytes). ``--quick`` runs tiny models at k = 2, 3 with 3
repeats, as a smoke test; ``--json PATH`` also writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timing import interleaved_medians, peak_bytes
from torch import nn
from workloads import Batch, Step, adamw_step, gradbalance_step, torchjd_step

from gradbalance import MultiObjectiveOptimizer

PLAIN = "plain"
RATIO = "exact / floor"
# Two warm-up steps: the first creates the optimizer state and buffers, the second runs as every
# later one does (the allocator has seen the step once).
WARMUP = 2


@dataclass(frozen=True)
class Workload:
    """A model builder and its fixed batch: ``size`` inputs of shape ``features``."""

    model: Callable[[], nn.Module]
    features: int | tuple[int, ...]
    size: int
    classes: int
    description: str


def mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them, seeded."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for inputs, outputs in itertools.pairwise(widths[:-1]):
        layers += [nn.Linear(inputs, outputs), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def cnn(channels: tuple[int, ...], side: int, hidden: int, classes: int) -> nn.Sequential:
    """3×3 convolutions + ReLU + 2×2 max-pooling per entry of ``channels``, then two linears."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for inputs, outputs in zip((3, *channels[:-1]), channels, strict=True):
        layers += [nn.Conv2d(inputs, outputs, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    pooled = side // 2 ** len(channels)
    layers += [nn.Flatten(), nn.Linear(channels[-1] * pooled**2, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, classes))
    return nn.Sequential(*layers)


class PooledTransformer(nn.Module):
    """``nn.TransformerEncoder`` (batch first), mean over the sequence, a linear head."""

    def __init__(self, width: int, layers: int, heads: int, feedforward: int, classes: int):
        super().__init__()
        # No dropout: every variant and every repeat then computes the same step on the same
        # batch; dropout's masks would add the same cost to all of them.
        layer = nn.TransformerEncoderLayer(width, heads, feedforward, dropout=0.0, batch_first=True)
        # enable_nested_tensor only matters with a padding mask, which these inputs have none of.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(inputs).mean(dim=1))


def transformer(
    width: int, layers: int, heads: int, feedforward: int, classes: int
) -> PooledTransformer:
    torch.manual_seed(0)
    return PooledTransformer(width, layers, heads, feedforward, classes)


def full_workloads(sizes: dict[str, int] | None = None) -> dict[str, Workload]:
    """The three workloads of docs/performance.md; ``sizes`` overrides batch sizes by name."""
    sizes = {"mlp": 128, "cnn": 64, "transformer": 32, **(sizes or {})}
    return {
        "mlp": Workload(
            partial(mlp, (256, 1024, 1024, 1024, 100)),
            256,
            sizes["mlp"],
            100,
            f"MLP 256-1024-1024-1024-100 (ReLU), batch {sizes['mlp']}",
        ),
        "cnn": Workload(
            partial(cnn, (32, 64, 128), 32, 128, 100),
            (3, 32, 32),
            sizes["cnn"],
            100,
            "CNN: conv3×3 3→32→64→128, each + ReLU + max-pool 2, linear 2048→128→100, "
            f"3×32×32 inputs, batch {sizes['cnn']}",
        ),
        "transformer": Workload(
            partial(transformer, 256, 4, 8, 1024, 100),
            (64, 256),
            sizes["transformer"],
            100,
            "nn.TransformerEncoder: 4 layers, d_model 256, 8 heads, feed-forward 1024, no dropout, "
            f"sequence 64, mean-pool + linear 256→100, batch {sizes['transformer']}",
        ),
    }


def quick_workloads() -> dict[str, Workload]:
    """Tiny versions of the three, for a smoke test."""
    return {
        "mlp": Workload(partial(mlp, (32, 64, 64, 10)), 32, 16, 10, "MLP 32-64-64-10, batch 16"),
        "cnn": Workload(
            partial(cnn, (4, 8, 8), 8, 16, 10), (3, 8, 8), 8, 10, "CNN 3→4→8→8, 3×8×8, batch 8"
        ),
        "transformer": Workload(
            partial(transformer, 16, 2, 2, 32, 10),
            (8, 16),
            4,
            10,
            "TransformerEncoder: 2 layers, d_model 16, sequence 8, batch 4",
        ),
    }


@dataclass(frozen=True)
class Problem:
    """One workload at one k on one device: what every variant's step is built from."""

    workload: Workload
    k: int
    batch: Batch
    device: torch.device

    @classmethod
    def build(cls, workload: Workload, k: int, device: torch.device) -> Problem:
        batch = Batch(k, workload.features, workload.classes, workload.size, device)
        return cls(workload, k, batch, device)

    def model(self) -> nn.Module:
        """A fresh copy of the model, with the same initial weights every time."""
        return self.workload.model().to(self.device)


def plain(problem: Problem) -> Step:
    """AdamW on the summed loss."""
    return adamw_step(problem.batch, problem.model())


def floor(problem: Problem) -> Step:
    """One forward, k ordinary backward passes into ``.grad`` (the graph kept until the last)."""
    model = problem.model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        optimizer.zero_grad()
        losses = problem.batch.losses(model)
        for index, loss in enumerate(losses):
            loss.backward(retain_graph=index < len(losses) - 1)
        optimizer.step()

    return step


def balanced(mode: str, vectorize: bool | None = None) -> Callable[[Problem], Step]:
    """The builder of ``MultiObjectiveOptimizer(mode=mode, vectorize=vectorize)``'s step.

    With ``vectorize=None`` exact mode chooses between the vmapped backward and k passes on its
    first step (``gradbalance._per_task``; versions before issue 17 timed their first six); the
    builder runs the steps until the choice is made, so that what is timed is the step of the
    choice.
    """

    def build(problem: Problem) -> Step:
        model = problem.model()
        optimizer = MultiObjectiveOptimizer(
            model.parameters(), mode=mode, vectorize=vectorize, lr=1e-4, fused=True
        )
        step = gradbalance_step(problem.batch, model, optimizer)
        while mode == "exact" and optimizer.balancer.vectorize is None:
            step()
        if mode == "exact" and vectorize is None:
            CHOICES[(problem.workload.description, problem.k)] = optimizer.balancer.vectorize
        return step

    return build


def representation(problem: Problem) -> Step:
    """Representation mode, the model's outputs (which every loss reads) as the representation."""
    model = problem.model()
    optimizer = MultiObjectiveOptimizer(
        model.parameters(), mode="representation", lr=1e-4, fused=True
    )

    def step() -> None:
        optimizer.zero_grad()
        outputs = model(problem.batch.inputs)
        optimizer.backward(problem.batch.losses_of(outputs), representation=outputs)
        optimizer.step()

    return step


def torchjd(problem: Problem) -> Step:
    return torchjd_step(problem.batch, problem.model())


def famo(problem: Problem, lr: float = 0.025, weight_decay: float = 0.001) -> Step:
    """FAMO by hand: one backward of Σ c_i L_i, c ∝ π_i / L_i; w from the log-loss decrease.

    π = softmax(w); w steps with Adam (L2 weight decay, as FAMO's code) on the gradient
    J_softmax(w)ᵀ δ, δ_i = log L_i(previous step) − log L_i(this step).
    """
    model = problem.model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    logits = torch.zeros(problem.k, device=problem.device, requires_grad=True)
    logit_optimizer = torch.optim.Adam([logits], lr=lr, weight_decay=weight_decay)
    previous: list[torch.Tensor] = []  # the last step's log-losses

    def step() -> None:
        optimizer.zero_grad()  # first, as the other variants: the old .grad is freed before forward
        losses = torch.stack(problem.batch.losses(model))
        log_losses = (losses.detach() + 1e-8).log()
        if previous:  # δ = the decrease since the last step; w's gradient is J_softmax(w)ᵀ δ
            logit_optimizer.zero_grad()
            torch.softmax(logits, dim=0).backward(previous.pop() - log_losses)
            logit_optimizer.step()
        previous.append(log_losses)
        weights = torch.softmax(logits.detach(), dim=0) / (losses.detach() + 1e-8)
        (weights / weights.sum() * losses).sum().backward()
        optimizer.step()

    return step


# The variants, in the order of the tables' columns; plain is the reference of every ratio. A new
# variant is one more entry: its column appears in both tables and in the JSON.
VARIANTS: dict[str, Callable[[Problem], Step]] = {
    PLAIN: plain,
    "exact": balanced("exact"),
    "floor": floor,
    "exact vmap": balanced("exact", vectorize=True),
    "exact passes": balanced("exact", vectorize=False),
    "torchjd": torchjd,
    "amortized": balanced("amortized"),
    "famo": famo,
    "representation": representation,
}
# The per-task backward exact mode chose (True: vmapped), by (workload description, k).
CHOICES: dict[tuple[str, int], bool | None] = {}


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def measure(
    name: str, workload: Workload, k: int, device: torch.device, repeats: int
) -> dict[str, Any]:
    """One row of both tables: every variant's median step time and peak memory at this k."""
    problem = Problem.build(workload, k, device)
    n = parameter_count(workload.model())
    synchronize = torch.cuda.synchronize if device.type == "cuda" else None
    steps = {variant: build(problem) for variant, build in VARIANTS.items()}
    seconds = interleaved_medians(steps, repeats, WARMUP, synchronize)
    del steps  # every variant's model and state: the memory is measured one variant at a time
    release(device)
    peaks = {}
    for variant, build in VARIANTS.items():
        peaks[variant] = peak_bytes(partial(build, problem), device)
        release(device)
    time_ratios = {variant: seconds[variant] / seconds[PLAIN] for variant in VARIANTS}
    time_ratios[RATIO] = seconds["exact"] / seconds["floor"]
    memory = {variant: (peaks[variant] - peaks[PLAIN]) / (4 * n) for variant in VARIANTS}
    return {
        "workload": name,
        "k": k,
        "n": n,
        "exact vectorize": CHOICES.get((workload.description, k)),
        "seconds": seconds,
        "time": time_ratios,
        "peak_bytes": peaks,
        "memory": memory,
    }


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_columns() -> list[str]:
    """Every variant but plain, with exact / floor right after floor."""
    columns = [variant for variant in VARIANTS if variant != PLAIN]
    columns.insert(columns.index("floor") + 1, RATIO)
    return columns


def time_table(rows: list[dict[str, Any]]) -> str:
    """Median step time / plain's; exact / floor is exact's median over floor's."""
    columns = time_columns()
    lines = [
        "| workload | k | n | exact chose | " + " | ".join(columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for row in rows:
        chose = {True: "vmap", False: "passes"}.get(row["exact vectorize"], "?")
        cells = " | ".join(f"{row['time'][column]:.2f}" for column in columns)
        lines.append(f"| {row['workload']} | {row['k']} | {row['n']:,} | {chose} | {cells} |")
    return "\n".join(lines)


def memory_table(rows: list[dict[str, Any]]) -> str:
    """Peak memory of one step minus plain's, in float32 copies of the parameters (4n bytes)."""
    columns = [variant for variant in VARIANTS if variant != PLAIN]
    lines = [
        "| workload | k | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = " | ".join(f"{row['memory'][column]:.2f}" for column in columns)
        lines.append(f"| {row['workload']} | {row['k']} | {cells} |")
    return "\n".join(lines)


def environment(device: torch.device, repeats: int) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "load_average": os.getloadavg()[0],
    }


def run(
    workloads: dict[str, Workload],
    ks: list[int],
    device: torch.device,
    repeats: int,
    deadline: float = math.inf,
) -> dict[str, Any]:
    """Every (workload, k) row; rows not started by ``deadline`` (time.monotonic) are left out."""
    rows, skipped = [], []
    for name, workload in workloads.items():
        for k in ks:
            if time.monotonic() > deadline:
                skipped.append({"workload": name, "k": k})
                continue
            rows.append(measure(name, workload, k, device, repeats))
    return {
        "environment": environment(device, repeats),
        "workloads": {
            name: {"description": workload.description, "n": parameter_count(workload.model())}
            for name, workload in workloads.items()
        },
        "rows": rows,
        "skipped": skipped,
    }


def report(results: dict[str, Any]) -> str:
    """Both tables as markdown, with the workloads and the environment they were measured in."""
    env = results["environment"]
    lines = [
        f"{env['device']}, torch {env['torch']}, {env['threads']} threads, median of "
        f"{env['repeats']} interleaved repeats, load average {env['load_average']:.2f}",
        "",
        *(
            f"- {name}: {spec['description']}, n = {spec['n']:,}"
            for name, spec in results["workloads"].items()
        ),
        "",
        "### Step time / plain AdamW step",
        "",
        time_table(results["rows"]),
        "",
        "### Peak memory above plain, in float32 copies of the parameters (4n bytes)",
        "",
        memory_table(results["rows"]),
    ]
    if results["skipped"]:
        left_out = ", ".join(f"{row['workload']} k = {row['k']}" for row in results["skipped"])
        lines += ["", f"Not measured (out of time): {left_out}"]
    return "\n".join(lines)


def parse_list(text: str, choices: tuple[str, ...] | None = None) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(choices)) if choices else []
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {choices}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="default 21, 3 with --quick")
    parser.add_argument("--ks", type=lambda text: [int(k) for k in parse_list(text)], default=None)
    parser.add_argument(
        "--workloads",
        type=partial(parse_list, choices=("mlp", "cnn", "transformer")),
        default=["mlp", "cnn", "transformer"],
    )
    parser.add_argument("--quick", action="store_true", help="tiny models, k = 2, 3: a smoke test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    specs = quick_workloads() if args.quick else full_workloads()
    ks = args.ks or ([2, 3] if args.quick else [2, 4, 8])
    repeats = args.repeats or (3 if args.quick else 21)
    start = time.perf_counter()
    results = run(
        {name: specs[name] for name in args.workloads}, ks, torch.device(args.device), repeats
    )
    results["seconds"] = time.perf_counter() - start
    print(report(results))
    print(f"\n({results['seconds']:.0f} s, load average at the end {os.getloadavg()[0]:.2f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
