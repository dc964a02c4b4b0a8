"""`bench figure samples`: ground truth and a teacher's pseudo-labels, the score bands visible."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.errors import BenchError
from bench.report import figures
from tests.data.test_forest import build_tiny

ALPHA, T = 0.5, 0.7


def _samples():
    """Two 100 px images; scores on both sides of each threshold (filter_pseudo_labels keeps > thr)."""
    gt = np.array([[10, 10, 40, 40], [50, 50, 90, 90]], dtype=float)
    first = {"image_id": 7, "file": Path("a/tile_7.png"), "image": np.zeros((100, 100, 3), np.uint8), "gt": gt,
             "boxes": gt[[0, 1, 0, 1, 0]] + 1.0, "scores": np.array([0.2, 0.5, 0.6, 0.7, 0.95])}
    second = {"image_id": 9, "file": Path("a/tile_9.png"), "image": np.zeros((100, 100, 3), np.uint8),
              "gt": np.zeros((0, 4)), "boxes": np.zeros((0, 4)), "scores": np.zeros(0)}
    return [first, second]


def test_bands_follow_the_training_filters():
    df = figures.samples_frame(_samples(), ALPHA, T)
    pseudo = df[df["kind"] == "pseudo"]
    assert pseudo["score"].tolist() == [0.95, 0.7, 0.6, 0.5, 0.2]  # most confident first
    assert pseudo["band"].tolist() == ["above_t", "alpha_to_t", "alpha_to_t", "below_alpha", "below_alpha"]
    assert df[df["kind"] == "gt"][["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[10, 10, 40, 40], [50, 50, 90, 90]]
    assert set(df["file"]) == {"tile_7.png"} and df[df["kind"] == "gt"]["score"].isna().all()


def test_plot_draws_each_band_in_its_own_line_style_and_colour():
    fig = figures.plot_samples(_samples(), ALPHA, T, title="t")
    ax = fig.axes[0]
    rects = [p for p in ax.patches]
    by_label = {}
    for r in rects:
        by_label.setdefault(r.get_label(), []).append(r)
    assert {k: len(v) for k, v in by_label.items()} == {"gt": 2, "below_alpha": 2, "alpha_to_t": 2, "above_t": 1}
    widths = {k: {r.get_linewidth() for r in v} for k, v in by_label.items()}
    assert widths["below_alpha"] == {1.0} and widths["alpha_to_t"] == {1.6} and widths["above_t"] == {2.6}
    assert {r.get_linestyle() for r in by_label["below_alpha"]} == {":"}
    assert {r.get_linestyle() for r in by_label["alpha_to_t"]} == {"--"}
    assert {r.get_linestyle() for r in by_label["above_t"]} == {"-"}
    cmap = plt_cmap()
    top = by_label["above_t"][0]
    assert np.allclose(top.get_edgecolor(), cmap(0.95))  # colour = score
    assert ax.patches[-1] is top  # the confident box is drawn last, on top
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["ground truth (hidden from training)", "score ≤ α = 0.5: dropped",
                      "α < score ≤ t = 0.7: LSM's PIM / SD only", "score > t: pseudo-label"]
    bar = fig.axes[-1]
    assert [t.get_text() for t in bar.get_yticklabels()] == ["0", "α = 0.5", "t = 0.7", "1"]
    assert "GT 2; > t 1, (α, t] 2, ≤ α 2" in ax.get_title()
    assert not fig.axes[1].patches and "GT 0" in fig.axes[1].get_title()


def plt_cmap():
    import matplotlib.pyplot as plt

    return plt.get_cmap(figures.SCORE_CMAP)


def test_no_trained_cell_says_what_to_run(tmp_path):
    from bench.report.samples import find_teacher_cell

    with pytest.raises(BenchError, match=r"no finished ubteacher cell of preset forest .*run `bench run forest"):
        find_teacher_cell(tmp_path, "forest")


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    env = {"BENCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    for args, message in ((["figure", "samples", "--preset", "forest"], "run `bench run forest --seeds 1` first"),
                          (["figure", "fig9"], "figures: fig1, fig4, pl-quality, figure5, deltas, samples")):
        out = subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, env=env,
                             timeout=120)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


TINY_FOREST = [
    "data.ratio=50", "data.aug.short_sizes=[64]", "data.aug.max_size=96", "data.aug.test_size=64",
    "model.arch=tiny", "model.weights=none", "model.trainable_layers=3", "model.fpn_channels=16",
    "model.representation_size=32", "model.anchor_sizes=[8,16,32,64,128]", "model.canonical_scale=36",
    "model.rpn_pre_nms_top_n_test=50", "model.rpn_post_nms_top_n_test=50", "model.detections_per_img=20",
    "model.score_thresh=0.0", "device=cpu",
]


def _untrained_cell(tmp_path: Path, home: Path) -> Path:
    """A finished-looking ubteacher cell: config.yaml, result.json and untrained weights."""
    from adapters.base import get_adapter
    from core.config import dump_config, load_config
    from core.data.sources import prepare_data
    from bench.keys import cell_key
    from core.paths import run_dir

    root = build_tiny(tmp_path)
    torch.manual_seed(0)
    cfg = load_config("forest", TINY_FOREST + [f"data.root={root}"], method="ubteacher", seed=1)
    data = prepare_data(cfg.data, home)
    rdir = run_dir(home, cell_key(cfg, data))
    rdir.mkdir(parents=True)
    adapter = get_adapter("ubteacher")(cfg, data.num_classes, torch.device("cpu"))
    torch.save({n: m.state_dict() for n, m in adapter.eval_models().items()}, rdir / "model_final.pth")
    (rdir / "config.yaml").write_text(dump_config(cfg))
    (rdir / "result.json").write_text(json.dumps({"method": "ubteacher", "stage": "full", "lsm": False,
                                                  "preset": "forest", "ratio": 50.0, "seed": 1}))
    return rdir


def test_samples_figure_of_an_untrained_teacher(tmp_path):
    from bench.report.samples import find_teacher_cell, samples_figure
    from core.config import DataConfig

    home = tmp_path / "home"
    rdir = _untrained_cell(tmp_path, home)
    assert find_teacher_cell(home, "forest") == rdir
    command = "bench figure samples --preset forest"
    png, csv = samples_figure(home, "forest", None, 2, 0.0, tmp_path / "out", command)
    assert png == tmp_path / "out" / "samples_forest.png" and csv.name == "samples_forest_data.csv"
    assert Image.open(png).info["Description"] == command
    lines = csv.read_text().splitlines()
    assert lines[0] == f"# command: {command}" and "# preset: forest" in lines[1:4]
    df = pd.read_csv(io.StringIO("\n".join(lines[1:])), comment="#")
    # two unlabeled tiles that have hidden ground truth, all of their boxes drawn
    from core.data.sources import prepare_data

    data = prepare_data(DataConfig(dataset="forest", root=str(tmp_path / "forest"), ratio=50, nested_splits=True),
                        home)  # the forest preset's split
    unlabeled = {Path(r.file).name: r for r in data.unlabeled.records}
    drawn = sorted(set(df["file"]))
    assert len(drawn) == 2 and set(drawn) <= set(unlabeled)
    gt = df[df["kind"] == "gt"]
    assert len(gt) == sum(len(unlabeled[f].boxes) for f in drawn) > 0
    pseudo = df[df["kind"] == "pseudo"]
    assert len(pseudo) > 0  # score_thresh 0: the untrained head still proposes boxes
    assert pseudo["band"].tolist() == [figures.score_band(s, ALPHA, T) for s in pseudo["score"]]
    assert set(df["cell"]) == {rdir.name} and set(df["model"]) == {"teacher"}
    assert (df["alpha"] == ALPHA).all() and (df["t"] == T).all()
    # --run by key prefix and an explicit .png path give the same boxes
    png2, csv2 = samples_figure(home, "forest", rdir.name[:10], 2, 0.0, tmp_path / "x.png", command)
    assert png2 == tmp_path / "x.png" and csv2.read_text() == csv.read_text()
