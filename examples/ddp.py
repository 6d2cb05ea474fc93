"""DistributedDataParallel: every rank computes the π of the global batch.

    torchrun --standalone --nproc_per_node 2 examples/ddp.py

The optimizer finds the initialised process group by itself. It averages the loss values and the
per-task gradients over the ranks (one all-reduce of its flat (k, n) gradient buffer) before it
computes π, so every rank takes the same step as one process on the whole batch would. DDP's own
reducer stays idle: the per-task gradients come from ``torch.autograd.grad``, which fires no hooks.
"""

import os

import torch
import torch.distributed as dist
from _toy import Toy, launch

from gradbalance import MultiObjectiveOptimizer


def main() -> None:
    cuda = torch.cuda.is_available()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu"

    toy = Toy(device)  # the same seed on every rank: the same data and initial student
    model = torch.nn.parallel.DistributedDataParallel(toy.student)
    opt = MultiObjectiveOptimizer(toy.student.parameters(), lr=1e-2)

    for step in range(100):
        x, y = toy.batch(step)  # the global batch; each rank takes its share
        x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
        opt.zero_grad()
        opt.backward(toy.losses(x, y, model))
        opt.step()

    if rank == 0:
        print(f"accuracy {toy.accuracy():.3f}, π = {opt.weights.tolist()}")


if __name__ == "__main__":
    launch(main)  # init_process_group, main(), barrier, destroy_process_group
