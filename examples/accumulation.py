"""Gradient accumulation: π from the mean of several micro-batches, as for one large batch.

    python examples/accumulation.py

Every micro-batch but the last is passed with ``accumulate=True``: the optimizer keeps its
per-task gradients and loss values and leaves ``.grad`` alone. The last call balances their mean,
which equals one batch made of all the micro-batches (losses are means over equally sized
micro-batches: do not divide them by the number of micro-batches).
"""

import torch
from _toy import Toy

from gradbalance import MultiObjectiveOptimizer

MICRO_BATCHES = 4
toy = Toy()
opt = MultiObjectiveOptimizer(toy.student.parameters(), lr=1e-2)

for step in range(50):
    opt.zero_grad()
    for micro in range(MICRO_BATCHES):
        x, y = toy.batch(step * MICRO_BATCHES + micro, size=16)
        opt.backward(toy.losses(x, y), accumulate=micro < MICRO_BATCHES - 1)
    torch.nn.utils.clip_grad_norm_(toy.student.parameters(), max_norm=1.0)  # .grad is final here
    opt.step()

print(f"accuracy {toy.accuracy():.3f}, π = {opt.weights.tolist()}")
