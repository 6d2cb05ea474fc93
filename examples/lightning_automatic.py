"""PyTorch Lightning: automatic optimisation with a Balancer in the ``backward`` hook.

    python examples/lightning_automatic.py

Lightning keeps the loop: ``configure_optimizers`` returns a plain AdamW, Lightning zeroes the
gradients, calls ``training_step`` and ``backward`` inside ``optimizer.step(closure)``, clips
(``gradient_clip_val``) and steps. ``training_step`` keeps the losses and returns their sum, the
one loss Lightning expects; the ``backward`` hook ignores it and hands the losses to the Balancer.

With ``accumulate_grad_batches=2`` Lightning steps on every second batch and divides the returned
loss by 2; the Balancer gets the undivided losses, with ``accumulate=True`` on the batches that do
not step. Lightning calls the ``optimizer_step`` hook only on a batch that steps, and runs that
batch's ``training_step`` and ``backward`` inside it, so the flag it sets tells ``backward`` which
batch is the last of the window.
"""

import lightning as L
import torch
from _toy import Toy

from gradbalance import Balancer


class Distillation(L.LightningModule):
    def __init__(self, toy: Toy) -> None:
        super().__init__()
        self.toy = toy
        self.student = toy.student
        self.balancer = Balancer(mode="exact")
        self._losses: dict[str, torch.Tensor] = {}
        self._stepping = False
        self.steps = self.clipped = 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-2)
        # Lightning's optimizer.zero_grad() now drops micro-batches left by a step that never
        # completed, and a step without its closure refuses micro-batches never balanced.
        self.balancer.attach(optimizer)
        return optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        distill, task = self.toy.losses(x, y, self.student)
        self._losses = {"distill": distill, "task": task}
        self.log_dict({"distill": distill, "task": task})
        return distill + task  # what Lightning passes to backward (and divides when accumulating)

    def optimizer_step(self, *args, **kwargs) -> None:
        self._stepping = True  # the closure, run inside, calls training_step and backward
        try:
            super().optimizer_step(*args, **kwargs)
        finally:
            self._stepping = False

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        # A GradScaler only with precision="16-mixed" (on a GPU); None here.
        grad_scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self.balancer.backward(
            self._losses,
            self.student.parameters(),
            accumulate=not self._stepping,
            grad_scaler=grad_scaler,
        )
        self._losses = {}  # their graph is freed; do not hold on to it

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The balanced .grad is complete here; Lightning clips it right after this hook.
        norm = torch.stack([p.grad.norm() for p in self.student.parameters()]).norm()
        self.steps += 1
        self.clipped += int(norm > self.trainer.gradient_clip_val)
        self.log_dict({f"pi_{k}": v for k, v in self.balancer.named_weights.items()})


toy = Toy()
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(toy.inputs, toy.labels), batch_size=32, shuffle=True
)
trainer = L.Trainer(
    max_epochs=5,
    accumulate_grad_batches=2,  # 32 batches an epoch: 16 steps
    gradient_clip_val=0.25,  # clips the balanced .grad (low enough to clip some of these steps)
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
)
module = Distillation(toy)
trainer.fit(module, loader)
assert module.steps == 5 * 16 and module.balancer.pending_micro_batches == 0
weights = {k: round(v.item(), 3) for k, v in module.balancer.named_weights.items()}
clipped = f"{module.clipped}/{module.steps}"
print(f"accuracy {toy.accuracy():.3f}, π = {weights}, clipped {clipped} steps")
