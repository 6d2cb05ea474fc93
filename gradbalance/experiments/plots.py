"""PNG plots of a distillation experiment, drawn from its ``history.json`` and ``results.json``.

Every method keeps one style (colour and marker, :func:`method_styles`) in every plot, and each
figure carries a caption with the command and commit that made it. Uses
:class:`matplotlib.figure.Figure` directly (no pyplot), so no GUI backend is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = [
    "PLOTS",
    "Style",
    "method_styles",
    "plot_accuracy",
    "plot_errors",
    "plot_step_statistic",
    "plot_summary",
    "plot_test_error_curves",
    "write_plots",
]

HistoryDocument = Mapping[str, Sequence[Mapping[str, Any]]]  # method → per-seed records
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


@dataclass(frozen=True)
class Style:
    color: Any
    marker: str


def method_styles(names: Sequence[str]) -> dict[str, Style]:
    """A distinct colour per method (tab20's 20, dark shades first), and a marker that changes
    with every colour too, so that no two methods share both."""
    palette = colormaps["tab20"].colors
    colors = palette[0::2] + palette[1::2]
    return {
        name: Style(colors[i % len(colors)], _MARKERS[i % len(_MARKERS)])
        for i, name in enumerate(names)
    }


def plot_accuracy(
    history: HistoryDocument, teacher_accuracy: float, path: Path, caption: str = ""
) -> None:
    """Test accuracy after each epoch, mean over seeds with a ± std band, per method."""
    figure, axes = _figure(caption)
    styles = method_styles(list(history))
    for name, runs in history.items():
        curves = np.array([run["test_accuracy"] for run in runs])
        _band(axes, curves, name, styles[name])
    axes.axhline(teacher_accuracy, color="black", linestyle="--", label="teacher")
    axes.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy (mean ± std over seeds)")
    _finish(figure, axes, path)


def plot_test_error_curves(history: HistoryDocument, path: Path, caption: str = "") -> bool:
    """Test errors after each epoch (log scale), mean over seeds with a ± std band: where each
    method stops improving. False (nothing written) when the history has no per-epoch errors."""
    if not all("test_errors_per_epoch" in run for runs in history.values() for run in runs):
        return False
    figure, axes = _figure(caption)
    styles = method_styles(list(history))
    for name, runs in history.items():
        curves = np.array([run["test_errors_per_epoch"] for run in runs], dtype=float)
        _band(axes, curves, name, styles[name])
    axes.set_yscale("log")
    axes.set(xlabel="epoch", ylabel="test errors", title="Test errors per epoch (mean ± std)")
    _finish(figure, axes, path)
    return True


def plot_errors(results: Mapping[str, Any], axes: Axes) -> None:
    """Final test errors per method: every seed a point, the mean a bar, best at the top."""
    methods = results["methods"]
    styles = method_styles(list(methods))
    order = sorted(methods, key=lambda name: methods[name]["errors_mean"], reverse=True)
    for row, name in enumerate(order):
        errors = np.asarray(methods[name]["errors"], dtype=float)
        style = styles[name]
        axes.barh(row, errors.mean(), color=style.color, alpha=0.35, height=0.7)
        jitter = np.linspace(-0.2, 0.2, len(errors)) if len(errors) > 1 else np.zeros(1)
        axes.scatter(errors, row + jitter, color=style.color, marker=style.marker, zorder=3, s=22)
    axes.set_yticks(range(len(order)), order)
    teacher = results.get("teacher_errors")
    if teacher is not None:
        axes.axvline(teacher, color="black", linestyle="--", linewidth=0.8, label="teacher")
        axes.legend(loc="lower right")
    axes.set(xlabel="test errors (bar: mean; points: seeds)", title="Final test errors")
    axes.grid(alpha=0.3, axis="x")


def plot_step_statistic(
    history: HistoryDocument,
    statistic: str,
    transform: Callable[[np.ndarray], np.ndarray],
    ylabel: str,
    title: str,
    path: Path | None,
    caption: str = "",
    axes: Axes | None = None,
) -> bool:
    """One per-step statistic for every method that recorded it, mean over seeds and smoothed.

    The faint line is the seed mean at every recorded step; the solid line its moving average.
    Draws into ``axes`` when given, else writes ``path``. Returns False (and draws nothing)
    when no method recorded ``statistic``.
    """
    series = {name: _seed_mean(runs, statistic, transform) for name, runs in history.items()}
    series = {name: values for name, values in series.items() if values is not None}
    if not series:
        return False
    figure = None
    if axes is None:
        figure, axes = _figure(caption)
    styles = method_styles(list(history))
    for name, (steps, values) in series.items():
        color = styles[name].color
        axes.plot(steps, values, alpha=0.25, linewidth=0.7, color=color)
        axes.plot(*_moving_average(steps, values), color=color, label=name)
    _decorate(axes, statistic, np.concatenate([values for _, values in series.values()]))
    axes.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    if figure is not None:
        _finish(figure, axes, path)
    else:
        axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
    return True


def plot_summary(
    history: HistoryDocument, results: Mapping[str, Any], path: Path, caption: str
) -> None:
    """The main result in one picture: final errors per method with per-seed points, π of the
    distillation objective and GrC over training."""
    figure = Figure(figsize=(16, 5), layout="constrained")
    errors_axes, pi_axes, conflict_axes = figure.subplots(1, 3)
    plot_errors(results, errors_axes)
    for axes, (statistic, transform, ylabel, title) in (
        (pi_axes, PLOTS["weights.png"]),
        (conflict_axes, PLOTS["conflict.png"]),
    ):
        if not plot_step_statistic(history, statistic, transform, ylabel, title, None, axes=axes):
            axes.set_axis_off()
    figure.suptitle(caption, fontsize="small")
    figure.savefig(path, dpi=100)


# file name → (statistic, transform of its values, y label, title)
PLOTS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray], str, str]] = {
    "weights.png": (
        "pi_distill",
        np.asarray,
        "π_distill (first objective's weight)",
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


def write_plots(
    history: HistoryDocument, results: Mapping[str, Any], folder: Path, caption: str = ""
) -> list[Path]:
    """``summary.png``, ``errors.png``, ``test_errors.png``, ``accuracy.png`` and every plot of
    :data:`PLOTS` that has data; returns the files written."""
    written = [folder / "summary.png", folder / "errors.png", folder / "accuracy.png"]
    plot_summary(history, results, written[0], caption)
    figure, axes = _figure(caption)
    plot_errors(results, axes)
    figure.savefig(written[1], dpi=100)
    plot_accuracy(history, results["teacher_accuracy"], written[2], caption)
    if plot_test_error_curves(history, folder / "test_errors.png", caption):
        written.append(folder / "test_errors.png")
    for filename, (statistic, transform, ylabel, title) in PLOTS.items():
        path = folder / filename
        if plot_step_statistic(history, statistic, transform, ylabel, title, path, caption):
            written.append(path)
    return written


def _figure(caption: str) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(8, 5), layout="constrained")
    if caption:
        figure.suptitle(caption, fontsize="x-small")
    return figure, figure.subplots()


def _band(axes: Axes, curves: np.ndarray, name: str, style: Style) -> None:
    epochs = np.arange(1, curves.shape[1] + 1)
    mean, std = curves.mean(axis=0), curves.std(axis=0)
    axes.plot(epochs, mean, label=name, color=style.color, marker=style.marker, markersize=3)
    axes.fill_between(epochs, mean - std, mean + std, color=style.color, alpha=0.15)


def _finish(figure: Figure, axes: Axes, path: Path) -> None:
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)


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


def _decorate(axes: Axes, statistic: str, values: np.ndarray) -> None:
    """Reference lines and scales that make each statistic readable; π's axis spans [0, 1] and
    every value off the simplex (PCGrad's π > 1, PCD's scaled weights) too."""
    if statistic == "pi_distill":
        finite = values[np.isfinite(values)]
        low = min(-0.02, float(finite.min(initial=0.0)) - 0.02)
        high = max(1.02, float(finite.max(initial=1.0)) + 0.02)
        axes.set_ylim(low, high)
        axes.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    elif statistic == "conflict":
        axes.set_yscale("symlog", linthresh=1e-2)
        axes.axhline(0, color="black", linewidth=0.8)
    else:
        axes.axhline(0, color="black", linewidth=0.8)
