"""Hugging Face Trainer: a BalancedTrainer distils with named losses.

    python examples/hf_trainer.py

Nothing is downloaded: teacher and student are small random BERT classifiers. The teacher learns
a rule first (the most frequent residue class of the token ids); the student's labels are its
predictions, 10 % replaced at random. Trainer's AdamW, schedule, accumulation and clipping step
on the balanced ``.grad``; its logs carry π, GrC and GrD.
"""

import tempfile

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from gradbalance import kl_distillation
from gradbalance.integrations.transformers import BalancedTrainer

VOCAB, LENGTH, CLASSES, SAMPLES = 64, 16, 4, 2048


def compute_losses(model, inputs, teacher) -> dict[str, torch.Tensor]:
    logits = model(input_ids=inputs["input_ids"]).logits.float()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=inputs["input_ids"]).logits.float()
    # Each a mean over its micro-batch: the balancer averages the micro-batches of a step itself.
    return {
        "distill": kl_distillation(logits, teacher_logits),
        "task": F.cross_entropy(logits, inputs["labels"]),
    }


def bert(hidden: int, heads: int) -> BertForSequenceClassification:
    sizes = dict(hidden_size=hidden, num_attention_heads=heads, intermediate_size=2 * hidden)
    shape = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=LENGTH)
    return BertForSequenceClassification(BertConfig(**sizes, **shape, num_labels=CLASSES))


def accuracy(model: torch.nn.Module) -> float:
    with torch.no_grad():
        predictions = model.eval()(input_ids=input_ids).logits.argmax(dim=1)
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
    F.cross_entropy(teacher(input_ids=input_ids[rows]).logits, rule[rows]).backward()
    teacher_optimizer.step()
    teacher_optimizer.zero_grad()
with torch.no_grad():
    labels = teacher.eval()(input_ids=input_ids).logits.argmax(dim=1)
flipped = torch.rand(SAMPLES, generator=generator) < 0.1
labels = torch.where(flipped, torch.randint_like(labels, CLASSES), labels)
dataset = [{"input_ids": i, "labels": y} for i, y in zip(input_ids, labels, strict=True)]

student = bert(hidden=32, heads=2)
with tempfile.TemporaryDirectory() as output_dir:
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,  # the balancer sees both micro-batches of every step
        max_steps=300,
        learning_rate=3e-3,
        max_grad_norm=1.0,  # Trainer clips the balanced .grad before AdamW steps
        logging_steps=100,
        save_strategy="no",
        report_to=[],  # "tensorboard", "wandb": the logged π, GrC and GrD go there
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = BalancedTrainer(student, args, train_dataset=dataset, teacher=teacher,
                              compute_losses=compute_losses)  # fmt: skip
    trainer.train()

task_losses = [log["loss_task"] for log in trainer.state.log_history if "loss_task" in log]
assert task_losses[-1] < task_losses[0], f"the task loss did not decrease: {task_losses}"
assert accuracy(student) > 1 / CLASSES, f"the student is at chance: {accuracy(student)}"
print(f"accuracy {accuracy(student):.3f} (teacher {accuracy(teacher):.3f})")
