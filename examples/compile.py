"""torch.compile: compile the model, keep the optimizer as it is.

    python examples/compile.py

The per-task gradients come from one vmapped backward; inductor's compiled backward cannot be
vmapped, so the optimizer falls back (once, with a warning) to k ordinary backward passes through
the compiled graph. ``backend="aot_eager"`` keeps the vmapped backward.
"""

import warnings

import torch
from _toy import Toy

from gradbalance import MultiObjectiveOptimizer

toy = Toy()
student = torch.compile(toy.student)
opt = MultiObjectiveOptimizer(toy.student.parameters(), lr=1e-2)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for step in range(100):
        x, y = toy.batch(step)
        opt.zero_grad()
        opt.backward(toy.losses(x, y, student))
        opt.step()

print(f"accuracy {toy.accuracy():.3f}, π = {opt.weights.tolist()}")
fell_back = any("sequential" in str(warning.message) for warning in caught)
print("fell back to sequential backward passes:", fell_back)
