"""FSDP2 (``fully_shard``): sharded parameters, the π of the global batch on every rank.

    torchrun --standalone --nproc_per_node 2 examples/fsdp.py

With DTensor parameters the optimizer takes the per-task gradients from k ordinary backward passes
(FSDP reduce-scatters each into the shards' ``.grad``), computes each rank's partial k×k Gram
matrix from its shards and sums it over the ranks with one all-reduce of k² numbers.
"""

import os

import torch
import torch.distributed as dist
from _toy import Toy, launch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from gradbalance import MultiObjectiveOptimizer


def main() -> None:
    cuda = torch.cuda.is_available()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu"

    toy = Toy(device)
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world_size,))
    for layer in toy.student:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(toy.student, mesh=mesh)
    # built on the sharded parameters, after fully_shard
    opt = MultiObjectiveOptimizer(toy.student.parameters(), lr=1e-2)

    for step in range(100):
        x, y = toy.batch(step)
        x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
        opt.zero_grad()
        opt.backward(toy.losses(x, y))
        opt.step()

    accuracy = toy.accuracy()  # a forward of the sharded student: every rank takes part
    if rank == 0:
        print(f"accuracy {accuracy:.3f}, π = {opt.weights.tolist()}")


if __name__ == "__main__":
    launch(main)  # init_process_group, main(), barrier, destroy_process_group
