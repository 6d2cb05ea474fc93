"""gradbalance.integrations.lightning against the installed Lightning: BalancedModule in
Lightning's own automatic optimisation (accumulation, clipping, precision, DDP, resume)."""

import os
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import run_on_ranks, two_task_min_norm
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DistributedSampler

from gradbalance import Balancer, kl_distillation
from gradbalance.integrations.lightning import BalancedModule

FEATURES, CLASSES = 4, 3

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning", "ignore::DeprecationWarning:lightning"
)


def student_at_init(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    student = torch.nn.Linear(FEATURES, CLASSES)
    with torch.no_grad():
        student.weight.mul_(2)
    return student


def data(samples: int = 40) -> torch.utils.data.TensorDataset:
    """Inputs, and as labels what the student predicts at initialisation: with these confident
    logits the task's log-loss gradient ∇L/L is long enough that the min-norm point lies inside
    the segment between the two gradients (π_distill ≈ 0.2–0.4), not at a vertex."""
    x = torch.randn(samples, FEATURES, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.utils.data.TensorDataset(x, student_at_init()(x).argmax(dim=1))


def named_losses(student, teacher, batch) -> dict[str, torch.Tensor]:
    x, y = batch
    logits = student(x)
    return {"distill": kl_distillation(logits, teacher(x)), "task": F.cross_entropy(logits, y)}


class Recording:
    """What each module records where Lightning is about to clip and step: the parameters and
    their ``.grad`` (the complete gradient of the step)."""

    def setup_networks(self, seed: int, lr: float, sgd: bool) -> None:
        self.student = student_at_init(seed)
        self.teacher = torch.nn.Linear(FEATURES, CLASSES).requires_grad_(False)
        self.lr, self.sgd = lr, sgd
        self.seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        kind = torch.optim.SGD if self.sgd else torch.optim.AdamW
        return kind(self.student.parameters(), lr=self.lr)

    def on_before_optimizer_step(self, optimizer) -> None:
        params = list(self.student.parameters())
        self.seen.append(([p.detach().clone() for p in params], [p.grad.clone() for p in params]))


class Balanced(Recording, BalancedModule):
    def __init__(self, balancer=None, seed=0, lr=0.05, sgd=False) -> None:
        super().__init__(balancer=balancer)
        self.setup_networks(seed, lr, sgd)

    def training_step(self, batch, batch_idx):
        return named_losses(self.student, self.teacher, batch)


class Plain(Recording, L.LightningModule):
    """The same module as plain Lightning trains it, on the fixed sum of the losses."""

    def __init__(self, seed=0, lr=0.05, sgd=False) -> None:
        super().__init__()
        self.setup_networks(seed, lr, sgd)

    def training_step(self, batch, batch_idx):
        losses = named_losses(self.student, self.teacher, batch)
        return losses["distill"] + losses["task"]


class FixedSum(Balancer):
    """Balancing replaced by what plain Lightning backpropagates on the fixed sum: the sum
    divided by accumulate_grad_batches on every batch, scaled by the GradScaler if any."""

    def __init__(self, accumulate_grad_batches: int) -> None:
        super().__init__()
        self.divide_by = accumulate_grad_batches

    def backward(self, losses, params, *, accumulate=False, grad_scaler=None, **_) -> None:
        loss = (losses["distill"] + losses["task"]) / self.divide_by
        (loss if grad_scaler is None else grad_scaler.scale(loss)).backward()


def fit(module, *, epochs=2, batch_size=8, samples=40, ckpt_path=None, sampler=None, **options):
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"devices": 1, **options},
    )
    loader = torch.utils.data.DataLoader(data(samples), batch_size=batch_size, sampler=sampler)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def assert_same_tensors(first, second) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


FP16_ON_CPU = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}


