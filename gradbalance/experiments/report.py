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
    """Over seeds: final test accuracy and test errors (mean, sample std — 0 for one seed — and
    the values), run time; where the runs recorded them, the share of steps whose log-loss
    gradients conflict (GrC < 0) and the mean π of the distillation objective."""
    summary = {
        **_spread("accuracy", "accuracies", [run.final_accuracy for run in runs]),
        **_spread("errors", "errors", [run.test_errors for run in runs]),
        "seconds_mean": statistics.fmean(run.seconds for run in runs),
    }
    for key, statistic, measure in (
        ("conflict_share", "conflict", lambda values: statistics.fmean(v < 0 for v in values)),
        ("pi_distill_mean", "pi_distill", statistics.fmean),
    ):
        recorded = [run.steps[statistic]["value"] for run in runs if statistic in run.steps]
        if recorded:
            summary[key] = statistics.fmean(measure(values) for values in recorded)
    return summary


def _spread(name: str, key: str, values: list[float]) -> dict[str, Any]:
    """``<name>_mean``, ``<name>_std`` (sample; 0 for one value) and the values under ``key``."""
    return {
        f"{name}_mean": statistics.fmean(values),
        f"{name}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
        key: values,
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
            {
                "test_accuracy": run.test_accuracy,
                "test_errors": run.test_errors,
                "steps": run.steps,
                "seconds": run.seconds,
            }
            for run in runs
        ]
        for name, runs in histories.items()
    }


def write_json(document: Mapping[str, Any], path: Path) -> None:
    """Write ``document`` as indented JSON."""
    path.write_text(json.dumps(document, indent=1) + "\n")


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of ``results``: accuracy and errors (mean ± std, per seed), gain over
    the student, share of conflicting steps."""
    methods: Mapping[str, Mapping[str, Any]] = results["methods"]
    baseline = methods.get("student", {}).get("accuracy_mean")
    width = max(len("method"), *(len(name) for name in methods))
    lines = [
        f"{results['dataset']}: teacher {results['teacher_accuracy']:.4f} "
        f"({results['teacher_errors']} errors), {len(results['seeds'])} seed(s) x "
        f"{results['epochs']} epochs",
        f"{'method':<{width}}  {'accuracy':>17}  {'vs student':>10}  {'errors':>13}  "
        f"{'GrC<0':>6}  {'s/run':>6}  errors per seed",
    ]
    for name, summary in methods.items():
        mean, std = summary["accuracy_mean"], summary["accuracy_std"]
        gain = "" if baseline is None or name == "student" else f"{mean - baseline:+.4f}"
        conflict = summary.get("conflict_share")
        shown = "" if conflict is None else f"{conflict:.1%}"
        seeds = " ".join(str(value) for value in summary["errors"])
        lines.append(
            f"{name:<{width}}  {mean:>8.4f} ± {std:.4f}  {gain:>10}  "
            f"{summary['errors_mean']:>6.1f} ± {summary['errors_std']:>4.1f}  {shown:>6}  "
            f"{summary['seconds_mean']:>6.1f}  {seeds}"
        )
    return "\n".join(lines)
