"""A table's per-row means as a chart: the picture a table's MLflow parent run carries.

Grouped bars, one group per column the plan ran and one bar per row with finished seeds, the
spread over seeds (the table's std or sem) as error bars and the paper's value as a black tick;
one panel per metric of the table's grid (`spec.metrics`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import pandas as pd

from core.errors import BenchError
from bench.specs import ArtifactSpec


def plot_row_means(spec: ArtifactSpec, agg: pd.DataFrame, err: str = "std",
                   columns: Iterable[str] | None = None, title: str | None = None):
    """`agg`: `bench.report.tables.aggregate`'s frame (row_id, column_id, metric, mean, err, n)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.lines import Line2D

    from bench.report.figures import _theme

    ours = agg[agg["n"] > 0]
    if columns is not None:
        ours = ours[ours["column_id"].isin(list(columns))]
    if ours.empty:
        raise BenchError(f"no cell of {spec.name} is done: no row mean to draw")
    _theme()
    cols = [c for c in spec.columns if c.id in set(ours["column_id"])]
    rows = [r for r in spec.rows if r.id in set(ours["row_id"])]
    palette = dict(zip((r.id for r in rows), sns.color_palette("tab10", len(rows))))
    metrics = [m for m in spec.metrics if m in set(ours["metric"])]
    width = max(5.5, 1.1 + 0.32 * len(rows) * len(cols) + 0.5 * len(cols))
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 4.8), squeeze=False)
    bar = 0.8 / len(rows)
    for ax, metric in zip(axes[0], metrics):
        for i, col in enumerate(cols):
            for j, row in enumerate(rows):
                sel = ours[(ours["row_id"] == row.id) & (ours["column_id"] == col.id) & (ours["metric"] == metric)]
                x = i - 0.4 + bar * (j + 0.5)
                if not sel.empty:
                    r = sel.iloc[0]
                    yerr = None if math.isnan(r["err"]) else r["err"]
                    ax.bar(x, r["mean"], bar * 0.92, yerr=yerr, color=palette[row.id], capsize=3,
                           error_kw={"elinewidth": 1.0})
                    ax.annotate(f"{int(r['n'])}", (x, 0), xytext=(0, 2), textcoords="offset points", ha="center",
                                va="bottom", fontsize="x-small", color="white")
                paper = spec.paper(row, col, metric)
                if paper is not None:
                    ax.hlines(paper[0], x - bar * 0.46, x + bar * 0.46, color="black", linewidth=2.0, zorder=4)
        ax.set_xticks(range(len(cols)), [c.label for c in cols])
        ax.set_xlabel("column (label ratio / setting)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{metric}: mean ± {err} over seeds (n in the bar)")
    handles = [Line2D([], [], color=palette[r.id], linewidth=8, label=r.label) for r in rows]
    if spec.paper_table is not None:
        handles.append(Line2D([], [], color="black", linewidth=2.0, label="paper"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize="small", frameon=True)
    fig.suptitle(title or f"{spec.name}: per-row means")
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(handles) - 1) // 4), 1, 1))
    return fig


def write_row_means_chart(spec: ArtifactSpec, agg: pd.DataFrame, path: Path, err: str = "std",
                          columns: Iterable[str] | None = None, title: str | None = None) -> Path:
    import matplotlib.pyplot as plt

    fig = plot_row_means(spec, agg, err, columns, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
