"""Summaries of a distillation experiment: ``results.json``, ``history.json`` and the table."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradbalance.experiments.training import History

__all__ = ["format_table", "summarize", "summarize_method", "write_json"]

Histories = Mapping[str, Sequence[History]]  # method name → one History per seed


def summarize_method(runs: Sequence[History]) -> dict[str, Any]:
    """Final test accuracy over seeds: mean, sample std (0 for one seed), the values, run time."""
    accuracies = [run.final_accuracy for run in runs]
    return {
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "accuracies": accuracies,
        "seconds_mean": statistics.fmean(run.seconds for run in runs),
    }


def summarize(
    histories: Histories, header: Mapping[str, Any], teacher_accuracy: float
) -> dict[str, Any]:
    """The ``results.json`` document: ``header`` fields, the teacher, and every method's summary."""
    return {
        **header,
        "teacher_accuracy": teacher_accuracy,
        "methods": {name: summarize_method(runs) for name, runs in histories.items()},
    }


def history_document(histories: Histories) -> dict[str, list[dict[str, Any]]]:
    """The ``history.json`` document: per method, per seed, accuracy curve and step statistics."""
    return {
        name: [
            {"test_accuracy": run.test_accuracy, "steps": run.steps, "seconds": run.seconds}
            for run in runs
        ]
        for name, runs in histories.items()
    }


def write_json(document: Mapping[str, Any], path: Path) -> None:
    """Write ``document`` as indented JSON."""
    path.write_text(json.dumps(document, indent=1) + "\n")


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of ``results``: accuracy mean ± std, per seed, gain over the student."""
    methods: Mapping[str, Mapping[str, Any]] = results["methods"]
    baseline = methods.get("student", {}).get("accuracy_mean")
    width = max(len("method"), *(len(name) for name in methods))
    lines = [
        f"{results['dataset']}: teacher {results['teacher_accuracy']:.3f}, "
        f"{len(results['seeds'])} seed(s) x {results['epochs']} epochs",
        f"{'method':<{width}}  {'accuracy':>15}  {'vs student':>10}  {'s/run':>6}  per seed",
    ]
    for name, summary in methods.items():
        mean, std = summary["accuracy_mean"], summary["accuracy_std"]
        gain = "" if baseline is None or name == "student" else f"{mean - baseline:+.3f}"
        seeds = " ".join(f"{value:.3f}" for value in summary["accuracies"])
        lines.append(
            f"{name:<{width}}  {mean:>7.3f} ± {std:.3f}  {gain:>10}  "
            f"{summary['seconds_mean']:>6.1f}  {seeds}"
        )
    return "\n".join(lines)
