"""PyTorch Lightning, automatic optimisation: a BalancedModule returns its losses by name.

    python examples/lightning_automatic.py

Lightning keeps the loop — AdamW from ``configure_optimizers``, ``accumulate_grad_batches``,
``gradient_clip_val`` — and balances the losses that ``training_step`` returns; π, GrC and GrD
go to ``self.log`` on every step (here into ``trainer.callback_metrics``).
"""

import lightning as L
import torch
from _toy import Toy

from gradbalance.integrations.lightning import BalancedModule


class Distillation(BalancedModule):  # in place of L.LightningModule
    def __init__(self, toy: Toy) -> None:
        super().__init__()
        self.toy = toy
        self.student = toy.student

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        distill, task = self.toy.losses(*batch, self.student)
        return {"distill": distill, "task": task}  # each a mean over the batch: not divided

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.student.parameters(), lr=1e-2)


toy = Toy()
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(toy.inputs, toy.labels), batch_size=32, shuffle=True
)
trainer = L.Trainer(
    max_epochs=5,
    accumulate_grad_batches=2,  # 32 batches an epoch: 16 steps, each balancing 2 batches
    gradient_clip_val=1.0,  # clips the balanced .grad
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
)
module = Distillation(toy)
trainer.fit(module, loader)
assert trainer.global_step == 5 * 16 and module.balancer.pending_micro_batches == 0
logged = {k: round(v.item(), 3) for k, v in trainer.callback_metrics.items()}
print(f"accuracy {toy.accuracy():.3f}, logged {logged}")
