"""Two gloo ranks on 127.0.0.1 must take the step of one process on the global batch.

Each rank trains on its half of the batch; the parent process trains on the whole batch. Float64
throughout, so the only differences are the order of floating-point sums.
"""

import pytest
import torch
from helpers import TeacherStudentProblem, run_on_ranks

from gradbalance import MultiObjectiveOptimizer

STEPS = 3
MODES = ["exact", "amortized"]


def rank_share(problem: TeacherStudentProblem, rank: int, world_size: int) -> None:
    """Keep this rank's contiguous share of the batch."""
    size = len(problem.inputs) // world_size
    rows = slice(rank * size, (rank + 1) * size)
    problem.inputs = problem.inputs[rows]
    problem.teacher_outputs = problem.teacher_outputs[rows]
    problem.labels = problem.labels[rows]


def train(problem, model, opt, micro_batches=1):
    inputs, targets, labels = problem.inputs, problem.teacher_outputs, problem.labels
    size = len(inputs) // micro_batches
    for _ in range(STEPS):
        opt.zero_grad()
        for micro in range(micro_batches):
            rows = slice(micro * size, (micro + 1) * size)
            problem.inputs, problem.teacher_outputs, problem.labels = (
                inputs[rows],
                targets[rows],
                labels[rows],
            )
            opt.backward(problem.losses(model), accumulate=micro < micro_batches - 1)
        opt.step()
    problem.inputs, problem.teacher_outputs, problem.labels = inputs, targets, labels


def single_process(mode, micro_batches=1, world_size=2):
    problem = TeacherStudentProblem(dtype=torch.float64)
    # The global micro-batch m is every rank's m-th micro-batch: put those rows side by side.
    rows = torch.arange(len(problem.inputs)).reshape(world_size, micro_batches, -1)
    order = rows.transpose(0, 1).reshape(-1)
    problem.inputs = problem.inputs[order]
    problem.teacher_outputs = problem.teacher_outputs[order]
    problem.labels = problem.labels[order]
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, lr=1e-2)
    train(problem, problem.model, opt, micro_batches)
    return [p.detach() for p in problem.model.parameters()], opt.weights


def ddp_rank(rank, world_size, mode, wrap, micro_batches):
    problem = TeacherStudentProblem(dtype=torch.float64)
    rank_share(problem, rank, world_size)
    model = problem.model
    if wrap:
        model = torch.nn.parallel.DistributedDataParallel(problem.model)
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, lr=1e-2)
    train(problem, model, opt, micro_batches)
    return [p.detach() for p in problem.model.parameters()], opt.weights


def fsdp_rank(rank, world_size, mode, micro_batches):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    problem = TeacherStudentProblem(dtype=torch.float64)
    rank_share(problem, rank, world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in (problem.model[0], problem.model[2], problem.model):
        fully_shard(layer, mesh=mesh)
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, lr=1e-2)
    train(problem, problem.model, opt, micro_batches)
    return [p.full_tensor().detach() for p in problem.model.parameters()], opt.weights


def assert_matches_single_process(results, expected_params, expected_weights):
    for params, weights in results:
        torch.testing.assert_close(weights, expected_weights, rtol=1e-9, atol=1e-12)
        for param, expected in zip(params, expected_params):
            torch.testing.assert_close(param, expected, rtol=1e-9, atol=1e-12)
    first, second = results
    assert torch.equal(first[1], second[1]), "π must be identical on every rank"


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wrap", [True, False], ids=["ddp", "plain-module"])
def test_data_parallel_equals_one_process_on_the_global_batch(mode, wrap):
    results = run_on_ranks(ddp_rank, mode, wrap, 1)
    assert_matches_single_process(results, *single_process(mode))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_accumulation_under_ddp_equals_one_process_on_the_global_batch(mode):
    results = run_on_ranks(ddp_rank, mode, True, 2)
    assert_matches_single_process(results, *single_process(mode, micro_batches=2))


@pytest.mark.slow
@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_fully_sharded_equals_one_process_on_the_global_batch(mode, micro_batches):
    results = run_on_ranks(fsdp_rank, mode, micro_batches)
    assert_matches_single_process(results, *single_process(mode, micro_batches))


def bad_loss_on_one_rank(rank, world_size, mode):
    problem = TeacherStudentProblem(dtype=torch.float64)
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    mse, ce = problem.losses()
    if rank == 1:
        ce = ce * float("nan")
    try:
        opt.backward([mse, ce])
    except ValueError as error:
        return str(error), [p.grad for p in problem.model.parameters()]
    return "no error", None


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_bad_loss_on_one_rank_raises_on_every_rank_and_changes_nothing(mode):
    for message, grads in run_on_ranks(bad_loss_on_one_rank, mode):
        assert "loss 1 is nan" in message
        assert all(grad is None for grad in grads)


def famo_reforward_rank(rank, world_size):
    problem = TeacherStudentProblem(dtype=torch.float64)
    rank_share(problem, rank, world_size)
    model = torch.nn.parallel.DistributedDataParallel(problem.model)
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode="amortized", lr=1e-2)
    for _ in range(STEPS):
        opt.zero_grad()
        opt.backward(problem.losses(model))
        opt.step()
        with torch.no_grad():
            opt.update_weights(problem.losses(model))
    return [p.detach() for p in problem.model.parameters()], opt.weights


@pytest.mark.slow
def test_famo_reforward_scheme_under_ddp_uses_the_global_losses():
    problem = TeacherStudentProblem(dtype=torch.float64)
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode="amortized", lr=1e-2)
    for _ in range(STEPS):
        opt.zero_grad()
        opt.backward(problem.losses())
        opt.step()
        with torch.no_grad():
            opt.update_weights(problem.losses())
    expected = [p.detach() for p in problem.model.parameters()], opt.weights
    assert_matches_single_process(run_on_ranks(famo_reforward_rank), *expected)


def two_dimensional_mesh_rank(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    problem = TeacherStudentProblem(dtype=torch.float64)
    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("replicate", "shard"))
    fully_shard(problem.model, mesh=mesh)
    opt = MultiObjectiveOptimizer(problem.model.parameters())
    try:
        opt.backward(problem.losses())
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.slow
def test_sharding_on_a_two_dimensional_mesh_is_refused_by_name():
    for message in run_on_ranks(two_dimensional_mesh_rank):
        assert "1-D device mesh" in message
