"""The report's own plots, only where the pipeline saved none: training curves from the MLflow metric
history, the HPO parameter importances and the training doctor's per-layer figures. PNG bytes, drawn with
matplotlib's Agg backend."""

from __future__ import annotations

import io
from typing import Any

Series = dict[str, list[tuple[int, float]]]  # metric -> (step, value) pairs


def training_curves_png(history: Series, panels: list[list[str]], best_step: int | None = None) -> bytes:
    """One panel per group of metrics against the optimizer step; the best evaluation's step marked."""
    plt = _pyplot()
    panels = [[key for key in keys if history.get(key)] for keys in panels]
    panels = [keys for keys in panels if keys]
    with plt.style.context("default"):  # Optuna's plots switch the process-wide style to ggplot
        figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
        for ax, keys in zip(axes[0], panels, strict=True):
            for key in keys:
                steps, values = zip(*history[key], strict=True)
                ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, label=key)
            if best_step is not None:
                ax.axvline(best_step, color="grey", linestyle=":", linewidth=1, label="best step")
            if keys == ["lr"]:
                ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        figure.tight_layout()
        return _png(figure)


def importances_png(importances: dict[str, float]) -> bytes:
    """Horizontal bars, the most important parameter on top."""
    plt = _pyplot()
    ordered = sorted(importances.items(), key=lambda item: item[1])
    with plt.style.context("default"):
        figure, ax = plt.subplots(figsize=(6, 0.5 * len(ordered) + 1.2))
        ax.barh([name for name, _ in ordered], [value for _, value in ordered], color="tab:blue")
        ax.set_xlabel("importance")
        ax.set_title("HPO parameter importances")
        figure.tight_layout()
        return _png(figure)


def layer_figures_png(figures: dict[str, dict[str, list[tuple[int, float]]]], panels: list[tuple[str, str]]) -> bytes:
    """The training doctor's per-layer figures: one panel per (figure, title), one line per layer against the step,
    coloured from the first layer (dark) to the last (light); a figure spanning decades on a log scale."""
    plt = _pyplot()
    panels = [(key, title) for key, title in panels if figures.get(key)]
    with plt.style.context("default"):
        columns = min(2, len(panels))
        rows = (len(panels) + columns - 1) // columns
        figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
        for ax, (key, title) in zip(axes.flat, panels, strict=False):
            layers = figures[key]
            colours = plt.cm.viridis([i / max(1, len(layers) - 1) * 0.9 for i in range(len(layers))])
            positive = [v for points in layers.values() for _, v in points if v > 0]
            log_scale = bool(positive) and max(positive) / min(positive) > 100
            for (layer, points), colour in zip(layers.items(), colours, strict=True):
                shown = [(s, v) for s, v in points if v > 0 or not log_scale]  # a zero has no place on a log scale
                if shown:
                    steps, values = zip(*shown, strict=True)
                    ax.plot(steps, values, color=colour, linewidth=1, marker="o" if len(steps) <= 20 else None,
                            markersize=2, label=layer)  # fmt: skip
            if log_scale:
                ax.set_yscale("log")
            ax.set(title=title, xlabel="step")
            ax.grid(alpha=0.3)
            if len(layers) <= 12:
                ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        figure.tight_layout()
        return _png(figure)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
