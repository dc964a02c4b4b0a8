"""The paper's claim as a picture: every LSM − baseline pair of a table as a forest plot.

One line per pair (method x label ratio): our mean delta over the seeds both rows finished, its 95%
confidence interval (Student's t over the per-seed deltas, as `bench report`'s delta table), n, and
the paper's delta beside it; one panel per paired metric (AP, then APs / APm / APl where the spec
pairs them). The numbers are `bench.report.tables.paired_deltas`, so the figure, its CSV and the
table's delta section agree by construction.

`bench figure deltas TABLE` draws it; `bench run` / `bench report` write it next to the table
(`<table>_deltas.png` + `<table>_deltas_data.csv`) when the spec has baseline pairs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import pandas as pd

from core.errors import BenchError
from bench.report.tables import paired_deltas
from bench.specs import ArtifactSpec

METRIC_TITLES = {"AP": "AP (all sizes)", "APs": "APs (small)", "APm": "APm (medium)", "APl": "APl (large)",
                 "AP50": "AP50", "AP75": "AP75"}
OURS_COLOR, PAPER_COLOR = "tab:blue", "tab:orange"
CSV_COLUMNS = ("baseline_id", "lsm_id", "baseline", "lsm", "column_id", "column", "metric", "n", "seeds", "deltas",
               "mean", "ci_low", "ci_high", "paper_delta")
# layout, in inches: the PNG is (width, height) x the save dpi, so a test can check its size
PANEL_WIDTH, LABEL_WIDTH, ROW_HEIGHT, FRAME_HEIGHT = 3.3, 2.4, 0.42, 2.0
LABEL_CHAR_WIDTH, LEGEND_ENTRY_WIDTH, LEGEND_ROW_HEIGHT = 0.085, 3.6, 0.25  # at the theme's font sizes


def label_width(label_chars: int) -> float:
    """Room for the pair labels left of the panels: at least LABEL_WIDTH, more for long row names."""
    return max(LABEL_WIDTH, LABEL_CHAR_WIDTH * label_chars + 0.3)


def legend_columns(n_entries: int, n_metrics: int, label_chars: int = 0) -> int:
    """The legend's entries side by side where the figure is wide enough, else one per line."""
    width = label_width(label_chars) + PANEL_WIDTH * n_metrics
    return n_entries if width >= LEGEND_ENTRY_WIDTH * n_entries else 1


def figure_size(n_pairs: int, n_metrics: int, label_chars: int = 0, legend_rows: int = 1) -> tuple[float, float]:
    return (label_width(label_chars) + PANEL_WIDTH * n_metrics,
            FRAME_HEIGHT + LEGEND_ROW_HEIGHT * (legend_rows - 1) + ROW_HEIGHT * max(n_pairs, 1))