@pytest.mark.parametrize(
    "options",
    [
        {"accumulate_grad_batches": 1},
        {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05},
        {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05, "precision": "bf16-mixed"},
        {"accumulate_grad_batches": 3, "gradient_clip_val": 0.05, **FP16_ON_CPU},
    ],
    ids=["plain", "accumulate-clip", "bf16-mixed", "16-mixed-scaler"],
)
def test_with_a_fixed_sum_it_trains_bit_for_bit_as_plain_lightning(options):
    # 5 batches an epoch: with 2 or 3 per step the last window of an epoch is shorter, and
    # Lightning steps on it. The same operations in the same order: equal bits, not nearly.
    plain = Plain()
    fit(plain, **options)
    balanced = Balanced(balancer=FixedSum(options["accumulate_grad_batches"]))
    fit(balanced, **options)
    assert len(plain.seen) == len(balanced.seen) == 2 * -(-5 // options["accumulate_grad_batches"])
    for (params_p, grads_p), (params_b, grads_b) in zip(plain.seen, balanced.seen):
        assert_same_tensors(params_p, params_b)
        assert_same_tensors(grads_p, grads_b)
    assert_same_tensors(list(plain.parameters()), list(balanced.parameters()))


def window_losses(module, params, batches) -> tuple[list, list[torch.Tensor]]:
    """Each batch's two losses in float64, with their graph to a copy of the student at
    ``params``; and that copy's parameters."""
    student = torch.nn.Linear(FEATURES, CLASSES).double()
    with torch.no_grad():
        for target, value in zip(student.parameters(), params):
            target.copy_(value)
    teacher = module.teacher.double()
    losses = [named_losses(student, teacher, (x.double(), y)).values() for x, y in batches]
    return [list(pair) for pair in losses], list(student.parameters())


def test_balanced_grad_is_the_closed_form_min_norm_point_of_each_window():
    # float64, SGD, 2 batches a step, 6 batches: 3 steps, each checked against the closed form
    # on its own window at the parameters it started from; then the logged keys and values.
    module = Balanced(sgd=True, lr=0.5).double()
    trainer = fit(module, epochs=1, samples=48, accumulate_grad_batches=2, precision="64-true")
    batches = list(torch.utils.data.DataLoader(data(48), batch_size=8))
    assert len(module.seen) == 3
    for step, (params, grads) in enumerate(module.seen):
        pi, expected, g1, g2 = two_task_min_norm(
            *window_losses(module, params, batches[2 * step : 2 * step + 2])
        )
        assert 0 < pi < 1  # an interior point: the formula, not a vertex, is checked
        got = torch.cat([g.flatten() for g in grads])
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    metrics = trainer.callback_metrics
    assert set(metrics) == {"pi_distill", "pi_task", "grc", "grd"}
    assert metrics["pi_distill"].item() == pytest.approx(pi, rel=1e-6)
    assert metrics["pi_task"].item() == pytest.approx(1 - pi, rel=1e-6)
    assert metrics["grc"].item() == pytest.approx((g1 @ g2).item(), rel=1e-6)
    assert metrics["grd"].item() == pytest.approx((g1.norm() / g2.norm()).item(), rel=1e-6)


def test_a_resumed_fit_continues_the_uninterrupted_one(tmp_path):
    # Amortized mode: π comes from logits learned over the steps, so a resume that lost the
    # balancing state would take other steps.
    def module():
        return Balanced(balancer=Balancer(mode="amortized"))

    options = {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5}
    uninterrupted = module()
    fit(uninterrupted, epochs=3, **options)

    first = module()
    trainer = fit(first, epochs=1, **options)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    checkpoint = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)
    assert checkpoint["gradbalance"]["backward_calls"] == 3
    resumed = module()
    fit(resumed, epochs=3, ckpt_path=tmp_path / "epoch1.ckpt", **options)

    assert_same_tensors(list(uninterrupted.parameters()), list(resumed.parameters()))
    assert uninterrupted.balancer.state_dict() == resumed.balancer.state_dict()


def test_a_checkpoint_without_balancing_state_warns_and_starts_afresh(tmp_path):
    trainer = fit(Plain(), epochs=1)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.warns(UserWarning, match="no 'gradbalance' entry"):
        fit(Balanced(), epochs=2, ckpt_path=tmp_path / "plain.ckpt")


class ReturnsOneLoss(BalancedModule):
    def __init__(self) -> None:
        super().__init__()
        self.student = torch.nn.Linear(FEATURES, CLASSES)

    def training_step(self, batch):
        return F.cross_entropy(self.student(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_training_step_returning_one_loss_is_refused_by_name():
    with pytest.raises(TypeError, match=r"returns its losses by name.*got Tensor"):
        fit(ReturnsOneLoss(), epochs=1)


def ddp_rank(rank: int, world_size: int) -> list[torch.Tensor]:
    # Lightning joins the process group that run_on_ranks opened; the environment tells it the
    # processes were launched outside (as torchrun's would).
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", NODE_RANK="0")
    module = Balanced(sgd=True, lr=0.5).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(
            module,
            epochs=1,
            samples=48,
            batch_size=4,  # per rank: 8 a step across the 2 ranks, as in the reference below
            sampler=DistributedSampler(data(48), shuffle=False),  # rank r: samples r, r + 2, …
            use_distributed_sampler=False,
            accumulate_grad_batches=2,
            precision="64-true",
            strategy=DDPStrategy(process_group_backend="gloo"),
            devices=world_size,
        )
    return [*module.student.parameters(), module.balancer.weights]


@pytest.mark.slow
def test_ddp_on_two_gloo_ranks_takes_the_steps_of_one_process_on_the_global_batch():
    # Each rank's batch of 4 is half of the single process's batch of 8, whose loss is the mean
    # of the two halves'. float64: equal to rounding (the ranks' average is another sum order).
    ranks = run_on_ranks(ddp_rank)
    single = Balanced(sgd=True, lr=0.5).double()
    fit(single, epochs=1, samples=48, accumulate_grad_batches=2, precision="64-true")
    for got in ranks:
        for a, b in zip(got[:-1], single.student.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
    assert torch.equal(ranks[0][-1], ranks[1][-1])  # π bit-identical across the ranks
