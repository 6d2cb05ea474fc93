"""The toy distillation problem the examples share: a frozen teacher MLP and a smaller student."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gradbalance import kl_distillation


class Toy:
    """Inputs, labels (the teacher's predictions, with 10 % flipped) and a student to train."""

    def __init__(self, device: str = "cpu", samples: int = 1024, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(samples, 32, generator=generator).to(device)
        torch.manual_seed(seed)
        self.teacher = mlp(32, 128, 10).to(device).eval().requires_grad_(False)
        labels = self.teacher(self.inputs).argmax(dim=1)
        flipped = torch.rand(samples, generator=generator).to(device) < 0.1
        self.labels = torch.where(flipped, torch.randint_like(labels, 10), labels)
        self.student = mlp(32, 16, 10).to(device)

    def batch(self, step: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(step * size, (step + 1) * size) % len(self.inputs)
        return self.inputs[rows], self.labels[rows]

    def losses(
        self, x: torch.Tensor, y: torch.Tensor, student: torch.nn.Module | None = None
    ) -> list[torch.Tensor]:
        """[distillation (KL to the teacher), task (cross-entropy)], in float32."""
        logits = (student or self.student)(x).float()
        return [kl_distillation(logits, self.teacher(x).float()), F.cross_entropy(logits, y)]

    def accuracy(self) -> float:
        with torch.no_grad():
            predictions = self.student(self.inputs).argmax(dim=1)
        return (predictions == self.labels).float().mean().item()


def mlp(inputs: int, hidden: int, outputs: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, outputs)
    )


def launch(main: Callable[[], None]) -> None:
    """Run ``main`` in the process group that torchrun describes, tear the group down, and exit.

    The barrier keeps a fast rank from leaving while the other still talks to it. The process then
    ends with ``os._exit``: with gloo on CPU (torch 2.13), a rank whose work is done sometimes
    aborts in the interpreter's own teardown ("terminate called without an active exception",
    exit code -6), which torchrun reports as a failed run.
    """
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    main()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
