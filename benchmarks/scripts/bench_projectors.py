"""Projector cost per parametrisation, as a ratio to an unconstrained linear projection.

    python benchmarks/scripts/bench_projectors.py [--repeats 7] [--trivs qr cayley]
                                                  [--threads 1] [--device cpu|cuda] [--quick]

For each shape (n_t, n_s, batch[, tokens]) in ``SHAPES`` it times one training step of
``proj.loss(z_s, z_t)``, forward + backward, for every ``--trivs`` parametrisation and for the
same loss with unconstrained matrices of the same shapes (``linear``: W_t (n × n_t), W_s (n × n_s)
and the metric as plain parameters) — the floor a projector cannot beat. Every repeat first
moves all parameters (a stand-in for the optimizer step, outside the clock), so each timed call
recomputes its frames as a real step does; the calls of one repeat run interleaved in a random
order and the table gives medians and each ratio to ``linear``. It also prints the memory each
projector holds between steps (parameters, buffers, cached frames) and max |PᵀP − I| after 200
AdamW steps at (256, 800). ``projector_table`` is what ``gpu_check.py`` runs on CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians

from gradbalance import IndefiniteSubspaceProjector
from gradbalance.frames import QRFrame


@dataclass(frozen=True)
class Shape:
    teacher_dim: int
    student_dim: int
    batch: int
    tokens: int = 0  # > 0: tokens="each" with this many tokens per sample
    label: str = ""
    target: float | None = None  # the target ratio for the default parametrisation


SHAPES = (
    Shape(256, 800, 256, label="MNIST (ours)", target=6.0),
    Shape(384, 192, 256, label="ViT-S → DeiT-Ti"),
    Shape(768, 192, 256, label="ViT-B → DeiT-Ti", target=6.0),
    Shape(3024, 192, 128, label="RegNetY-160 → DeiT-Ti", target=40.0),
    Shape(768, 192, 8, tokens=197, label="ViT-B → DeiT-Ti, tokens='each'"),
)
QUICK_SHAPES = (Shape(64, 96, 32, label="quick"), Shape(48, 16, 4, tokens=9, label="quick tokens"))


class LinearFloor(nn.Module):
    """The projector's loss with unconstrained matrices: what the same shapes cost at least."""

    def __init__(self, proj: IndefiniteSubspaceProjector) -> None:
        super().__init__()
        self.teacher = nn.Parameter(proj.teacher_projection.detach().clone())
        self.student = nn.Parameter(proj.student_projection.detach().clone())
        self.metric = nn.Parameter(proj.metric.detach().clone())

    def loss(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        target = F.layer_norm(z_t, z_t.shape[-1:]) @ self.teacher.mT
        return F.smooth_l1_loss((z_s @ self.student.mT) * self.metric, target)


def held_bytes(module: nn.Module) -> int:
    """Bytes of parameters, buffers and cached frames the module keeps between steps."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    for sub in module.modules():
        if isinstance(sub, QRFrame) and sub.cached_frame is not None:
            tensors[id(sub.cached_frame)] = sub.cached_frame
    return sum(t.numel() * t.element_size() for t in tensors.values())


def training_call(module: nn.Module, z_s: Tensor, z_t: Tensor) -> Callable[[], None]:
    def call() -> None:
        module.loss(z_s, z_t).backward()

    return call


def move_all(modules: list[nn.Module]) -> None:
    """A stand-in for an optimizer step: every parameter changes in place."""
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.add_(param, alpha=1e-4)
                param.grad = None


def projector_table(
    shapes: tuple[Shape, ...], trivs: list[str], repeats: int, device: torch.device
) -> list[dict]:
    """Per shape: median seconds of each parametrisation and of ``linear``, ratios, memory."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        tokens = "each" if shape.tokens else "pool"
        lead = (shape.batch, shape.tokens) if shape.tokens else (shape.batch,)
        z_s = torch.randn(*lead, shape.student_dim, device=device, requires_grad=True)
        z_t = torch.randn(*lead, shape.teacher_dim, device=device)
        projectors = {
            triv: IndefiniteSubspaceProjector(
                shape.teacher_dim, shape.student_dim, tokens=tokens, triv=triv, device=device
            )
            for triv in trivs
        }
        modules = {"linear": LinearFloor(next(iter(projectors.values()))), **projectors}
        calls = {name: training_call(module, z_s, z_t) for name, module in modules.items()}
        seconds = {name: [] for name in calls}
        for _ in range(repeats):  # one sample each, after a fresh "step" of every module
            move_all(list(modules.values()))
            for name, time in interleaved_medians(calls, 1, warmup=0, synchronize=sync).items():
                seconds[name].append(time)
        medians = {name: sorted(times)[len(times) // 2] for name, times in seconds.items()}
        rows.append(
            {
                "shape": shape,
                "seconds": medians,
                "ratio": {name: medians[name] / medians["linear"] for name in projectors},
                "bytes": {name: held_bytes(module) for name, module in modules.items()},
            }
        )
    return rows


def orthonormality_after_training(triv: str, steps: int = 200) -> float:
    torch.manual_seed(0)
    proj = IndefiniteSubspaceProjector(256, 800, triv=triv)
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        proj.loss(torch.randn(64, 800), torch.randn(64, 256)).backward()
        opt.step()
    with torch.no_grad():
        errors = []
        for frame in (proj.teacher_projection, proj.student_projection):
            eye = torch.eye(frame.shape[1])
            errors.append((frame.mT @ frame - eye).abs().max().item())
    return max(errors)


def markdown(rows: list[dict], trivs: list[str]) -> str:
    head = "| n_t | n_s | B | tokens | case | linear ms | "
    head += " | ".join(f"{triv} ms | {triv} ×" for triv in trivs) + " | target × | MB held |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        shape, ms = row["shape"], {k: v * 1e3 for k, v in row["seconds"].items()}
        cells = [
            f"{ms[triv]:.1f} | **{row['ratio'][triv]:.1f}**"
            if i == 0
            else f"{ms[triv]:.1f} | {row['ratio'][triv]:.1f}"
            for i, triv in enumerate(trivs)
        ]
        held = ", ".join(f"{name} {b / 2**20:.1f}" for name, b in row["bytes"].items())
        target = "" if shape.target is None else f"≤ {shape.target:g}"
        lines.append(
            f"| {shape.teacher_dim} | {shape.student_dim} | {shape.batch} | "
            f"{shape.tokens or 'pool'} | {shape.label} | {ms['linear']:.1f} | "
            + " | ".join(cells)
            + f" | {target} | {held} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--trivs", nargs="+", choices=["qr", "cayley", "expm"], default=["qr", "cayley"]
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the script")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}; "
        f"{args.repeats} interleaved repeats; load average before {os.getloadavg()[0]:.1f}"
    )
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rows = projector_table(shapes, args.trivs, args.repeats, torch.device(args.device))
    print(markdown(rows, args.trivs))
    if not args.quick:
        for triv in args.trivs:
            error = orthonormality_after_training(triv)
            print(f"{triv}: max |PᵀP − I| after 200 AdamW steps at (256, 800): {error:.1e}")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
