"""Hugging Face Trainer: a Balancer in ``training_step`` instead of ``accelerator.backward(loss)``.

    python examples/hf_trainer.py

Nothing is downloaded: the teacher and the student are small randomly initialised BERT
classifiers built from a config. The teacher is trained for a few steps first on a rule (which
residue class of the token ids is the most frequent in a sequence); the student's labels are the
teacher's predictions with 10 % of them replaced at random, as in ``examples/_toy.py``. The student
then distils with a :class:`gradbalance.Balancer`, while Trainer's own AdamW, learning-rate
schedule and gradient clipping (``max_grad_norm``) step on the balanced ``.grad``.
"""

import tempfile

import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from gradbalance import Balancer, kl_distillation

VOCAB, LENGTH, CLASSES, SAMPLES = 64, 16, 4, 2048


class DistillationTrainer(Trainer):
    """Trainer whose ``training_step`` balances a distillation and a task loss."""

    def __init__(self, *args, teacher: torch.nn.Module, balancer: Balancer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.balancer = balancer
        # Trainer zeroes .grad with model.zero_grad(), which cannot see the micro-batches the
        # Balancer holds: drop any left by a step that never completed (a micro-batch raised)
        # where each step begins, as that zero_grad drops what loss.backward() accumulated.
        self.add_callback(DropHeldMicroBatches(balancer))
        # Sums since the last log: the distillation loss per micro-batch, π per optimizer step.
        self._distill_sum, self._micro_batches = 0.0, 0
        self._pi_sum, self._steps = 0.0, 0

    def create_optimizer(self, *args, **kwargs) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        # Its step() now refuses micro-batches that were never balanced (accumulate=True on the
        # last micro-batch of a step), instead of stepping on no .grad.
        self.balancer.attach(optimizer)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")
        with self.compute_loss_context_manager():
            logits = model(**inputs).logits.float()
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits.float()
        # Each loss is a mean over its micro-batch; the Balancer averages the micro-batches of an
        # accumulation window itself, so nothing is divided by the accumulation steps here.
        losses = {
            "distill": kl_distillation(logits, teacher_logits),
            "task": F.cross_entropy(logits, labels),
        }
        # Trainer sets sync_gradients before each micro-batch: True on the one that steps.
        last = self.accelerator.sync_gradients
        self.balancer.backward(
            losses,
            model.parameters(),
            accumulate=not last,
            grad_scaler=self.accelerator.scaler,  # None unless fp16 mixed precision
        )
        self._distill_sum += losses["distill"].detach()  # read at the next log: no sync here
        self._micro_batches += 1
        if last:
            self._pi_sum += self.balancer.weights
            self._steps += 1
        # What Trainer logs as "loss" (the task loss here): it sums the returned values over the
        # micro-batches of a step, so each returns its share of the window (4.46 has no
        # current_gradient_accumulation_steps, the size of the window, shorter at an epoch's end).
        steps = getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        return losses["task"].detach() / steps

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._steps:  # a training log, not the final summary
            logs["distill"] = (self._distill_sum / self._micro_batches).item()
            mean_pi = self._pi_sum / self._steps  # π averaged over the steps since the last log
            for name, weight in zip(self.balancer.loss_names, mean_pi, strict=True):
                logs[f"pi_{name}"] = weight.item()
            self._distill_sum, self._micro_batches = 0.0, 0
            self._pi_sum, self._steps = 0.0, 0
        super().log(logs, *args, **kwargs)


class DropHeldMicroBatches(TrainerCallback):
    """Drops the micro-batches a Balancer holds when an optimizer step begins."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.balancer.discard_micro_batches()


class Sequences(torch.utils.data.Dataset):
    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def bert(hidden: int, heads: int) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=LENGTH,
        num_labels=CLASSES,
    )
    return BertForSequenceClassification(config)


def accuracy(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predictions = model(input_ids=input_ids).logits.argmax(dim=1)
    return (predictions == labels).float().mean().item()


torch.manual_seed(0)
generator = torch.Generator().manual_seed(0)
input_ids = torch.randint(0, VOCAB, (SAMPLES, LENGTH), generator=generator)
rule = F.one_hot(input_ids % CLASSES, CLASSES).sum(dim=1).argmax(dim=1)

# The teacher: a larger BERT, trained briefly on the rule with a plain loop.
teacher = bert(hidden=64, heads=4)
teacher_optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
for _ in range(200):
    rows = torch.randint(0, SAMPLES, (32,), generator=generator)
    loss = F.cross_entropy(teacher(input_ids=input_ids[rows]).logits, rule[rows])
    teacher_optimizer.zero_grad()
    loss.backward()
    teacher_optimizer.step()
teacher.eval()
with torch.no_grad():
    labels = teacher(input_ids=input_ids).logits.argmax(dim=1)
flipped = torch.rand(SAMPLES, generator=generator) < 0.1
labels = torch.where(flipped, torch.randint_like(labels, CLASSES), labels)

student = bert(hidden=32, heads=2)
with tempfile.TemporaryDirectory() as output_dir:
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,  # the Balancer sees both micro-batches of every step
        max_steps=300,
        learning_rate=3e-3,
        max_grad_norm=1.0,  # Trainer clips the balanced .grad before AdamW steps
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = DistillationTrainer(
        model=student,
        args=args,
        train_dataset=Sequences(input_ids, labels),
        teacher=teacher,
        balancer=Balancer(mode="exact"),
    )
    trainer.train()

task_losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
assert task_losses[-1] < task_losses[0], f"the task loss did not decrease: {task_losses}"
student_accuracy = accuracy(student, input_ids, labels)
assert student_accuracy > 1 / CLASSES, f"the student is at chance: {student_accuracy}"
teacher_accuracy = accuracy(teacher, input_ids, labels)
assert trainer.balancer.pending_micro_batches == 0
weights = {name: round(weight.item(), 3) for name, weight in trainer.balancer.named_weights.items()}
print(f"accuracy {student_accuracy:.3f} (teacher {teacher_accuracy:.3f}), π = {weights}")
