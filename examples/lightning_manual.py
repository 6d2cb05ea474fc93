"""PyTorch Lightning: manual optimisation hands the losses to the optimizer.

    python examples/lightning_manual.py

With ``automatic_optimization = False`` the LightningModule drives the optimizer itself: it
calls ``backward(losses)`` on a :class:`gradbalance.MultiObjectiveOptimizer` instead of
``self.manual_backward(loss)``. ``self.optimizers()`` wraps the optimizer (``zero_grad`` and
``step`` go through the wrapper, so Lightning counts the steps), so the module keeps its own
reference to the optimizer for ``backward``. For automatic optimisation see
``examples/lightning_automatic.py``.
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
        self.multi_objective = MultiObjectiveOptimizer(self.student.parameters(), lr=1e-2)
        return self.multi_objective

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        distill, task = self.toy.losses(x, y, self.student)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.multi_objective.backward({"distill": distill, "task": task})
        optimizer.step()
        self.log_dict({"distill": distill, "task": task})
        self.log_dict({f"pi_{k}": v for k, v in self.multi_objective.named_weights.items()})


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
module = Distillation(toy)
trainer.fit(module, loader)
weights = {k: round(v.item(), 3) for k, v in module.multi_objective.named_weights.items()}
print(f"accuracy {toy.accuracy():.3f}, π = {weights}")
