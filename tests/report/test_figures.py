"""Figures: labelled axes, legends, the paper's point, numbers one can check by hand, PNG + CSV."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.data.types import DetectionDataset, ImageRecord
from core.errors import BenchError
from bench.report import figures


def _points():
    rows = []
    for curve, base in (("ubteacher", 10.0), ("ubteacher_lsm", 12.0)):
        for thr in (0.3, 0.5, 0.7):
            for seed, noise in ((1, -1.0), (2, 1.0)):
                rows.append({"curve": curve, "threshold": thr, "seed": seed, "AP": base + 10 * thr + noise})
    return pd.DataFrame(rows)


def test_threshold_curves_mean_std_labels_and_paper_point():
    fig = figures.plot_threshold_curves(_points(), paper_point=(0.5, 23.95))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "filtering threshold (t for UBteacher, α for UBteacher + LSM)"
    assert ax.get_ylabel() == "AP (COCO AP50:95, %)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["UBteacher (threshold t)", "UBteacher + LSM (threshold α)", "paper: 23.95 AP at α = 0.5"]
    assert ax.get_legend().get_title().get_text() == "mean ± std over 2 seeds"
    from matplotlib.colors import to_rgb

    red = next(line for line in ax.get_lines() if np.allclose(line.get_ydata(), [13, 15, 17]))  # means
    assert np.allclose(red.get_xdata(), [0.3, 0.5, 0.7]) and to_rgb(red.get_color()) == to_rgb("tab:red")
    band = ax.collections[0].get_paths()[0].vertices  # mean ± std: std of (x-1, x+1) is sqrt(2)
    assert band[:, 1].max() == pytest.approx(17 + np.sqrt(2))
    star = [c for c in ax.collections if c.get_label().startswith("paper")][0]
    assert np.allclose(star.get_offsets(), [[0.5, 23.95]])


def test_save_writes_png_and_csv_with_the_command(tmp_path):
    fig = figures.plot_threshold_curves(_points())
    png, csv = figures.save(fig, _points(), tmp_path / "out" / "figure5.png", "bench study figure5 --seeds 2",
                            header={"preset": "demo"})
    assert png.name == "figure5.png" and csv.name == "figure5_data.csv"
    img = Image.open(png)
    assert img.info["Description"] == "bench study figure5 --seeds 2" and img.size[0] > 600
    lines = csv.read_text().splitlines()
    # the command, then the commit and time `bench report --all` shows, then the given header
    assert lines[0] == "# command: bench study figure5 --seeds 2" and lines[1].startswith("# git_sha: ")
    assert lines[2].startswith("# timestamp: 20") and lines[3] == "# preset: demo"
    assert lines[4] == "curve,threshold,seed,AP" and len(lines) == 5 + 12
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_empty_points_is_a_bench_error():
    with pytest.raises(BenchError, match="no figure5 points to plot"):
        figures.plot_threshold_curves(pd.DataFrame(columns=["curve", "threshold", "seed", "AP"]))


def _metrics(path, evals):
    with path.open("w") as f:
        for it, ap, ar in evals:
            f.write(json.dumps({"iteration": it, "total_loss": 1.0, "pl_precision": 0.5, "pl_recall_small": 0.25}) + "\n")
            f.write(json.dumps({"iteration": it, "eval.teacher.AP": ap, "eval.teacher.AR100": ar,
                                "eval.student.AP": -1.0}) + "\n")


def test_training_curves_from_metrics_jsonl(tmp_path):
    frames = []
    for method, offset in (("UBteacher (threshold t)", 0.0), ("UBteacher + LSM (threshold α)", 2.0)):
        for seed in (1, 2):
            path = tmp_path / f"{method[:3]}{offset}{seed}.jsonl"
            _metrics(path, [(10, 1.0 + offset, 5.0), (20, 3.0 + offset, 9.0)])
            frames.append(figures.eval_curves(path).assign(method=method, seed=seed))
    data = pd.concat(frames)
    one = data[(data["seed"] == 1) & (data["method"].str.startswith("UBteacher ("))]
    assert one.set_index(["iteration", "metric"])["value"].to_dict() == {
        (10, "AP"): 1.0, (10, "AR100"): 5.0, (20, "AP"): 3.0, (20, "AR100"): 9.0}  # teacher only
    fig = figures.plot_training_curves(data)
    (ax_ar, ax_ap) = fig.axes
    assert ax_ar.get_xlabel() == "training iteration" and ax_ar.get_ylabel() == "average recall (AR@100, %)"
    assert ax_ap.get_ylabel() == "AP (COCO AP50:95, %)" and ax_ap.get_title() == "(b) AP"
    assert [t.get_text() for t in ax_ap.get_legend().get_texts()] == ["UBteacher (threshold t)",
                                                                      "UBteacher + LSM (threshold α)"]
    lsm = [line for line in ax_ap.get_lines() if len(line.get_xdata()) == 2][1]
    assert np.allclose(lsm.get_ydata(), [3.0, 5.0])


def test_pseudo_label_quality(tmp_path):
    path = tmp_path / "m.jsonl"
    _metrics(path, [(10, 1.0, 5.0), (20, 3.0, 9.0)])
    df = figures.pseudo_label_curves(path)
    assert set(map(tuple, df[["stat", "size", "value"]].drop_duplicates().values)) == {
        ("precision", "all", 0.5), ("recall", "small", 0.25)}
    fig = figures.plot_pseudo_label_quality(df.assign(method="UBteacher", seed=1))
    assert [ax.get_title() for ax in fig.axes] == ["precision, all boxes", "precision, small boxes",
                                                   "recall, all boxes", "recall, small boxes"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["UBteacher"]


def test_pseudo_label_quality_averages_steps_within_a_bin():
    """Steps 0-9 fall in the first of two bins, 10-19 in the second: one point per bin, their mean."""
    df = pd.DataFrame({"iteration": range(20), "stat": "precision", "size": "all", "method": "UBteacher", "seed": 1,
                       "value": [0.0, 1.0] * 5 + [1.0] * 10})
    fig = figures.plot_pseudo_label_quality(df, bins=2)
    line = fig.axes[0].get_lines()[0]
    assert np.allclose(line.get_xdata(), [4.75, 14.25]) and np.allclose(line.get_ydata(), [0.5, 1.0])


def test_iou_vs_area_by_hand():
    rec = ImageRecord(id=7, file="x.png", width=200, height=200,
                      boxes=np.array([[0, 0, 10, 10], [0, 0, 100, 100]], dtype=np.float32),
                      labels=np.array([1, 2]), iscrowd=np.zeros(2, bool), ann_ids=np.array([1, 2]))
    ds = DetectionDataset("t", [rec], [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}], None)
    det = {"image_id": 7, "boxes": torch.tensor([[0, 0, 10, 10], [0, 0, 100, 50], [0, 0, 10, 10], [50, 50, 60, 60.]]),
           "scores": torch.tensor([0.9, 0.8, 0.9, 0.1]), "labels": torch.tensor([1, 2, 3, 1])}
    df = figures.iou_vs_area([det], ds, score_thresh=0.5, area_scale=1.0)
    assert df["iou"].tolist() == pytest.approx([1.0, 0.5, 0.0])  # exact; half of the box; wrong class
    assert df["size"].tolist() == ["small", "medium", "small"]  # 100 px² < 32² < 5000 px² < 96²
    fig = figures.plot_iou_vs_area(df, 0.5)
    ax_a, ax_b = fig.axes[:2]
    assert ax_a.get_ylabel() == "mean IoU with ground truth" and ax_b.get_xlabel() == "box side √area (px, log scale)"
    assert [p.get_height() for p in ax_a.patches] == pytest.approx([0.5, 0.5])  # small: (1 + 0) / 2, medium: 0.5


def test_a_damaged_training_log_is_one_error_naming_its_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 10, "pl_precision": 0.5}\n\n{"iteration": 20, "pl_prec\n')
    with pytest.raises(BenchError, match=rf"{path}: line 3 is not a training-log record \('Unterminated string"):
        figures.pseudo_label_curves(path)
    path.write_text('{"iteration": 10, "pl_precision": 0.5}\n[1, 2]\n')
    with pytest.raises(BenchError, match=r"line 2 is not a training-log record \(\[1, 2\]\)"):
        figures.eval_curves(path)
    path.write_text('{"iteration": 10, "pl_precision": 0.5}\n\n')  # blank lines are skipped
    assert figures.pseudo_label_curves(path)["value"].tolist() == [0.5]
