"""Charts of evaluation reports (:func:`category_accuracy_chart` for the judge's accuracies,
:func:`score_chart` for any scorer's means, :func:`win_rate_chart` for win rates). matplotlib (the
``dev`` extra) is imported inside each function, so importing this module stays cheap; figures are
drawn on the Agg canvas, never through pyplot's global state, and written atomically."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

OVERALL = "overall"


def category_accuracy_chart(
    systems: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, *, title: str
) -> Path:
    """Grouped bars of accuracy per category and overall, one colour per system, with 95% intervals
    as error bars; writes a PNG to ``path`` (atomically) and returns it.

    ``systems`` maps a system's name to the dict of :func:`img_guidance.eval.shapes.report_dict`
    (``per_category`` -> {category: {"accuracy", "ci95": [lo, hi], "n", ...}}, ``overall``,
    ``category_mean``); every system must have the same categories. Categories keep the first
    system's order."""
    # 1. Check inputs, before importing matplotlib
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"category_accuracy_chart writes a PNG, but {str(path)!r} does not end in .png")
    categories = _check_systems(systems)
    columns = [*categories, OVERALL]

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # 2. Draw: one group of bars per column, one bar per system
    names = list(systems)
    width = 0.8 / len(names)
    x = np.arange(len(columns))
    fig = Figure(
        figsize=(min(16.0, max(6.0, 1.0 + len(columns) * (0.4 + 0.22 * len(names)))), 4.5),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        stats = [_column(systems[name], column) for column in columns]
        accuracy = np.array([s["accuracy"] for s in stats])
        low = np.array([s["ci95"][0] for s in stats])
        high = np.array([s["ci95"][1] for s in stats])
        errors = np.clip(np.stack([accuracy - low, high - accuracy]), 0.0, None)  # [2, columns]
        label = name
        mean = systems[name].get("category_mean")
        if isinstance(mean, (int, float)) and math.isfinite(mean):
            label = f"{name} (category mean {mean:.3f})"
        ax.bar(
            x + (i - (len(names) - 1) / 2) * width,
            accuracy,
            width,
            yerr=errors,
            capsize=2,
            color=f"C{i % 10}",  # matplotlib's default cycle
            error_kw={"elinewidth": 0.8, "ecolor": "0.2"},
            label=label,
        )
    ax.axvline(len(categories) - 0.5, color="0.6", linestyle=":", linewidth=0.8)  # categories | overall
    ax.set_xticks(x, [_tick_label(systems, column) for column in columns], fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(loc="outside lower center", ncols=min(len(names), 3), fontsize=8, frameon=False)

    # 3. Write atomically: a temporary file beside the target, then rename
    return _write_png(fig, path)


def _write_png(fig: Any, path: Path) -> Path:
    """Save ``fig`` as a PNG at ``path`` through a temporary file beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            fig.savefig(file, format="png", dpi=150)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def score_chart(
    systems: Mapping[str, Mapping[str, Mapping[str, Any]]],
    path: str | os.PathLike,
    *,
    title: str,
    ylabel: str,
) -> Path:
    """Grouped bars of a scorer's mean per category (and ``overall``), one colour per system, with
    95% intervals: ``systems`` maps a name to {column: {"mean", "ci95": [lo, hi]}} (every system the
    same columns, the first system's order). Writes a PNG atomically; returns its path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"score_chart writes a PNG, but {str(path)!r} does not end in .png")
    if not systems:
        raise ValueError("score_chart needs at least one system, got none")
    columns = list(next(iter(systems.values())))
    for name, table in systems.items():
        if list(table) != columns:
            raise ValueError(f"system {name!r} has columns {list(table)}, the first system {columns}")

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(systems)
    width = 0.8 / len(names)
    x = np.arange(len(columns))
    fig = Figure(
        figsize=(min(16.0, max(6.0, 1.0 + len(columns) * (0.4 + 0.22 * len(names)))), 4.5),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        means = np.array([_finite_or_nan(systems[name][c]["mean"]) for c in columns])
        low = np.array([_finite_or_nan(systems[name][c]["ci95"][0]) for c in columns])
        high = np.array([_finite_or_nan(systems[name][c]["ci95"][1]) for c in columns])
        errors = np.nan_to_num(np.clip(np.stack([means - low, high - means]), 0.0, None))
        ax.bar(
            x + (i - (len(names) - 1) / 2) * width,
            means,
            width,
            yerr=errors,
            capsize=2,
            color=f"C{i % 10}",
            error_kw={"elinewidth": 0.8, "ecolor": "0.2"},
            label=name,
        )
    ax.set_xticks(x, [c.replace("_", " ") for c in columns], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(loc="outside lower center", ncols=min(len(names), 3), fontsize=8, frameon=False)
    return _write_png(fig, path)


def win_rate_chart(systems: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, *, title: str) -> Path:
    """Horizontal bars of each system's per-prompt win rate over the reference with its 95% interval:
    ``systems`` maps a name to {"win_rate", "win_rate_ci95": [lo, hi]}. A PNG, written atomically."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"win_rate_chart writes a PNG, but {str(path)!r} does not end in .png")
    if not systems:
        raise ValueError("win_rate_chart needs at least one system, got none")

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(systems)
    rates = np.array([systems[n]["win_rate"] for n in names])
    low = np.array([systems[n]["win_rate_ci95"][0] for n in names])
    high = np.array([systems[n]["win_rate_ci95"][1] for n in names])
    fig = Figure(figsize=(6.0, 1.2 + 0.5 * len(names)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, rates, xerr=np.clip(np.stack([rates - low, high - rates]), 0.0, None), capsize=3, color="C0")
    ax.axvline(0.5, color="0.5", linestyle=":", linewidth=0.8)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("win rate over the reference (95% CI)")
    ax.set_title(title)
    return _write_png(fig, path)


def _finite_or_nan(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def _check_systems(systems: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The categories shared by every system (first seen first); a ValueError naming the system and
    the category for any that is missing or malformed."""
    if not systems:
        raise ValueError("category_accuracy_chart needs at least one system, got none")
    categories: list[str] = []
    for name, report in systems.items():
        per_category = report.get("per_category") if isinstance(report, Mapping) else None
        if not isinstance(per_category, Mapping):
            raise ValueError(f"system {name!r} has no 'per_category' mapping: is it a report_dict(...)?")
        categories += [c for c in per_category if c not in categories]
    for name, report in systems.items():
        for column in [*categories, OVERALL]:
            _column(report, column, name=name)
    return categories


def _column(report: Mapping[str, Any], column: str, *, name: str = "") -> Mapping[str, Any]:
    """The stats of one category (or ``overall``) of one report, checked."""
    where = f"system {name!r}, category {column!r}"
    stats = report.get(OVERALL) if column == OVERALL else report["per_category"].get(column)
    if not isinstance(stats, Mapping):
        raise ValueError(f"{where}: missing (every system needs every category the others have)")
    accuracy, interval = stats.get("accuracy"), stats.get("ci95")
    if not isinstance(accuracy, (int, float)) or not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"{where}: accuracy must be a number in [0, 1], got {accuracy!r}")
    if (
        not isinstance(interval, (list, tuple))
        or len(interval) != 2
        or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in interval)
        or interval[0] > interval[1]
    ):
        raise ValueError(f"{where}: ci95 must be [low, high] within [0, 1], got {interval!r}")
    return stats


def _tick_label(systems: Mapping[str, Mapping[str, Any]], column: str) -> str:
    """The column's name, with its number of images when every system agrees on it."""
    counts = {_column(report, column).get("n") for report in systems.values()}
    label = column.replace("_", " ")
    if len(counts) == 1 and isinstance(n := counts.pop(), int):
        label += f"\nn={n}"
    return label
