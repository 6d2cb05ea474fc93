"""Summaries of a distillation experiment: ``results.json``, ``history.json`` and the table."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradbalance.experiments.training import History

__all__ = [
    "FIXED_WEIGHT_NAMES",
    "FIXED_WEIGHT_PREFIXES",
    "format_table",
    "headline",
    "is_fixed_weight",
    "paired_differences",
    "summarize",
    "summarize_method",
    "write_json",
]

Histories = Mapping[str, Sequence[History]]  # method name → one History per seed
# The fixed-weight rows; the one with the fewest mean errors is the reference of the paired
# differences (chosen on the test set: that favours the baseline).
FIXED_WEIGHT_PREFIXES = ("hinton-kd", "kd-fixed", "kd-w")
FIXED_WEIGHT_NAMES = ("kd",)  # mdistiller's KD, 0.9 · L_kl + 0.1 · L_ce


def is_fixed_weight(name: str) -> bool:
    """Whether the row ``name`` is a fixed weighting of the distillation and task losses."""
    return name in FIXED_WEIGHT_NAMES or name.startswith(FIXED_WEIGHT_PREFIXES)


# Two-sided 95 % quantiles of Student's t with 1..10 degrees of freedom.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def summarize_method(runs: Sequence[History]) -> dict[str, Any]:
    """Over seeds: final test accuracy and test errors (mean, sample std — 0 for one seed — and
    the values), run time; where the runs recorded them, the share of steps whose log-loss
    gradients conflict (GrC < 0) and the mean π of the distillation objective; for k ≥ 3 the
    share of every other pair's conflicting steps (``conflict_<i>_<j>_share``)."""
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
    pairs = sorted(name for name in runs[0].steps if name.startswith("conflict_"))
    for pair in pairs:  # k ≥ 3: the share of conflicting steps of every other pair
        shares = [statistics.fmean(v < 0 for v in run.steps[pair]["value"]) for run in runs]
        summary[f"{pair}_share"] = statistics.fmean(shares)
    return summary


def _spread(name: str, key: str, values: list[float]) -> dict[str, Any]:
    """``<name>_mean``, ``<name>_std`` (sample; 0 for one value) and the values under ``key``."""
    return {
        f"{name}_mean": statistics.fmean(values),
        f"{name}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
        key: values,
    }


def summarize(
    histories: Histories,
    header: Mapping[str, Any],
    teacher_accuracy: float,
    rival: str | None = None,
) -> dict[str, Any]:
    """The ``results.json`` document: ``header`` fields, the teacher, every method's summary and
    the paired differences to the best fixed weight (:func:`paired_differences`), and to
    ``rival`` too (``"paired_rival"``) when it ran."""
    methods = {name: summarize_method(runs) for name, runs in histories.items()}
    document = {
        **header,
        "teacher_accuracy": teacher_accuracy,
        "methods": methods,
        "paired": paired_differences(methods),
    }
    if rival in methods:
        document["paired_rival"] = paired_differences(methods, reference=rival)
    return document


def paired_differences(
    methods: Mapping[str, Mapping[str, Any]], reference: str | None = None
) -> dict[str, Any]:
    """Each method's test errors minus ``reference``'s (default: the best fixed weight's), seed
    by seed.

    Every method sees the same initialisation and batch order per seed, so the per-seed
    difference removes the seed's share of the variance. Per method, over the seeds both ran:
    ``n``, the mean difference with a two-sided 95 % Student-t interval (``low``, ``high``; none
    for one seed), and the sign counts ``fewer`` / ``more`` (seeds where the method made fewer /
    more errors). Empty when no fixed-weight row ran and no ``reference`` is named.
    """
    if reference is None:
        fixed = [name for name in methods if is_fixed_weight(name)]
        if not fixed:
            return {}
        reference = min(fixed, key=lambda name: methods[name]["errors_mean"])
    base = methods[reference]["errors"]
    paired = {}
    for name, summary in methods.items():
        if name == reference:
            continue
        diffs = [mine - theirs for mine, theirs in zip(summary["errors"], base, strict=False)]
        mean = statistics.fmean(diffs)
        entry = {"n": len(diffs), "mean": mean, "diffs": diffs}
        entry.update(fewer=sum(d < 0 for d in diffs), more=sum(d > 0 for d in diffs))
        if 1 < len(diffs) <= len(_T95) + 1:
            half = _T95[len(diffs) - 2] * statistics.stdev(diffs) / len(diffs) ** 0.5
            entry.update(low=mean - half, high=mean + half)
        paired[name] = entry
    return {"reference": reference, "methods": paired}


def history_document(histories: Histories) -> dict[str, list[dict[str, Any]]]:
    """The ``history.json`` document: per method, per seed, accuracy curve and step statistics."""
    return {
        name: [
            {
                "test_accuracy": run.test_accuracy,
                "test_errors_per_epoch": run.epoch_errors,
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
    paired = results.get("paired", {})
    width = max(len("method"), *(len(name) for name in methods))
    lines = [
        f"{results['dataset']}: teacher {results['teacher_accuracy']:.4f} "
        f"({results['teacher_errors']} errors), {len(results['seeds'])} seed(s) x "
        f"{results['epochs']} epochs",
        f"{'method':<{width}}  {'accuracy':>17}  {'vs student':>10}  {'errors':>13}  "
        f"{'GrC<0':>6}  {'s/run':>6}  {'Δ errors vs ' + paired.get('reference', '-'):>24}  "
        "errors per seed",
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
            f"{summary['seconds_mean']:>6.1f}  {_paired_cell(paired, name):>24}  {seeds}"
        )
    if "selection" in results:
        chosen = ", ".join(
            f"{slot}: {entry['chosen']}"
            for slot, entry in results["selection"].items()
            if isinstance(entry, dict)
        )
        lines.append(f"chosen on {results['selection']['validation']} held-out examples: {chosen}")
    if "published" in results:
        lines.append(f"published: {results['published']}")
    return "\n".join(lines)


def _paired_cell(paired: Mapping[str, Any], name: str) -> str:
    """``-12.4 [-20.1, -4.7] 5/0``: mean paired difference, its 95 % interval, fewer/more."""
    entry = paired.get("methods", {}).get(name)
    if entry is None:
        return ""
    interval = f" [{entry['low']:+.1f}, {entry['high']:+.1f}]" if "low" in entry else ""
    return f"{entry['mean']:+.1f}{interval} {entry['fewer']}/{entry['more']}"


def headline(results: Mapping[str, Any]) -> str:
    """One line that says what the table shows: the method with the fewest mean errors, and
    each balanced or rival method against the best fixed weight, paired by seed."""
    methods: Mapping[str, Mapping[str, Any]] = results["methods"]
    best = min(methods, key=lambda name: methods[name]["errors_mean"])
    line = f"Fewest test errors: {best} ({methods[best]['errors_mean']:.1f} on average)"
    paired = results.get("paired", {})
    parts = [
        f"{name} {entry['mean']:+.1f} ({entry['fewer']} of {entry['n']} seeds fewer)"
        for name, entry in paired.get("methods", {}).items()
        if not is_fixed_weight(name) and name != "student"
    ]
    if not parts:  # no fixed weight ran, or nothing but fixed weights and the student
        return line + "."
    reference = paired["reference"]
    return f"{line}; against the best fixed weight, {reference}: " + ", ".join(parts) + "."
