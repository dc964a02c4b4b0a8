"""`bench figure deltas TABLE`: the forest plot of a table's LSM − baseline pairs, on fake done cells.

The CSV's numbers are checked against a hand computation (Student's t over the per-seed deltas),
the PNG's size against the layout, and `bench report` writes the same two files next to the table.
"""

import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from core.errors import BenchError
from bench.report.deltas import (CSV_COLUMNS, LABEL_WIDTH, deltas_frame, figure_size, label_width,
                                 legend_columns, plot_deltas)
from tests.report.fake_cells import mark_done, mini_by_size, plan

T_975_DF2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2): three seed pairs
# UBteacher and UBteacher + LSM at 1%, seeds 1-3; at 5% seed 1 of both, and LSM's seed 2 alone
UBT_1 = {1: (20.0, 5.0, 22.0, 30.0), 2: (21.0, 6.0, 23.0, 31.0), 3: (22.5, 5.5, 24.0, 32.0)}
LSM_1 = {1: (21.0, 7.0, 22.5, 29.0), 2: (23.0, 7.5, 23.5, 31.5), 3: (23.5, 6.0, 25.0, 32.5)}
UBT_5 = {1: (28.0, 9.0, 30.0, 40.0)}
LSM_5 = {1: (29.5, 11.0, 30.5, 39.0), 2: (30.0, 10.0, 31.0, 41.0)}
SIZES = ("AP", "APs", "APm", "APl")
PAPER_1, PAPER_5 = 23.95 - 20.75, 31.97 - 28.27  # Table 1's UBteacher (+ LSM) at 1% and 5%, AP only


def _values():
    out = {}
    for row, col, table in (("ubteacher", "coco_standard_1", UBT_1), ("ubteacher_lsm", "coco_standard_1", LSM_1),
                            ("ubteacher", "coco_standard_5", UBT_5), ("ubteacher_lsm", "coco_standard_5", LSM_5)):
        for seed, v in table.items():
            out[(row, col, seed)] = dict(zip(SIZES, v))
    return out


@pytest.fixture
def store(tmp_path):
    """A store with the fake cells of mini.yaml (deltas by size), 3 seeds planned."""
    spec_path = mini_by_size(tmp_path)
    home = tmp_path / "home"
    spec, cells, _ = plan(spec_path, home, seeds=3)
    mark_done(cells, home, _values())
    return spec_path, spec, cells, home


def _hand(metric: int, base: dict, lsm: dict):
    seeds = sorted(set(base) & set(lsm))
    d = [lsm[s][metric] - base[s][metric] for s in seeds]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return n, mean, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = T_975_DF2 * sd / math.sqrt(n)
    return n, mean, mean - half, mean + half


def _check_csv(csv: Path, command: str, columns=(("coco_standard_1", UBT_1, LSM_1),
                                                  ("coco_standard_5", UBT_5, LSM_5))) -> pd.DataFrame:
    lines = csv.read_text().splitlines()
    assert lines[0] == f"# command: {command}"
    assert any(line.startswith("# git_sha: ") for line in lines[1:6])
    assert "# preset: demo" in lines[1:6] and any(line.startswith("# timestamp: ") for line in lines[1:6])
    df = pd.read_csv(csv, comment="#")
    assert tuple(df.columns) == CSV_COLUMNS
    # a line per pair x column x metric, in spec order: 1% then 5%, AP APs APm APl
    assert list(zip(df["column_id"], df["metric"])) == [(c[0], m) for c in columns for m in SIZES]
    for i, (col, base, lsm) in enumerate(columns):
        for j, metric in enumerate(SIZES):
            r = df.iloc[4 * i + j]
            n, mean, lo, hi = _hand(j, base, lsm)
            assert r["n"] == n and r["mean"] == pytest.approx(mean, abs=1e-9)
            if n >= 2:
                assert (r["ci_low"], r["ci_high"]) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
            else:
                assert math.isnan(r["ci_low"]) and math.isnan(r["ci_high"])
            paper = (PAPER_1 if col == "coco_standard_1" else PAPER_5) if metric == "AP" else math.nan
            assert r["paper_delta"] == pytest.approx(paper, abs=1e-9, nan_ok=True)
            assert (r["baseline"], r["lsm"]) == ("UBteacher", "UBteacher + LSM")
    # 1%, AP: deltas 1, 2, 1: mean 4/3, sd sqrt(1/3), half-width 4.3027 * sd / sqrt(3)
    assert df.iloc[0]["seeds"] == "1;2;3" and df.iloc[0]["deltas"] == "1.0000;2.0000;1.0000"
    assert df.iloc[0]["ci_low"] == pytest.approx(4 / 3 - T_975_DF2 / 3, abs=1e-9)
    if len(columns) > 1:
        assert df.iloc[4]["seeds"] == "1"  # LSM's seed 2 at 5% has no UBteacher seed 2 to pair with
    return df


def _check_png(png: Path, command: str, n_pairs: int, n_metrics: int) -> None:
    img = Image.open(png)
    width, height = figure_size(n_pairs, n_metrics)
    assert img.size == (round(width * 150), round(height * 150))
    assert img.info["Description"] == command


