"""Small models and loss pairs shared by the optimizer tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class TeacherStudentProblem:
    """A student MLP fit to a fixed random teacher: distillation (MSE to the teacher) and task (CE).

    The two objectives agree on the whole (the teacher's argmax are the labels) but their gradients
    differ, as in real distillation.
    """

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, samples: int = 128):
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(samples, 10, generator=generator, dtype=dtype)
        teacher = torch.randn(10, 4, generator=generator, dtype=dtype)
        self.teacher_outputs = torch.tanh(self.inputs @ teacher) * 3
        self.labels = self.teacher_outputs.argmax(dim=1)
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
        ).to(dtype)

    def losses(
        self, model: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """[distillation, task] of ``model`` (default: the student), any callable on the inputs."""
        outputs = (model or self.model)(self.inputs)
        return [F.mse_loss(outputs, self.teacher_outputs), F.cross_entropy(outputs, self.labels)]


def snapshot(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """Everything a failed call must leave untouched: parameters, .grad, optimizer state."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": repr(optimizer.state_dict()),
    }


def assert_unchanged(before: dict, after: dict) -> None:
    for old, new in zip(before["params"], after["params"], strict=True):
        assert torch.equal(old, new)
    for old, new in zip(before["grads"], after["grads"], strict=True):
        assert (old is None and new is None) or torch.equal(old, new)
    assert before["state"] == after["state"]
