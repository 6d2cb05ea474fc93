"""What the tests share: a small model and loss pair, snapshots, and a runner on gloo ranks.

- ``TeacherStudentProblem``: a student MLP, a fixed random teacher, [distillation, task] losses.
- ``snapshot`` / ``assert_unchanged``: what a refused call must leave as it was.
- ``run_on_ranks``: a function on several gloo ranks (CPU processes on 127.0.0.1), e.g.::

    from helpers import run_on_ranks

    def _check(rank: int, world_size: int, scale: float) -> torch.Tensor:  # module level
        value = torch.tensor([rank * scale])
        torch.distributed.all_reduce(value)
        return value

    def test_all_reduce():
        assert all(r.item() == 1.0 for r in run_on_ranks(_check, 1.0))
"""

from __future__ import annotations

import datetime
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
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


# -- several gloo ranks -------------------------------------------------------------------------

T = TypeVar("T")


def run_on_ranks(
    function: Callable[..., T],
    *args: Any,
    world_size: int = 2,
    timeout: float = 120.0,
) -> list[T]:
    """``function(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; their results.

    The rendezvous store is served by this (the parent) process on a port that the OS picks, so
    there is no free-port race. Each rank joins the default process group (gloo, 127.0.0.1),
    runs ``function`` and destroys the group. ``function`` and ``args`` must be picklable:
    ``function`` lives at module level of an importable module (a test module under ``tests/``
    is, as spawned children inherit ``sys.path``; so is this one, whose ``_run_rank`` each child
    imports by name). Return values come back through :func:`torch.save`, so CPU tensors are
    fine.

    Raises:
        RuntimeError: a rank raised; the message holds that rank's traceback, and the original
            exception, when it could be pickled, is chained as the cause.
        TimeoutError: not every rank finished within ``timeout`` seconds (say, a collective that
            only some ranks called); all ranks are killed.
    """
    payload = pickle.dumps((function, args))  # unpicklable arguments fail here, not in a child
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="run_on_ranks_") as folder:
        paths = [Path(folder, f"rank{rank}.pt") for rank in range(world_size)]
        processes = [
            context.Process(
                target=_run_rank,
                args=(payload, rank, world_size, store.port, timeout, paths[rank]),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        try:
            _wait(processes, time.monotonic() + timeout, timeout)
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                process.join()
        outcomes = [_load(path, process) for path, process in zip(paths, processes)]
    del store
    failures = sorted(  # the first to fail: the others usually fail waiting on it
        (value[2], rank) for rank, (failed, value) in enumerate(outcomes) if failed
    )
    if failures:
        rank = failures[0][1]
        message, cause, _ = outcomes[rank][1]
        also = "".join(
            f"\nrank {r} failed later: {outcomes[r][1][0].strip().splitlines()[-1]}"
            for _, r in failures[1:]
        )
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{message}{also}") from cause
    return [value for _, value in outcomes]


def _wait(processes: list[Any], deadline: float, timeout: float) -> None:
    """Until every rank exits; once one fails, the others get a few seconds, not the timeout."""
    pending = {process.sentinel: process for process in processes}
    failed = False
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            if failed:
                return  # the survivors wait on the failed rank: killed, the failure is reported
            raise TimeoutError(
                f"{len(pending)} of {len(processes)} ranks still running after {timeout:g} s "
                "(a collective that not every rank called?)"
            )
        for sentinel in multiprocessing.connection.wait(list(pending), timeout=left):
            if pending.pop(sentinel).exitcode != 0 and not failed:
                failed = True
                deadline = min(deadline, time.monotonic() + 5.0)


def _load(path: Path, process: Any) -> tuple[bool, Any]:
    try:
        return torch.load(path, weights_only=False)
    except Exception:  # none, or half written: killed (not the first to fail) or crashed
        message = f"the process exited with code {process.exitcode} and no result"
        return True, (message, None, math.inf)


def _run_rank(
    payload: bytes, rank: int, world_size: int, port: int, timeout: float, path: Path
) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    failed_at = math.inf
    try:
        function, args = pickle.loads(payload)
        store = dist.TCPStore("127.0.0.1", port, is_master=False)
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            outcome: tuple[bool, Any] = (False, function(rank, world_size, *args))
            dist.barrier()  # nobody closes its connections while another rank still uses them
        except BaseException:
            failed_at = time.time()  # before destroying the group fails the other ranks
            raise
        finally:
            dist.destroy_process_group()
    except BaseException as error:
        cause = error if _picklable(error) else None
        outcome = (True, (traceback.format_exc(), cause, min(failed_at, time.time())))
    try:
        torch.save(outcome, path)
    except Exception:  # an unpicklable result
        outcome = (True, (traceback.format_exc(), None, time.time()))
        torch.save(outcome, path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if outcome[0] else 0)  # skips torch's interpreter teardown: about 1 s


def _picklable(value: object) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def tiny_digits(**overrides: Any) -> Any:
    """A few seconds of ``gradbalance distill`` on digits, in this process, with ``overrides``."""
    from gradbalance.experiments.config import DistillConfig

    defaults = dict(
        dataset="digits",
        teacher_epochs=1,
        batch_size=64,
        train_size=192,
        test_size=60,
        jobs=1,
        progress=False,
    )
    return DistillConfig(**{**defaults, **overrides})


def two_task_min_norm(
    windows: Sequence[Sequence[torch.Tensor]], params: Sequence[torch.Tensor]
) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The balanced direction of two losses, in closed form (float64 reference).

    ``windows`` holds, for each micro-batch of a step (and rank), its two losses with their graph
    to ``params``. With the means over micro-batches ``L̄_i`` and ``∇̄L_i``, the log-loss
    gradients are ``g_i = ∇̄L_i / L̄_i``; the min-norm point of the segment [g_2, g_1] is
    ``d = π g_1 + (1 − π) g_2`` with ``π = clamp(⟨g_2 − g_1, g_2⟩ / ‖g_1 − g_2‖², 0, 1)``.
    Returns (π, d, g_1, g_2), the vectors flattened over ``params``.
    """
    grads, values = [0, 0], [0, 0]
    for losses in windows:
        for i, loss in enumerate(losses):
            flat = torch.autograd.grad(loss, list(params), retain_graph=True)
            grads[i] = grads[i] + torch.cat([g.flatten() for g in flat])
            values[i] = values[i] + loss.detach()
    g1, g2 = (grad / value for grad, value in zip(grads, values))  # the 1/n of both means cancels
    pi = ((g2 - g1) @ g2 / (g1 - g2).square().sum()).clamp(0, 1).item()
    return pi, pi * g1 + (1 - pi) * g2, g1, g2


def halves(problem: TeacherStudentProblem) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The problem's batch as two equal micro-batches: (inputs, teacher outputs, labels) each."""
    cut = len(problem.inputs) // 2
    return [
        (problem.inputs[s], problem.teacher_outputs[s], problem.labels[s])
        for s in (slice(None, cut), slice(cut, None))
    ]


def micro_losses(model: torch.nn.Module, part: tuple) -> list[torch.Tensor]:
    """[MSE to the teacher's outputs, cross-entropy] of one micro-batch from :func:`halves`."""
    inputs, targets, labels = part
    outputs = model(inputs)
    return [F.mse_loss(outputs, targets), F.cross_entropy(outputs, labels)]
