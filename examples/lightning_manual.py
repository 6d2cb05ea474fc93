"""PyTorch Lightning: manual optimisation hands the losses to the optimizer.

    python examples/lightning_manual.py

Lightning's automatic optimisation calls ``loss.backward()`` on one loss; with
``automatic_optimization = False`` the LightningModule calls ``opt.backward(losses)`` itself.
``self.optimizers()`` wraps the optimizer, so the module keeps its own reference for ``backward``.
"""

import lightning as L
import torch
from _toy import Toy

from gradbalance import MultiObjectiveOptimizer


class Distillation(L.LightningModule):
    def __init__(self, toy: Toy) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.toy = toy
        self.student = toy.student

    def configure_optimizers(self) -> MultiObjectiveOptimizer:
        self.balancer = MultiObjectiveOptimizer(self.student.parameters(), lr=1e-2)
        return self.balancer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        losses = self.toy.losses(x, y, self.student)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.balancer.backward(losses)
        optimizer.step()
        pi_task = self.balancer.weights[1]
        self.log_dict({"distill": losses[0], "task": losses[1], "pi_task": pi_task})


toy = Toy()
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(toy.inputs, toy.labels), batch_size=64, shuffle=True
)
trainer = L.Trainer(
    max_epochs=5,
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
)
trainer.fit(Distillation(toy), loader)
print(f"accuracy {toy.accuracy():.3f}")
