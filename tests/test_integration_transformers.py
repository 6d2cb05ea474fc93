"""gradbalance.integrations.transformers against the installed transformers and accelerate:
BalancedTrainer in Trainer's own loop (accumulation, clipping, bf16, DDP, resume, logs)."""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import run_on_ranks, two_task_min_norm
from transformers import Trainer, TrainerCallback, TrainingArguments

from gradbalance import Balancer, kl_distillation
from gradbalance.integrations.transformers import BALANCER_NAME, BalancedTrainer

FEATURES, CLASSES, SAMPLES = 4, 3, 40

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class Net(torch.nn.Module):
    def __init__(self, seed: int = 0, scale: float = 2.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(FEATURES, CLASSES)
        with torch.no_grad():
            self.linear.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(self.linear.weight.dtype))


def dataset() -> list[dict[str, torch.Tensor]]:
    """Labels that the student predicts at initialisation (confident logits): the min-norm point
    then lies inside the segment between the two log-loss gradients, not at a vertex."""
    x = torch.randn(SAMPLES, FEATURES, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = Net()(x).argmax(dim=1)
    return [{"x": xi, "labels": yi} for xi, yi in zip(x, labels)]


def named_losses(model, inputs, teacher) -> dict[str, torch.Tensor]:
    logits = model(inputs["x"])
    with torch.no_grad():
        teacher_logits = teacher(inputs["x"])
    return {
        "distill": kl_distillation(logits, teacher_logits),
        "task": F.cross_entropy(logits, inputs["labels"]),
    }


class Record(TrainerCallback):
    """The parameters and their ``.grad`` where Trainer is about to step (after clipping)."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        params = list(model.parameters())
        self.seen.append(([p.detach().clone() for p in params], [p.grad.clone() for p in params]))


class PlainTrainer(Trainer):
    """What a plain Trainer trains on the fixed sum of the losses."""

    def __init__(self, *args, teacher, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses = named_losses(model, inputs, self.teacher)
        return losses["distill"] + losses["task"]


class FixedSum(Balancer):
    """Balancing replaced by what the plain Trainer backpropagates: the sum, divided by the
    micro-batches of a step (the tests' windows are all full)."""

    def __init__(self, accumulation_steps: int) -> None:
        super().__init__()
        self.divide_by = accumulation_steps

    def backward(self, losses, params, *, accumulate=False, grad_scaler=None, **_) -> None:
        loss = (losses["distill"] + losses["task"]) / self.divide_by
        (loss if grad_scaler is None else grad_scaler.scale(loss)).backward()


def arguments(output_dir, **options) -> TrainingArguments:
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=2,  # 10 micro-batches an epoch: 5 steps of 2
        learning_rate=0.05,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,  # Net.forward takes x only; compute_losses reads labels
        seed=0,
    )
    return TrainingArguments(**(defaults | options))


def train(trainer_class, output_dir, *, resume=None, **options):
    record = Record()
    extra = {} if trainer_class is PlainTrainer else {"compute_losses": named_losses}
    trainer = trainer_class(
        model=options.pop("model", None) or Net(),
        args=arguments(output_dir, **options.pop("args", {})),
        train_dataset=dataset(),
        teacher=Net(seed=1, scale=1.0),
        callbacks=[record],
        **extra,
        **options,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, record


def assert_same_tensors(first, second) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "options",
    [{"max_grad_norm": 0.05}, {"max_grad_norm": 0.05, "bf16": True}],
    ids=["accumulate-clip", "bf16"],
)
def test_with_a_fixed_sum_it_trains_bit_for_bit_as_the_plain_trainer(tmp_path, options):
    # The same operations in the same order (data order from the same seed): equal bits.
    plain, plain_record = train(PlainTrainer, tmp_path / "plain", args=options)
    balanced, record = train(BalancedTrainer, tmp_path / "b", args=options, balancer=FixedSum(2))
    assert len(record.seen) == len(plain_record.seen) == 10
    for (params_p, grads_p), (params_b, grads_b) in zip(plain_record.seen, record.seen):
        assert_same_tensors(params_p, params_b)
        assert_same_tensors(grads_p, grads_b)
    assert_same_tensors(list(plain.model.parameters()), list(balanced.model.parameters()))
    plain_losses = [log["loss"] for log in plain.state.log_history if "loss" in log]
    assert plain_losses == [log["loss"] for log in balanced.state.log_history if "loss" in log]


class Windows:
    """compute_losses that keeps each micro-batch's inputs."""

    def __init__(self) -> None:
        self.inputs: list[dict[str, torch.Tensor]] = []

    def __call__(self, model, inputs, teacher):
        self.inputs.append({key: value.clone() for key, value in inputs.items()})
        return named_losses(model, inputs, teacher)


def student_at(params) -> Net:
    student = Net().double()
    with torch.no_grad():
        for target, value in zip(student.parameters(), params):
            target.copy_(value)
    return student


def reference(params, micro_batches, teacher):
    """two_task_min_norm on a float64 copy of the student at ``params``; the float32 teacher as
    in training (its logits are data, cast to float64 by kl_distillation)."""
    student = student_at(params)
    losses = [list(named_losses(student, inputs, teacher).values()) for inputs in micro_batches]
    return two_task_min_norm(losses, list(student.parameters()))


def test_balanced_grad_is_the_closed_form_min_norm_point_and_is_logged(tmp_path):
    windows = Windows()
    trainer = BalancedTrainer(
        model=Net().double(),
        args=arguments(tmp_path, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0),
        train_dataset=dataset(),
        teacher=Net(seed=1, scale=1.0),
        compute_losses=windows,
        callbacks=[record := Record()],
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(record.seen) == len(logs) == 10
    for step, ((params, grads), log) in enumerate(zip(record.seen, logs)):
        micro_batches = windows.inputs[2 * step : 2 * step + 2]
        pi, expected, g1, g2 = reference(params, micro_batches, trainer.teacher)
        assert 0 < pi < 1  # an interior point: the formula, not a vertex, is checked
        got = torch.cat([g.flatten() for g in grads])
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        # logging_steps=1: each log holds its own step's values
        assert log["pi_distill"] == pytest.approx(pi, rel=1e-6)
        assert log["pi_task"] == pytest.approx(1 - pi, rel=1e-6)
        assert log["grc"] == pytest.approx((g1 @ g2).item(), rel=1e-6)
        assert log["grd"] == pytest.approx((g1.norm() / g2.norm()).item(), rel=1e-6)
        losses = [named_losses(student_at(params), b, trainer.teacher) for b in micro_batches]
        for name in ("distill", "task"):
            mean = sum(loss[name].item() for loss in losses) / 2
            assert log[f"loss_{name}"] == pytest.approx(mean, rel=1e-6)
        assert log["loss"] == pytest.approx(log["loss_distill"] + log["loss_task"], rel=1e-6)


def test_a_resumed_run_continues_the_uninterrupted_one(tmp_path):
    # Amortized mode: π comes from logits learned over the steps, so a resume that lost the
    # balancing state would take other steps. The checkpoint at step 3 is mid-epoch.
    options = {"args": {"save_strategy": "steps", "save_steps": 3, "max_grad_norm": 0.5}}
    uninterrupted, _ = train(
        BalancedTrainer, tmp_path / "a", balancer=Balancer(mode="amortized"), **options
    )
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert torch.load(checkpoint / BALANCER_NAME, weights_only=True)["backward_calls"] == 3
    resumed, _ = train(
        BalancedTrainer,
        tmp_path / "b",
        balancer=Balancer(mode="amortized"),
        model=Net(seed=5),  # overwritten by the checkpoint's weights
        resume=str(checkpoint),
        **options,
    )
    assert_same_tensors(list(uninterrupted.model.parameters()), list(resumed.model.parameters()))
    assert uninterrupted.balancer.state_dict() == resumed.balancer.state_dict()


def test_compute_losses_must_return_named_losses(tmp_path):
    trainer = BalancedTrainer(
        model=Net(),
        args=arguments(tmp_path),
        train_dataset=dataset(),
        compute_losses=lambda model, inputs, teacher: model(inputs["x"]).sum(),
    )
    with pytest.raises(TypeError, match=r"compute_losses returns its losses by name.*got Tensor"):
        trainer.train()


def test_without_compute_losses_it_says_what_is_missing(tmp_path):
    trainer = BalancedTrainer(model=Net(), args=arguments(tmp_path), train_dataset=dataset())
    with pytest.raises(NotImplementedError, match="pass compute_losses"):
        trainer.train()


def ddp_rank(rank: int, world_size: int, output_dir: str):
    # accelerate joins the process group that run_on_ranks opened, as under torchrun.
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    windows = Windows()
    trainer = BalancedTrainer(
        model=Net().double(),
        args=arguments(
            output_dir, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0, max_steps=3
        ),
        train_dataset=dataset(),
        teacher=Net(seed=1, scale=1.0),
        compute_losses=windows,
        callbacks=[record := Record()],
    )
    assert trainer.args.world_size == world_size
    trainer.train()
    return record.seen, windows.inputs, trainer.balancer.weights


@pytest.mark.slow
def test_ddp_on_two_gloo_ranks_takes_the_min_norm_step_of_the_global_window(tmp_path):
    # Each step's .grad, on both ranks, is the closed form over both ranks' micro-batches.
    ranks = run_on_ranks(ddp_rank, str(tmp_path))
    teacher = Net(seed=1, scale=1.0)
    for step in range(3):
        params, _ = ranks[0][0][step]
        micro_batches = [b for _, inputs, _ in ranks for b in inputs[2 * step : 2 * step + 2]]
        _, expected, _, _ = reference(params, micro_batches, teacher)
        for seen, _, _ in ranks:
            assert_same_tensors(seen[step][0], params)
            got = torch.cat([g.flatten() for g in seen[step][1]])
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(ranks[0][2], ranks[1][2])  # π bit-identical across the ranks