def deltas_frame(spec: ArtifactSpec, results: pd.DataFrame | None,
                 columns: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per pair x column x paired metric (CSV_COLUMNS), in spec order.

    `columns`: the column ids to show (the plan's); default every column of the spec. `seeds` and
    `deltas` are the per-seed values joined by ';' so that the CSV says what the mean is of."""
    if not spec.baseline_pairs:
        raise BenchError(f"spec {spec.name} has no baseline_pairs: there is no LSM − baseline delta to draw")
    d = paired_deltas(results, spec)
    if columns is not None:
        keep = list(columns)
        d = d[d["column_id"].isin(keep)]
    out = pd.DataFrame({
        "baseline_id": d["baseline_id"], "lsm_id": d["lsm_id"],
        "baseline": [spec.row(r).label for r in d["baseline_id"]],
        "lsm": [spec.row(r).label for r in d["lsm_id"]],
        "column_id": d["column_id"], "column": [spec.column(c).label for c in d["column_id"]],
        "metric": d["metric"], "n": d["n"].astype(int),
        "seeds": [";".join(str(s) for s in seeds) for seeds in d["seeds"]],
        "deltas": [";".join(f"{x:.4f}" for x in xs) for xs in d["deltas"]],
        "mean": d["mean"], "ci_low": d["ci_low"], "ci_high": d["ci_high"], "paper_delta": d["paper_delta"],
    }, columns=list(CSV_COLUMNS))
    return out.reset_index(drop=True)


def _pair_label(rows: pd.DataFrame, name_lsm: bool = False) -> str:
    """'UBteacher, 5% (n=2)': the baseline names the pair, or 'UBteacher + MLC vs UBteacher, 5% (n=2)'
    where the baseline has several LSM rows (Tables 4 and 6); n over the panels (a range if they differ)."""
    first = rows.iloc[0]
    ns = sorted(set(int(n) for n in rows["n"]))
    n = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"
    name = f"{first['lsm']} vs {first['baseline']}" if name_lsm else first["baseline"]
    return f"{name}, {first['column']} ({n})"


def plot_deltas(frame: pd.DataFrame, title: str = "LSM − baseline, paired by seed"):
    """Forest plot of `deltas_frame`: a panel per metric, a line per pair; our mean with its 95% CI
    (a dot alone where n = 1, nothing where n = 0) and the paper's delta as a diamond."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from bench.report.figures import _require, _theme

    _require(frame, ("baseline", "column", "metric", "n", "mean", "ci_low", "ci_high", "paper_delta"),
             "paired deltas")
    _theme()
    metrics = list(dict.fromkeys(frame["metric"]))
    pairs = list(dict.fromkeys(zip(frame["baseline_id"], frame["lsm_id"], frame["column_id"])))
    shared = frame.groupby("baseline_id")["lsm_id"].nunique()
    labels = [_pair_label(frame[(frame["baseline_id"] == b) & (frame["lsm_id"] == lsm) & (frame["column_id"] == c)],
                          name_lsm=shared[b] > 1) for b, lsm, c in pairs]
    chars = max(map(len, labels), default=0)
    single = bool((frame["n"] == 1).any())
    handles = [Line2D([], [], color=OURS_COLOR, marker="o", linewidth=2.2,
                      label="ours: mean Δ over paired seeds, 95% CI (Student's t)")]
    if single:
        handles.append(Line2D([], [], color=OURS_COLOR, marker="o", markerfacecolor="white", linestyle="none",
                              label="ours, one seed pair (no CI)"))
    if frame["paper_delta"].notna().any():
        handles.append(Line2D([], [], color=PAPER_COLOR, marker="D", markeredgecolor="black", linestyle="none",
                              label="paper: its LSM − baseline (where published)"))
    ncol = legend_columns(len(handles), len(metrics), chars)
    legend_rows = -(-len(handles) // ncol)
    width, height = figure_size(len(pairs), len(metrics), chars, legend_rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(width, height), sharey=True, squeeze=False)
    fig.subplots_adjust(left=label_width(chars) / width, right=1 - 0.25 / width, top=1 - 0.75 / height,
                        bottom=(1.25 + LEGEND_ROW_HEIGHT * (legend_rows - 1)) / height, wspace=0.08)
    y = {p: i for i, p in enumerate(pairs)}
    for ax, metric in zip(axes[0], metrics):
        sub = frame[frame["metric"] == metric]
        ax.axvline(0.0, color="0.4", linewidth=1.0, linestyle="--", zorder=1)
        values = [0.0]
        for r in sub.itertuples():
            yy = y[(r.baseline_id, r.lsm_id, r.column_id)]
            if r.n >= 2 and not math.isnan(r.ci_low):
                ax.hlines(yy, r.ci_low, r.ci_high, color=OURS_COLOR, linewidth=2.2, zorder=2)
                for end in (r.ci_low, r.ci_high):
                    ax.vlines(end, yy - 0.12, yy + 0.12, color=OURS_COLOR, linewidth=1.4, zorder=2)
                values += [r.ci_low, r.ci_high]
            if r.n >= 1:
                ax.plot([r.mean], [yy], "o", color=OURS_COLOR, markersize=7, zorder=3,
                        markerfacecolor=OURS_COLOR if r.n >= 2 else "white")
                values.append(r.mean)
            if not math.isnan(r.paper_delta):
                ax.plot([r.paper_delta], [yy + 0.22], "D", color=PAPER_COLOR, markersize=6, zorder=3,
                        markeredgecolor="black", markeredgewidth=0.6)
                values.append(r.paper_delta)
        lo, hi = min(values), max(values)
        pad = 0.08 * (hi - lo) if hi > lo else 1.0
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_title(METRIC_TITLES.get(metric, metric))
        ax.set_xlabel(f"Δ {metric} (LSM − baseline, points)")
        ax.grid(axis="y", visible=False)
    axes[0][0].set_yticks(range(len(pairs)), labels)
    axes[0][0].set_ylim(len(pairs) - 0.5, -0.6)  # spec order from the top
    fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=True, fontsize="small",
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title)
    return fig


def write_deltas_figure(spec: ArtifactSpec, results: pd.DataFrame | None, out_dir: Path, command: str,
                        header: dict | None = None, columns: Iterable[str] | None = None,
                        preset: str | None = None) -> tuple[Path, Path] | None:
    """`<out_dir>/<spec>_deltas.png` + `_deltas_data.csv`; None (nothing written) while no pair has
    a seed finished in both of its rows."""
    from bench.report.figures import save

    frame = deltas_frame(spec, results, columns)
    if not (frame["n"] > 0).any():
        return None
    preset = preset or (header or {}).get("preset")
    title = f"{spec.name}: LSM − baseline, paired by seed" + (f" (preset {preset})" if preset else "")
    fig = plot_deltas(frame, title)
    extra = {k: v for k, v in (header or {}).items() if k != "command"}
    return save(fig, frame, Path(out_dir) / f"{spec.name}_deltas.png", command, header=extra)


