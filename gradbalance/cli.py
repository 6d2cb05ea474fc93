"""The ``gradbalance`` command; ``gradbalance distill`` is the main job (a teacher, many students).

Every argument is checked before anything is loaded or written: bad input exits with status 2, an
argparse message, and no files.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path

import torch

from gradbalance.experiments.config import DistillConfig
from gradbalance.experiments.data import DATASETS, find_cifar100
from gradbalance.experiments.methods import METHODS, parse_method
from gradbalance.experiments.report import format_table

__all__ = ["build_parser", "main"]

_NORMALIZE = {"auto": None, "on": True, "off": False}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradbalance`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args, "gradbalance " + shlex.join(argv))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gradbalance`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="gradbalance",
        description="Gradient-level balancing of distillation and task losses (MoKD / DTO-KD).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_distill(commands)
    return parser


def _add_distill(commands: argparse._SubParsersAction) -> None:
    defaults = DistillConfig()
    distill = commands.add_parser(
        "distill",
        help="train a teacher, then students with each method; write results.json and plots",
        description=(
            "Train a teacher CNN (cached in --out; its schedule is fixed: AdamW lr 3e-3, weight "
            "decay 0.05, batch 128, --teacher-epochs), then a student per method and seed from the "
            "same initialisation, and report the final test accuracy (mean ± std over seeds). "
            "Writes results.json, history.json and PNG plots to --out."
        ),
    )
    add = distill.add_argument
    add(
        "--dataset",
        choices=DATASETS,
        default=defaults.dataset,
        help="mnist1d, digits: no download; cifar100 needs --data-dir (default: %(default)s)",
    )
    add(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="folder holding torchvision's cifar-100-python/ (only for --dataset cifar100)",
    )
    add(
        "--methods",
        nargs="+",
        type=_method,
        default=list(defaults.methods),
        metavar="METHOD",
        help=f"any of {', '.join(METHODS)}, or kd-fixed-w<W> (kd-fixed with distill weight W) "
        f"(default: {' '.join(defaults.methods)})",
    )
    add(
        "--seeds",
        type=_at_least(1),
        default=defaults.seeds,
        metavar="N",
        help="run seeds 0..N-1 (default: %(default)s)",
    )
    add(
        "--epochs",
        type=_at_least(1),
        default=defaults.epochs,
        metavar="E",
        help="student epochs (default: %(default)s)",
    )
    add(
        "--teacher-epochs",
        type=_at_least(1),
        default=defaults.teacher_epochs,
        metavar="E",
        help="teacher epochs (default: %(default)s)",
    )
    add(
        "--batch-size",
        type=_at_least(1),
        default=defaults.batch_size,
        metavar="B",
        help="student batch size (default: %(default)s)",
    )
    add(
        "--lr",
        type=_positive_float,
        default=defaults.lr,
        help="student AdamW learning rate, cosine-decayed (default: %(default)s)",
    )
    add(
        "--weight-decay",
        type=_non_negative_float,
        default=defaults.weight_decay,
        metavar="WD",
        help="student AdamW weight decay (default: %(default)s)",
    )
    add(
        "--temperature",
        type=_positive_float,
        default=defaults.temperature,
        metavar="T",
        help="temperature of the KL term (default: %(default)s)",
    )
    add(
        "--stats-every",
        type=_at_least(0),
        default=defaults.stats_every,
        metavar="N",
        help="mokd-amortized: gradient statistics every N-th step, 0: never (default: %(default)s)",
    )
    add(
        "--normalize",
        choices=tuple(_NORMALIZE),
        default="auto",
        help="mokd-*: divide the direction by Σ π_j / L_j (FAMO's scaling); auto: the "
        "optimizer's default, on for amortized, off for the others (default: %(default)s)",
    )
    add("--train-size", type=_at_least(1), metavar="N", help="use the first N training examples")
    add("--test-size", type=_at_least(1), metavar="N", help="use the first N test examples")
    add("--out", type=Path, metavar="DIR", help="output folder (default: runs/<dataset>)")
    add(
        "--device",
        type=_device,
        default=defaults.device,
        help="cpu, cuda or cuda:N (default: %(default)s)",
    )
    add(
        "--threads",
        type=_at_least(1),
        default=1,
        metavar="N",
        help="CPU threads for torch; these small models run fastest on one (default: %(default)s)",
    )
    add("--no-progress", action="store_true", help="hide the progress bars")
    distill.set_defaults(handler=_run_distill, subparser=distill)


def _run_distill(args: argparse.Namespace, command: str) -> int:
    out = args.out if args.out is not None else Path("runs") / args.dataset
    _check_distill(args.subparser, args, out)
    config = DistillConfig(
        dataset=args.dataset,
        methods=tuple(args.methods),
        seeds=args.seeds,
        epochs=args.epochs,
        teacher_epochs=args.teacher_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        temperature=args.temperature,
        stats_every=args.stats_every,
        normalize=_NORMALIZE[args.normalize],
        train_size=args.train_size,
        test_size=args.test_size,
        data_dir=args.data_dir,
        out=out,
        device=args.device,
        progress=not args.no_progress,
    )
    from gradbalance.experiments.distill import run_distill  # after the check: needs the extras

    torch.set_num_threads(args.threads)
    outcome = run_distill(config, command)
    print(format_table(outcome.results))
    files = ", ".join(str(path) for path in outcome.files)
    print(f"wall time {outcome.results['wall_time_s']:.0f} s; wrote {files}")
    return 0


def _check_distill(distill: argparse.ArgumentParser, args: argparse.Namespace, out: Path) -> None:
    """Checks that need several arguments, the file system or the installed packages; exits via
    ``distill.error``."""
    missing = [name for name in _needed_modules(args.dataset) if find_spec(name) is None]
    if missing:
        distill.error(
            f"missing {', '.join(missing)}: gradbalance distill needs the examples extra "
            "(pip install 'gradbalance[examples]')"
        )
    if len(set(args.methods)) != len(args.methods):
        distill.error(f"--methods lists a method twice: {' '.join(args.methods)}")
    if args.normalize == "on" and "mokd-affine" in args.methods:
        distill.error("--normalize on needs non-negative weights; mokd-affine has none")
    existing = next(path for path in (out, *out.absolute().parents) if path.exists())
    if not existing.is_dir():
        distill.error(f"--out {out}: {existing} exists and is not a folder")
    if args.dataset == "cifar100":
        if args.data_dir is None:
            distill.error("--dataset cifar100 needs --data-dir (the folder with cifar-100-python/)")
        try:
            find_cifar100(args.data_dir)
        except FileNotFoundError as error:
            distill.error(str(error))
    elif args.data_dir is not None:
        distill.error(f"--data-dir is only used with --dataset cifar100, not {args.dataset}")


def _needed_modules(dataset: str) -> tuple[str, ...]:
    """The optional packages that ``gradbalance distill --dataset <dataset>`` imports."""
    by_dataset = {"mnist1d": ("mnist1d",), "digits": ("sklearn",), "cifar100": ()}
    return ("matplotlib", "tqdm", *by_dataset[dataset])


def _method(name: str) -> str:
    try:
        return parse_method(name).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be ≥ {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text}: only {torch.cuda.device_count()} CUDA device(s) here"
        )
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"use cpu, cuda or cuda:N, not {text!r}")
    return text


if __name__ == "__main__":
    sys.exit(main())
