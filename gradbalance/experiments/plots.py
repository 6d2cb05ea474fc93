"""PNG plots of a distillation experiment, drawn from its ``history.json`` document.

Uses :class:`matplotlib.figure.Figure` directly (no pyplot), so no GUI backend is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["PLOTS", "plot_accuracy", "plot_step_statistic", "write_plots"]

HistoryDocument = Mapping[str, Sequence[Mapping[str, Any]]]  # method → per-seed records


def plot_accuracy(history: HistoryDocument, teacher_accuracy: float, path: Path) -> None:
    """Test accuracy after each epoch, mean over seeds with a ± std band, per method."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for name, runs in history.items():
        curves = np.array([run["test_accuracy"] for run in runs])
        epochs = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(axis=0), curves.std(axis=0)
        (line,) = axes.plot(epochs, mean, label=name)
        axes.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes.axhline(teacher_accuracy, color="black", linestyle="--", label="teacher")
    axes.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy (mean ± std over seeds)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)


def plot_step_statistic(
    history: HistoryDocument,
    statistic: str,
    transform: Callable[[np.ndarray], np.ndarray],
    ylabel: str,
    title: str,
    path: Path,
) -> bool:
    """One per-step statistic for every method that recorded it, mean over seeds and smoothed.

    The faint line is the seed mean at every recorded step; the solid line its moving average.
    Returns False (and writes nothing) when no method recorded ``statistic``.
    """
    series = {name: _seed_mean(runs, statistic, transform) for name, runs in history.items()}
    series = {name: values for name, values in series.items() if values is not None}
    if not series:
        return False
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for name, (steps, values) in series.items():
        (line,) = axes.plot(steps, values, alpha=0.25, linewidth=0.7)
        axes.plot(*_moving_average(steps, values), color=line.get_color(), label=name)
    _decorate(axes, statistic)
    axes.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)
    return True


# file name → (statistic, transform of its values, y label, title)
PLOTS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray], str, str]] = {
    "weights.png": (
        "pi_distill",
        np.asarray,
        "π_distill (π_task = 1 − π_distill)",
        "Weight of the distillation objective",
    ),
    "conflict.png": (
        "conflict",
        np.asarray,
        "GrC = ⟨g_distill, g_task⟩ (symlog)",
        "Gradient conflict of the log-losses (< 0: conflict)",
    ),
    "cosine.png": (
        "cosine",
        np.asarray,
        "cos(g_distill, g_task)",
        "Cosine between the log-loss gradients",
    ),
    "dominance.png": (
        "dominance",
        np.log10,
        "log10 GrD = log10(‖g_distill‖ / ‖g_task‖)",
        "Gradient dominance (> 0: distillation dominates)",
    ),
}


def write_plots(history: HistoryDocument, teacher_accuracy: float, folder: Path) -> list[Path]:
    """``accuracy.png`` and every plot of :data:`PLOTS` that has data; returns the files written."""
    written = [folder / "accuracy.png"]
    plot_accuracy(history, teacher_accuracy, written[0])
    for filename, (statistic, transform, ylabel, title) in PLOTS.items():
        path = folder / filename
        if plot_step_statistic(history, statistic, transform, ylabel, title, path):
            written.append(path)
    return written


def _seed_mean(
    runs: Sequence[Mapping[str, Any]],
    statistic: str,
    transform: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, mean over seeds of the transformed values), or None if not recorded."""
    records = [run["steps"].get(statistic) for run in runs]
    if any(record is None for record in records):
        return None
    steps = np.asarray(records[0]["step"])
    values = np.array([transform(np.asarray(record["value"])) for record in records])
    return steps, values.mean(axis=0)


def _moving_average(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centred moving average over about 2% of the points (at least 1)."""
    window = max(1, len(values) // 50)
    kernel = np.ones(window) / window
    return np.convolve(steps, kernel, mode="valid"), np.convolve(values, kernel, mode="valid")


def _decorate(axes: Axes, statistic: str) -> None:
    """Reference lines and scales that make each statistic readable."""
    if statistic == "pi_distill":
        axes.set_ylim(-0.02, 1.02)
        axes.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    elif statistic == "conflict":
        axes.set_yscale("symlog", linthresh=1e-2)
        axes.axhline(0, color="black", linewidth=0.8)
    else:
        axes.axhline(0, color="black", linewidth=0.8)
