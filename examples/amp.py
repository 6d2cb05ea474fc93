"""Mixed precision: autocast for the forward, a GradScaler for the backward, clipping in between.

    python examples/amp.py

float16 on CUDA, bfloat16 on CPU. The optimizer scales the losses for the backward itself
(``grad_scaler=scaler``) and computes π from the unscaled values; ``scaler.step`` skips a step
whose gradients overflowed, and then the balancing state is left as it was.
"""

import torch
from _toy import Toy

from gradbalance import MultiObjectiveOptimizer

device = "cuda" if torch.cuda.is_available() else "cpu"
low_precision = torch.float16 if device == "cuda" else torch.bfloat16
toy = Toy(device)
opt = MultiObjectiveOptimizer(toy.student.parameters(), lr=1e-2)
scaler = torch.amp.GradScaler(device)

for step in range(100):
    x, y = toy.batch(step)
    with torch.autocast(device, dtype=low_precision):
        losses = toy.losses(x, y)
    opt.zero_grad()
    opt.backward(losses, grad_scaler=scaler)  # instead of scaler.scale(sum(losses)).backward()
    scaler.unscale_(opt)  # only needed because we clip
    torch.nn.utils.clip_grad_norm_(toy.student.parameters(), max_norm=1.0)
    scaler.step(opt)
    scaler.update()

print(f"accuracy {toy.accuracy():.3f}, π = {opt.weights.tolist()}, scale {scaler.get_scale()}")