def test_report_writes_the_forest_plot_next_to_the_table(store, tmp_path):
    from bench.runner import report

    spec_path, spec, cells, home = store
    out = tmp_path / "results"
    paths = report(spec, cells, home, out, "demo", "bench report mini.yaml --seeds 3")
    assert [p.name for p in paths] == ["mini.md", "mini.csv", "mini.tex", "mini.html",
                                       "mini_deltas.png", "mini_deltas_data.csv"]
    _check_csv(out / "mini_deltas_data.csv", "bench report mini.yaml --seeds 3")
    _check_png(out / "mini_deltas.png", "bench report mini.yaml --seeds 3", 2, 4)
    # the figure's numbers are the table's delta section
    md = (out / "mini.md").read_text()
    assert "| UBteacher | UBteacher + LSM | 1% | AP | 1: +1.00, 2: +2.00, 3: +1.00 | +1.33 (3) | [-0.10, +2.77]" in md


def test_cli_figure_deltas(store, tmp_path):
    spec_path, spec, cells, home = store
    out = tmp_path / "figs"
    from tests.conftest import TINY

    # --ratio: one column (the tiny data's splits are too small for the preset's default ratios)
    args = ["figure", "deltas", str(spec_path), "--seeds", "3", "--ratio", "1", "--out", str(out), *TINY]
    proc = subprocess.run([sys.executable, "-m", "bench.cli", *args, "--home", str(home)], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    png, csv = out / "mini_deltas.png", out / "mini_deltas_data.csv"
    assert f"figure: {png} data: {csv}" in " ".join(proc.stdout.split())
    command = "bench " + shlex.join([*args, "--home", str(home)])  # as typed, as `invocation` records it
    _check_csv(csv, command, columns=(("coco_standard_1", UBT_1, LSM_1),))
    _check_png(png, command, 1, 4)
    keep = os.environ.get("BENCH_TEST_ARTIFACTS")
    if keep:  # to look at
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / "mini_deltas.png")


def test_cli_figure_deltas_without_done_pairs_says_what_to_run(tmp_path):
    spec_path = mini_by_size(tmp_path)
    from tests.conftest import TINY

    proc = subprocess.run([sys.executable, "-m", "bench.cli", "figure", "deltas", str(spec_path), "--ratio", "5",
                           "--home", str(tmp_path / "home"), "--out", str(tmp_path / "out"), *TINY], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 2
    assert "no LSM − baseline pair of mini has a seed done in both rows" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_plot_axes_labels_and_legend(store):
    spec_path, spec, cells, home = store
    from bench.runner import collect

    results, _ = collect(cells, home, spec.all_metrics)
    frame = deltas_frame(spec, results)
    fig = plot_deltas(frame)
    assert [ax.get_title() for ax in fig.axes] == ["AP (all sizes)", "APs (small)", "APm (medium)", "APl (large)"]
    assert fig.axes[0].get_xlabel() == "Δ AP (LSM − baseline, points)"
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["UBteacher, 1% (n=3)", "UBteacher, 5% (n=1)"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["ours: mean Δ over paired seeds, 95% CI (Student's t)", "ours, one seed pair (no CI)",
                      "paper: its LSM − baseline (where published)"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_no_pairs_is_a_bench_error(tmp_path):
    import yaml

    from bench.specs import load_spec_file

    spec = yaml.safe_load(mini_by_size(tmp_path).read_text())
    spec["baseline_pairs"], spec["name"] = [], "nopairs"
    (tmp_path / "nopairs.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(BenchError, match="no baseline_pairs"):
        deltas_frame(load_spec_file(tmp_path / "nopairs.yaml"), None)


def test_long_row_names_widen_the_figure_and_a_narrow_one_stacks_its_legend():
    """Table 3's 'Deformable-DETR (pre-train + finetune), COCO-ImageNet (n=3)' must not be cut off."""
    assert label_width(20) == LABEL_WIDTH and label_width(60) == pytest.approx(0.085 * 60 + 0.3)
    assert figure_size(3, 1, 60)[0] == pytest.approx(label_width(60) + 3.3)
    assert legend_columns(2, 4) == 2 and legend_columns(2, 1) == 1  # 15.6 in wide vs 5.7 in
    assert figure_size(3, 1, 0, legend_rows=2)[1] == pytest.approx(figure_size(3, 1)[1] + 0.25)



def test_a_baseline_with_several_lsm_rows_names_each_pair():
    """Table 4 pairs UBteacher with + MLC and with PIM: two lines must not both read 'UBteacher, 5%'."""
    rows = [("ubt", "mlc", "UBteacher", "UBteacher + MLC"), ("ubt", "pim", "UBteacher", "PIM"),
            ("stac", "stac_pim", "STAC", "STAC + PIM")]
    frame = pd.DataFrame([dict(baseline_id=b, lsm_id=lsm, baseline=bl, lsm=ll, column_id="c5", column="5%",
                               metric="AP", n=2, seeds="1;2", deltas="1;2", mean=1.5, ci_low=-5.0, ci_high=8.0,
                               paper_delta=float("nan")) for b, lsm, bl, ll in rows])
    fig = plot_deltas(frame)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
        "UBteacher + MLC vs UBteacher, 5% (n=2)", "PIM vs UBteacher, 5% (n=2)", "STAC, 5% (n=2)"]
