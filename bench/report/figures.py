"""The paper's figures from our runs: seaborn plots, each written as PNG + the CSV behind it.

- Figure 5: AP against the filtering threshold (t for UBteacher, alpha for UBteacher + LSM),
  mean +- std over seeds, the paper's 23.95 at alpha = 0.5 marked on the coco preset.
- Figure 4: average recall and AP over training, UBteacher vs UBteacher + LSM, from the periodic
  evaluations the worker logs to each cell's metrics.jsonl.
- Figure 1: IoU of pseudo-labels (detections above the threshold) with the ground truth against
  box area, from a trained supervised detector on images whose ground truth we have.
- Pseudo-label quality per step: precision / recall by size of the sets the UBteacher adapter logs
  (above t; with LSM also above alpha).
- Samples: a teacher's detections on a few unlabeled images beside their hidden ground truth,
  coloured by score, the line style telling the band: dropped (<= alpha), LSM's PIM/SD only
  (alpha < score <= t), pseudo-label of the main branch (> t).

Plot functions take tidy frames and return a matplotlib Figure (tests inspect its axes); `save`
writes the PNG (with the command that made it in the PNG's metadata) and the CSV (the command in
its first line), atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from core.errors import BenchError  # noqa: E402
from core.paths import read_metrics  # noqa: E402

CURVE_LABELS = {"ubteacher": "UBteacher (threshold t)", "ubteacher_lsm": "UBteacher + LSM (threshold α)"}
CURVE_COLORS = {CURVE_LABELS["ubteacher"]: "tab:red", CURVE_LABELS["ubteacher_lsm"]: "tab:blue"}
SIZES = ("small", "medium", "large")


def _theme() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.2)


# -- Figure 5 ----------------------------------------------------------------------------------------
def plot_threshold_curves(points: pd.DataFrame, paper_point: tuple[float, float] | None = None,
                          title: str = "Filtering threshold (Figure 5)") -> plt.Figure:
    """`points`: curve (ubteacher | ubteacher_lsm), threshold, seed, AP; one row per finished cell."""
    _require(points, ("curve", "threshold", "seed", "AP"), "figure5 points")
    _theme()
    df = points.assign(method=points["curve"].map(CURVE_LABELS).fillna(points["curve"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sns.lineplot(data=df, x="threshold", y="AP", hue="method", palette=CURVE_COLORS, errorbar="sd",
                 marker="o", err_style="band", ax=ax)
    if paper_point is not None:
        x, y = paper_point
        ax.scatter([x], [y], marker="*", s=220, color="tab:blue", edgecolor="black", zorder=5,
                   label=f"paper: {y:.2f} AP at α = {x:g}")
    ax.set_xlabel("filtering threshold (t for UBteacher, α for UBteacher + LSM)")
    ax.set_ylabel("AP (COCO AP50:95, %)")
    ax.set_title(title)
    ax.set_xticks(sorted(df["threshold"].unique()))
    n = df.groupby(["curve", "threshold"])["seed"].nunique()
    ax.legend(title=f"mean ± std over {n.min()}-{n.max()} seeds" if n.min() != n.max()
              else f"mean ± std over {n.min()} seed{'s' if n.min() > 1 else ''}", loc="best")
    fig.tight_layout()
    return fig


# -- Figure 4 ----------------------------------------------------------------------------------------
def eval_curves(metrics_path: Path) -> pd.DataFrame:
    """iteration, metric (AP, AR100, ...), value of the reported (first evaluated) model."""
    rows = []
    for rec in read_metrics(metrics_path):
        evals = [k for k in rec if k.startswith("eval.") and k.count(".") == 2]
        if not evals:
            continue
        model = evals[0].split(".")[1]
        for metric in ("AP", "AP50", "AR100", "APs", "APm", "APl"):
            key = f"eval.{model}.{metric}"
            if key in rec:
                rows.append({"iteration": rec["iteration"], "metric": metric, "value": float(rec[key])})
    df = pd.DataFrame(rows, columns=["iteration", "metric", "value"])
    return df.drop_duplicates(["iteration", "metric"], keep="last")  # a resumed cell re-logs nothing twice


def plot_training_curves(curves: pd.DataFrame, metrics: tuple[str, ...] = ("AR100", "AP"),
                         title: str = "Recall and AP over training (Figure 4)") -> plt.Figure:
    """`curves`: method, seed, iteration, metric, value; one panel per metric, mean ± std over seeds."""
    _require(curves, ("method", "seed", "iteration", "metric", "value"), "training curves")
    _theme()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2), squeeze=False)
    names = {"AR100": "average recall (AR@100, %)", "AP": "AP (COCO AP50:95, %)", "AP50": "AP50 (%)"}
    for ax, metric, letter in zip(axes[0], metrics, "abcdef"):
        sub = curves[curves["metric"] == metric]
        sns.lineplot(data=sub, x="iteration", y="value", hue="method", errorbar="sd", marker="o", ax=ax,
                     palette=_palette(sub["method"]))
        ax.set_xlabel("training iteration")
        ax.set_ylabel(names.get(metric, metric))
        ax.set_title(f"({letter}) {metric}")
        if ax.get_legend() is not None:
            ax.legend(title="method (mean ± std over seeds)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- pseudo-label quality ----------------------------------------------------------------------------
def pseudo_label_curves(metrics_path: Path, prefix: str = "pl") -> pd.DataFrame:
    """iteration, stat (precision | recall), size (all | small | medium | large), value."""
    rows = []
    for rec in read_metrics(metrics_path):
        for stat in ("precision", "recall"):
            for size in ("all",) + SIZES:
                key = f"{prefix}_{stat}" + ("" if size == "all" else f"_{size}")
                if key in rec:
                    rows.append({"iteration": rec["iteration"], "stat": stat, "size": size, "value": float(rec[key])})
    return pd.DataFrame(rows, columns=["iteration", "stat", "size", "value"])


def plot_pseudo_label_quality(df: pd.DataFrame, title: str = "Pseudo-label quality (IoU ≥ 0.5, same class)",
                              bins: int = 20) -> plt.Figure:
    """`df`: method (the pseudo-label set), seed, iteration, stat, size, value. A grid of precision and
    recall (rows) by box size (columns), a line per set: the per-step values come from a few images,
    so each seed's values are averaged over `bins` equal spans of iterations before the mean +- std
    over seeds is drawn (the CSV keeps every step)."""
    _require(df, ("method", "iteration", "stat", "size", "value"), "pseudo-label statistics")
    _theme()
    df = df.copy()
    lo, hi = df["iteration"].min(), df["iteration"].max()
    width = max((hi - lo) / bins, 1) if len(df) else 1
    df["iteration"] = lo + (np.floor((df["iteration"] - lo) / width).clip(upper=bins - 1) + 0.5) * width
    df = df.groupby(["method", "seed", "stat", "size", "iteration"], as_index=False, sort=False)["value"].mean()
    sizes = [s for s in ("all",) + SIZES if s in set(df["size"])] or ["all"]
    fig, axes = plt.subplots(2, len(sizes), figsize=(3.3 * len(sizes), 6.4), squeeze=False, sharex=True)
    for row, stat in enumerate(("precision", "recall")):
        for col, size in enumerate(sizes):
            ax = axes[row][col]
            sub = df[(df["stat"] == stat) & (df["size"] == size)]
            if sub.empty:  # precision needs pseudo-labels; early in training there may be none
                ax.text(0.5, 0.5, f"no {stat} logged", ha="center", va="center", transform=ax.transAxes)
            else:
                sns.lineplot(data=sub, x="iteration", y="value", hue="method", errorbar="sd", ax=ax,
                             legend=(row, col) == (0, 0))
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{stat}, {size} boxes")
            ax.set_xlabel("training iteration" if row == 1 else "")
            ax.set_ylabel(f"pseudo-label {stat}" if col == 0 else "")
    legend = axes[0][0].get_legend()
    if legend is not None:
        handles, labels = axes[0][0].get_legend_handles_labels()
        legend.remove()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), title="pseudo-label set")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return fig


# -- Figure 1 ----------------------------------------------------------------------------------------
def iou_vs_area(detections: list[dict], dataset, score_thresh: float, area_scale: float = 1.0) -> pd.DataFrame:
    """Each detection above `score_thresh`: its area, best IoU with a same-class true box, size bin.

    Sizes are COCO's (32², 96² px), times `area_scale` on the side as the evaluator does.
    """
    import torch
    from torchvision.ops import box_iou

    by_id = dataset.by_id() if callable(getattr(dataset, "by_id", None)) else {r.id: r for r in dataset.records}
    lo, hi = (32 * area_scale) ** 2, (96 * area_scale) ** 2
    rows = []
    for det in detections:
        rec = by_id[det["image_id"]]
        keep = det["scores"] >= score_thresh
        boxes, labels, scores = det["boxes"][keep], det["labels"][keep], det["scores"][keep]
        if not len(boxes):
            continue
        gt = torch.as_tensor(rec.boxes, dtype=torch.float32)
        gl = torch.as_tensor(rec.labels)
        if len(gt):
            iou = box_iou(boxes.float(), gt) * (labels[:, None] == gl[None, :])
            best = iou.max(dim=1).values
        else:
            best = torch.zeros(len(boxes))
        areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
        for a, i, s in zip(areas.tolist(), best.tolist(), scores.tolist()):
            size = "small" if a < lo else ("medium" if a < hi else "large")
            rows.append({"image_id": det["image_id"], "area": a, "iou": i, "score": s, "size": size})
    return pd.DataFrame(rows, columns=["image_id", "area", "iou", "score", "size"])


def plot_iou_vs_area(df: pd.DataFrame, score_thresh: float,
                     title: str = "Pseudo-label IoU with the ground truth against box area (Figure 1)") -> plt.Figure:
    """(a) mean IoU per size bin, (b) IoU against area (hexbin, log area)."""
    _require(df, ("area", "iou", "size"), "IoU/area data")
    if df.empty:
        raise BenchError(f"no detection scored above {score_thresh:g}; train longer or lower --score-thresh")
    _theme()
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    order = [s for s in SIZES if s in set(df["size"])]
    sns.barplot(data=df, x="size", y="iou", order=order, errorbar="sd", ax=ax_a, color="tab:blue")
    for i, s in enumerate(order):
        ax_a.annotate(f"n={int((df['size'] == s).sum())}", (i, 0.95), ha="center", va="top", fontsize="small")
    ax_a.set_xlabel("pseudo-label box size (COCO bins)")
    ax_a.set_ylabel("mean IoU with ground truth")
    ax_a.set_ylim(0, 1)
    ax_a.set_title(f"(a) mean IoU per size (score ≥ {score_thresh:g})")
    hb = ax_b.hexbin(np.sqrt(df["area"].clip(lower=1)), df["iou"], gridsize=25, xscale="log", mincnt=1, cmap="viridis")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax_b.xaxis.set_major_locator(LogLocator(base=2))
    ax_b.xaxis.set_major_formatter(ScalarFormatter())  # 8, 16, 32 rather than 3 x 10^0 clutter
    ax_b.xaxis.set_minor_formatter(NullFormatter())
    fig.colorbar(hb, ax=ax_b, label="pseudo-labels per bin")
    ax_b.set_xlabel("box side √area (px, log scale)")
    ax_b.set_ylabel("IoU with ground truth")
    ax_b.set_ylim(0, 1)
    ax_b.set_title("(b) IoU versus box area")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- samples: ground truth and pseudo-labels on unlabeled images -------------------------------------
# filter_pseudo_labels keeps score > threshold: <= alpha is dropped, (alpha, t] feeds only LSM's
# PIM and SD, > t is a pseudo-label of the main branch.
BANDS = ("below_alpha", "alpha_to_t", "above_t")
BAND_STYLE = {"below_alpha": {"linestyle": ":", "linewidth": 1.0},
              "alpha_to_t": {"linestyle": "--", "linewidth": 1.6},
              "above_t": {"linestyle": "-", "linewidth": 2.6}}
GT_STYLE = {"linestyle": "-", "linewidth": 1.0, "edgecolor": "white"}
SCORE_CMAP = "plasma"


def score_band(score: float, alpha: float, t: float) -> str:
    return "above_t" if score > t else "alpha_to_t" if score > alpha else "below_alpha"


def samples_frame(samples: list[dict], alpha: float, t: float) -> pd.DataFrame:
    """One row per box: image_id, file, kind (gt | pseudo), x1, y1, x2, y2, score, band.

    `samples`: dicts with image_id, file, gt (N, 4) and boxes (M, 4) xyxy in image pixels, scores (M,).
    """
    rows = []
    for s in samples:
        for box in np.asarray(s["gt"], dtype=float).reshape(-1, 4):
            rows.append({"image_id": s["image_id"], "file": Path(s["file"]).name, "kind": "gt",
                         **dict(zip(("x1", "y1", "x2", "y2"), box.round(2))), "score": np.nan, "band": "gt"})
        order = np.argsort(-np.asarray(s["scores"], dtype=float), kind="stable")
        boxes = np.asarray(s["boxes"], dtype=float).reshape(-1, 4)
        for k in order:
            score = float(s["scores"][k])
            rows.append({"image_id": s["image_id"], "file": Path(s["file"]).name, "kind": "pseudo",
                         **dict(zip(("x1", "y1", "x2", "y2"), boxes[k].round(2))), "score": score,
                         "band": score_band(score, alpha, t)})
    return pd.DataFrame(rows, columns=["image_id", "file", "kind", "x1", "y1", "x2", "y2", "score", "band"])


def plot_samples(samples: list[dict], alpha: float, t: float,
                 title: str = "Ground truth and pseudo-labels") -> plt.Figure:
    """A panel per image (`samples` as in `samples_frame`, plus `image`, an HxWx3 array): the
    hidden ground truth in white, every detection in the colour of its score, dotted (<= alpha),
    dashed (alpha, t] or solid (> t); alpha and t marked on the colour bar."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    if not samples:
        raise BenchError("no images to draw; the split has no unlabeled images")
    df = samples_frame(samples, alpha, t)
    cols = min(2, len(samples))
    rows = -(-len(samples) // cols)
    width, height = 5.0 * cols + 1.8, 5.0 * rows + 1.4
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    top, bottom, right = 1 - 0.9 / height, 0.7 / height, 1 - 1.7 / width  # title, legend, colour bar
    fig.subplots_adjust(left=0.1 / width, right=right, top=top, bottom=bottom, wspace=0.05, hspace=0.18)
    norm, cmap = Normalize(0.0, 1.0), plt.get_cmap(SCORE_CMAP)
    for ax, s in zip(axes.flat, samples):
        ax.imshow(s["image"])
        for x1, y1, x2, y2 in np.asarray(s["gt"], dtype=float).reshape(-1, 4):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, label="gt", **GT_STYLE))
        sub = df[(df["image_id"] == s["image_id"]) & (df["kind"] == "pseudo")]
        for r in sub.sort_values("score").itertuples():  # confident boxes on top
            ax.add_patch(Rectangle((r.x1, r.y1), r.x2 - r.x1, r.y2 - r.y1, fill=False, label=r.band,
                                   edgecolor=cmap(norm(r.score)), **BAND_STYLE[r.band]))
        n = sub["band"].value_counts()
        n_gt = len(np.asarray(s["gt"]).reshape(-1, 4))
        ax.set_title(f"{Path(s['file']).stem}\nGT {n_gt}; > t {n.get('above_t', 0)}, "
                     f"(α, t] {n.get('alpha_to_t', 0)}, ≤ α {n.get('below_alpha', 0)}", fontsize="small")
        ax.set_axis_off()
    for ax in list(axes.flat)[len(samples):]:
        ax.set_axis_off()
    grey = "0.35"
    gt_line = {k: v for k, v in GT_STYLE.items() if k != "edgecolor"}
    handles = [Line2D([], [], color="white", **gt_line, label="ground truth (hidden from training)"),
               Line2D([], [], color=grey, **BAND_STYLE["below_alpha"], label=f"score ≤ α = {alpha:g}: dropped"),
               Line2D([], [], color=grey, **BAND_STYLE["alpha_to_t"],
                      label=f"α < score ≤ t = {t:g}: LSM's PIM / SD only"),
               Line2D([], [], color=grey, **BAND_STYLE["above_t"], label="score > t: pseudo-label")]
    legend = fig.legend(handles=handles, loc="lower center", ncol=2, fontsize="small", frameon=True,
                        facecolor="0.85")
    cax = fig.add_axes((right + 0.3 / width, bottom + 0.1 * (top - bottom), 0.25 / width, 0.8 * (top - bottom)))
    bar = fig.colorbar(ScalarMappable(norm, cmap), cax=cax)
    bar.set_label("teacher score")
    for value in (alpha, t):
        bar.ax.axhline(value, color="black", linewidth=1.5)
    bar.set_ticks([0.0, alpha, t, 1.0], labels=["0", f"α = {alpha:g}", f"t = {t:g}", "1"])
    legend.set_in_layout(False)
    fig.suptitle(title)
    return fig


