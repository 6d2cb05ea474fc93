"""The ``gradbalance`` command; ``gradbalance distill`` is the main job (a teacher, many students).

Every argument is checked before anything is loaded or written: bad input exits with status 2, an
argparse message, and no files.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from collections.abc import Callable, Sequence
from importlib.util import find_spec

import torch

from gradbalance.experiments.config import DistillConfig, Option
from gradbalance.experiments.datasets import EXAMPLES_INSTALL, dataset
from gradbalance.experiments.methods import parse_method
from gradbalance.experiments.report import format_table, headline

__all__ = ["build_parser", "main"]


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
    distill = commands.add_parser(
        "distill",
        help="train a teacher, then students with each method; write results.json and plots",
        description=(
            "Train a teacher CNN (cached in --out; its schedule is fixed: AdamW lr 3e-3, weight "
            "decay 0.05, batch 128, --teacher-epochs), then a student per method and seed from the "
            "same initialisation, and report the final test accuracy and errors (mean ± std over "
            "seeds). Writes results.json, history.json and PNG plots to --out."
        ),
    )
    defaults = DistillConfig()
    for spec in dataclasses.fields(DistillConfig):
        _add_option(distill, spec, getattr(defaults, spec.name))
    distill.set_defaults(handler=_run_distill, subparser=distill)


def _add_option(parser: argparse.ArgumentParser, spec: dataclasses.Field, default: object) -> None:
    """The command-line option of one :class:`DistillConfig` field, from its metadata."""
    option: Option = spec.metadata["option"]
    if option.flag is not None:
        parser.add_argument(option.flag, dest=spec.name, action="store_false", help=option.help)
        return
    if option.switch:
        flag = "--" + spec.name.replace("_", "-")
        parser.add_argument(flag, dest=spec.name, action="store_true", help=option.help)
        return
    kwargs: dict = {"dest": spec.name, "metavar": option.metavar, "choices": option.choices}
    if option.parse is not None:
        kwargs["type"] = _argparse_type(option.parse)
    if option.many:
        kwargs["nargs"] = "+"
    if option.values is not None:  # choices name values: show the choice of the default
        default = next(name for name, value in option.values.items() if value == default)
    shown = "" if default is None else " (default: %(default)s)"
    flag = "--" + spec.name.replace("_", "-")
    parser.add_argument(flag, default=default, help=option.help + shown, **kwargs)


def _argparse_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """``parse`` with its ValueError shown by argparse as it is."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _config(args: argparse.Namespace) -> DistillConfig:
    """The config the parsed arguments describe, with the dataset's defaults filled in."""
    values = {}
    for spec in dataclasses.fields(DistillConfig):
        option: Option = spec.metadata["option"]
        value = getattr(args, spec.name)
        if option.values is not None:
            value = option.values[value]
        if option.many and value is not None:
            value = tuple(value)
        values[spec.name] = value
    return DistillConfig(**values).resolved()


def _run_distill(args: argparse.Namespace, command: str) -> int:
    try:
        config = _config(args)
    except ValueError as error:
        args.subparser.error(str(error))
    _check_distill(args.subparser, config)
    if config.download:
        _download(args.subparser, config)
    from gradbalance.experiments.distill import run_distill  # after the check: needs the extras

    torch.set_num_threads(config.threads)
    outcome = run_distill(config, command)
    print(format_table(outcome.results))
    print(headline(outcome.results))
    files = ", ".join(str(path) for path in outcome.files)
    print(f"wall time {outcome.results['wall_time_s']:.0f} s; wrote {files}")
    return 0


def _check_distill(distill: argparse.ArgumentParser, config: DistillConfig) -> None:
    """Checks that need several settings, the file system or the installed packages; exits via
    ``distill.error``."""
    spec = dataset(config.dataset)
    missing = [name for name in _needed_modules(config) if find_spec(name) is None]
    if missing:
        extra = (
            spec.install
            if set(missing) <= set(spec.packages(config.data_dir))
            else EXAMPLES_INSTALL
        )
        distill.error(f"missing {', '.join(missing)}: gradbalance distill needs it ({extra})")
    if len(set(config.methods)) != len(config.methods):
        distill.error(f"--methods lists a method twice: {' '.join(config.methods)}")
    unused = sorted({name for name, _ in config.seeds_for} - set(config.methods))
    if unused:
        distill.error(f"--seeds-for names methods that do not run: {' '.join(unused)}")
    if config.normalize is True and "mokd-affine" in config.methods:
        distill.error("--normalize on needs non-negative weights; mokd-affine has none")
    existing = next(path for path in (config.out, *config.out.absolute().parents) if path.exists())
    if not existing.is_dir():
        distill.error(f"--out {config.out}: {existing} exists and is not a folder")
    if config.student_width is not None and spec.students[config.student].width is None:
        distill.error(
            f"--student-width is for the MLP students, not {config.dataset}'s {config.student}, "
            "whose shape is fixed"
        )
    if config.download and spec.download is None:
        distill.error(f"--download: {config.dataset} is not downloaded; drop --download")
    if config.download and config.data_dir is None:
        distill.error("--download needs --data-dir (where to put the files)")
    try:
        spec.check_data_dir(config.data_dir)
    except FileNotFoundError as error:
        if not config.download:
            distill.error(str(error))
    except ValueError as error:
        distill.error(str(error))
    if config.teacher_checkpoint is not None and not config.teacher_checkpoint.is_file():
        distill.error(f"--teacher-checkpoint {config.teacher_checkpoint}: no such file")


def _download(distill: argparse.ArgumentParser, config: DistillConfig) -> None:
    """Fetch the dataset into ``--data-dir`` unless it is already there."""
    spec = dataset(config.dataset)
    try:
        spec.check_data_dir(config.data_dir)
        return
    except FileNotFoundError:
        pass
    try:
        print(f"downloading {config.dataset} into {config.data_dir}", file=sys.stderr)
        spec.download(config.data_dir)
    except (ConnectionError, ValueError) as error:
        distill.error(str(error))


def _needed_modules(config: DistillConfig) -> tuple[str, ...]:
    """The optional packages that ``gradbalance distill`` imports for ``config``."""
    packages = ["matplotlib", "tqdm", *dataset(config.dataset).packages(config.data_dir)]
    if any(parse_method(name).weighting is not None for name in config.runnable_methods()):
        packages.append("torchjd")
    return tuple(packages)


if __name__ == "__main__":
    sys.exit(main())