# -- output ------------------------------------------------------------------------------------------
def save(fig: plt.Figure, data: pd.DataFrame, png: Path, command: str,
         header: dict | None = None) -> tuple[Path, Path]:
    """`png` and `<stem>_data.csv` beside it (not `<stem>.csv`: `bench report` owns that name for
    tables); the command that regenerates them is in both, `header` (git_sha, preset, timestamp ...)
    in the CSV's comment lines after it, as a table's header (`bench report --all` reads them); the
    commit and the time are added where `header` lacks them."""
    from datetime import datetime, timezone

    from bench.tracking import git_sha

    header = {"git_sha": git_sha(), "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              **(header or {})}
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    csv = png.with_name(png.stem + "_data.csv")
    fd, tmp = tempfile.mkstemp(dir=png.parent, prefix=f".{png.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=150, metadata={"Title": png.stem, "Description": command, "Software": "lsm-bench"})
        os.replace(tmp, png)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    lines = [f"# command: {command}"] + [f"# {k}: {' '.join(str(v).split())}" for k, v in header.items()]
    text = "\n".join(lines) + "\n" + data.to_csv(index=False, lineterminator="\n")
    fd, tmp = tempfile.mkstemp(dir=png.parent, prefix=f".{csv.name}.", suffix=".csv")
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    os.replace(tmp, csv)
    return png, csv


def _palette(methods: pd.Series) -> dict | None:
    names = set(methods)
    return {m: c for m, c in CURVE_COLORS.items() if m in names} if names <= set(CURVE_COLORS) else None


def _require(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise BenchError(f"{what} lack column(s) {', '.join(missing)}")
    if what != "IoU/area data" and df.empty:
        raise BenchError(f"no {what} to plot: no cell is done yet; run the study or the cells first")
