"""Report tables: statistics checked by hand, markdown against a golden string, other formats parsed."""

import io
import math
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml
from scipy import stats

from core.errors import BenchError
from bench.report.tables import CSV_COLUMNS, aggregate, paired_deltas, render, write_all
from bench.specs import ArtifactSpec, load_spec, load_spec_file

MINI = Path(__file__).parent / "mini.yaml"
HEADER = {"command": "bench report mini --preset coco", "git_sha": "0123abc", "preset": "coco",
          "timestamp": "2025-01-02T03:04:05Z"}
B1 = [20.1, 20.5, 20.3, 20.9, 20.7]  # UBteacher at 1%, seeds 1-5: mean 20.5, var 0.4 / 4 = 0.1
L1 = [23.2, 23.9, 23.4, 24.3, 23.7]  # + LSM: mean 23.7, var 0.74 / 4 = 0.185
# 5%: UBteacher seeds 1, 2 finished (28.0, 28.6), seed 3 failed; every LSM seed failed.
FAILED = [("ubteacher", "coco_standard_5", 3)] + [("ubteacher_lsm", "coco_standard_5", s) for s in (1, 2, 3)]

GOLDEN_MD = """\
<!-- command: bench report mini --preset coco -->
<!-- git_sha: 0123abc -->
<!-- preset: coco -->
<!-- timestamp: 2025-01-02T03:04:05Z -->
<!-- err: std (sample standard deviation (ddof=1)) -->

### mini: UBteacher with and without LSM, 1% and 5% COCO

| Method | 1% | 5% |
|---|---:|---:|
| UBteacher | 20.50 ± 0.32 (5); paper 20.75 | **28.30** ± 0.42 (2), 1 failed; paper 28.27 |
| UBteacher + LSM | **23.70** ± 0.43 (5); paper 23.95 | failed; paper 31.97 |
| CSD (paper only) | —; paper 10.51 | —; paper 18.63 |

Cells: our mean ± std over seeds (n runs); paper: the published value; bold: the best mean of a column. \
Deltas pair runs by seed; 95% CI of the mean delta (Student's t) when n ≥ 2, p from a paired t-test when n ≥ 5.

#### LSM − baseline, paired by seed

| Baseline | LSM | Column | Metric | Per-seed Δ | Mean Δ (n) | 95% CI | p (paired t) | Paper Δ |
|---|---|---|---|---|---:|---:|---:|---:|
| UBteacher | UBteacher + LSM | 1% | AP | 1: +3.10, 2: +3.40, 3: +3.10, 4: +3.40, 5: +3.00 | +3.20 (5) | [+2.97, +3.43] | 2.79e-06 | +3.20 |
| UBteacher | UBteacher + LSM | 5% | AP | — | — | — | — | +3.70 |
"""


@pytest.fixture
def spec() -> ArtifactSpec:
    return load_spec_file(MINI)


@pytest.fixture
def results() -> pd.DataFrame:
    rows = [("ubteacher", "coco_standard_1", s, v) for s, v in enumerate(B1, 1)]
    rows += [("ubteacher_lsm", "coco_standard_1", s, v) for s, v in enumerate(L1, 1)]
    rows += [("ubteacher", "coco_standard_5", 1, 28.0), ("ubteacher", "coco_standard_5", 2, 28.6)]
    return pd.DataFrame(rows, columns=["row_id", "column_id", "seed", "AP"])


def _cell(agg: pd.DataFrame, row: str, col: str, metric: str = "AP") -> dict:
    sel = agg[(agg["row_id"] == row) & (agg["column_id"] == col) & (agg["metric"] == metric)]
    assert len(sel) == 1
    return sel.iloc[0].to_dict()


# -- statistics --------------------------------------------------------------------------------
def test_aggregate_mean_std_by_hand(spec, results):
    agg = aggregate(results, spec, err="std")
    assert list(agg.columns) == ["row_id", "column_id", "metric", "mean", "err", "n"]
    base = _cell(agg, "ubteacher", "coco_standard_1")
    assert base["mean"] == pytest.approx(20.5) and base["n"] == 5
    assert base["err"] == pytest.approx(math.sqrt(0.1))
    lsm = _cell(agg, "ubteacher_lsm", "coco_standard_1")
    assert lsm["mean"] == pytest.approx(23.7) and lsm["err"] == pytest.approx(math.sqrt(0.185))
    base5 = _cell(agg, "ubteacher", "coco_standard_5")
    assert base5["mean"] == pytest.approx(28.3) and base5["err"] == pytest.approx(math.sqrt(0.18)) and base5["n"] == 2
    # every cell is listed, in spec order, even without results (the paper-only row, the failed cell)
    assert list(zip(agg["row_id"], agg["column_id"])) == [
        ("ubteacher", "coco_standard_1"), ("ubteacher", "coco_standard_5"),
        ("ubteacher_lsm", "coco_standard_1"), ("ubteacher_lsm", "coco_standard_5"),
        ("csd", "coco_standard_1"), ("csd", "coco_standard_5")]
    empty = _cell(agg, "ubteacher_lsm", "coco_standard_5")
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["err"])


def test_aggregate_sem_by_hand(spec, results):
    agg = aggregate(results, spec, err="sem")
    assert _cell(agg, "ubteacher", "coco_standard_1")["err"] == pytest.approx(math.sqrt(0.1) / math.sqrt(5))
    assert _cell(agg, "ubteacher", "coco_standard_5")["err"] == pytest.approx(math.sqrt(0.18) / math.sqrt(2))


def test_single_seed_has_no_spread(spec):
    one = pd.DataFrame([("ubteacher", "coco_standard_1", 1, 20.0)], columns=["row_id", "column_id", "seed", "AP"])
    cell = _cell(aggregate(one, spec), "ubteacher", "coco_standard_1")
    assert cell["n"] == 1 and math.isnan(cell["err"])
    assert "| UBteacher | **20.00** (1); paper 20.75 |" in render(spec, one, header=HEADER)


def test_paired_deltas_by_hand_with_t_test(spec, results):
    d = paired_deltas(results, spec)
    one = d[d["column_id"] == "coco_standard_1"].iloc[0]
    assert one["seeds"] == (1, 2, 3, 4, 5)
    assert one["deltas"] == pytest.approx((3.1, 3.4, 3.1, 3.4, 3.0))
    assert one["mean"] == pytest.approx(3.2) and one["n"] == 5
    # deltas 3.1, 3.4, 3.1, 3.4, 3.0: mean 3.2, squared deviations 0.14 -> variance 0.035
    t_hand = 3.2 / math.sqrt(0.035 / 5)
    assert one["t"] == pytest.approx(t_hand)
    assert one["p"] == pytest.approx(2 * stats.t.sf(t_hand, df=4))
    assert one["paper_delta"] == pytest.approx(23.95 - 20.75)
    five = d[d["column_id"] == "coco_standard_5"].iloc[0]  # every LSM seed failed: nothing to pair
    assert five["n"] == 0 and five["seeds"] == () and math.isnan(five["mean"]) and math.isnan(five["p"])


def test_paired_deltas_use_common_seeds_and_skip_the_test_below_five(spec, results):
    fewer = results[~((results["row_id"] == "ubteacher_lsm") & results["seed"].isin([4, 5]))]
    d = paired_deltas(fewer, spec).iloc[0]
    assert d["seeds"] == (1, 2, 3) and d["mean"] == pytest.approx((3.1 + 3.4 + 3.1) / 3)
    assert math.isnan(d["t"]) and math.isnan(d["p"])
    # 95% CI by hand: deviations -0.1, +0.2, -0.1 -> sd sqrt(0.06 / 2); t(0.975, 2 df) = 4.3027
    half = 4.302653 * math.sqrt(0.03) / math.sqrt(3)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((3.2 - half, 3.2 + half), abs=1e-5)


def test_delta_metrics_pair_more_metrics_than_the_grid_shows(spec, results):
    by_size = spec.model_copy(update={"delta_metrics": ["AP", "APs"]})
    with_aps = results.assign(APs=results["AP"] / 2)
    d = paired_deltas(with_aps, by_size)
    one = d[(d["column_id"] == "coco_standard_1") & (d["metric"] == "APs")].iloc[0]
    assert one["mean"] == pytest.approx(1.6) and one["n"] == 5
    assert "| UBteacher | UBteacher + LSM | 1% | APs |" in render(by_size, with_aps, header=HEADER)


# -- rendering ---------------------------------------------------------------------------------
def test_markdown_golden(spec, results):
    assert render(spec, results, FAILED, "md", "std", HEADER) == GOLDEN_MD


def test_render_is_reproducible_and_header_driven(spec, results):
    a = render(spec, results, FAILED, "md", "sem", HEADER)
    assert a == render(spec, results, list(reversed(FAILED)), "md", "sem", dict(HEADER))
    assert "<!-- err: sem (standard error of the mean) -->" in a
    assert "20.50 ± 0.14 (5)" in a  # sem = sqrt(0.1 / 5)
    later = render(spec, results, FAILED, "md", "sem", {**HEADER, "timestamp": "2026-01-01T00:00:00Z"})
    assert later.replace("2026-01-01T00:00:00Z", "2025-01-02T03:04:05Z") == a


def test_bold_marks_every_tied_best(spec):
    tied = pd.DataFrame([("ubteacher", "coco_standard_1", 1, 21.0), ("ubteacher_lsm", "coco_standard_1", 1, 21.0)],
                        columns=["row_id", "column_id", "seed", "AP"])
    md = render(spec, tied, header=HEADER)
    assert md.count("**21.00**") == 2


def test_failure_rerun_successfully_no_longer_counts(spec, results):
    md = render(spec, results, [("ubteacher", "coco_standard_1", 1)], "md", "std", HEADER)
    assert "20.50 ± 0.32 (5); paper 20.75" in md and "failed" not in md.split("\n\n")[2]


def test_empty_results_show_paper_values_only(spec):
    md = render(spec, pd.DataFrame(), (), "md", "std", HEADER)
    assert "| UBteacher | —; paper 20.75 | —; paper 28.27 |" in md
    assert "**" not in md


def test_cells_outside_the_artifact_are_blank():
    fig5 = load_spec("figure5")
    md = render(fig5, None, header=HEADER)
    assert "| UBteacher + LSM (threshold alpha) | — | — | —; paper 23.95 | — | — |  |  |" in md


def test_tex_booktabs_and_escaping(spec, results):
    data = yaml.safe_load(MINI.read_text())
    data["rows"][0]["label"] = "UB_teacher & co"
    odd = ArtifactSpec.model_validate(data)
    tex = render(odd, results, FAILED, "tex", "std", {**HEADER, "command": "bench report mini # 100%"})
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lrr}"):
        assert rule in tex
    assert tex.startswith("% command: bench report mini # 100%\n% git_sha: 0123abc\n")
    assert r"UB\_teacher \& co & 20.50 $\pm$ 0.32 (5); paper 20.75 & \textbf{28.30} $\pm$ 0.42 (2), 1 failed" in tex
    assert r"\caption{UBteacher with and without LSM, 1\% and 5\% COCO." in tex
    assert r"CSD (paper only) & ---; paper 10.51 & ---; paper 18.63 \\" in tex
    assert "±" not in tex and "—" not in tex and "Δ" not in tex  # all turned into LaTeX
    body = [line for line in tex.splitlines() if not line.startswith("%")]
    assert not any("%" in line.replace(r"\%", "") for line in body)  # every % outside comments escaped
    assert "_" not in "".join(body).replace(r"\_", "")


class _StrictParser(HTMLParser):
    VOID = {"meta", "br", "hr", "img", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.problems, self.comments, self.bold = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.problems.append(f"unexpected </{tag}>")

    def handle_comment(self, data):
        self.comments.append(data.strip())

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "b":
            self.bold.append(data)


def test_html_is_well_formed(spec, results):
    page = render(spec, results, FAILED, "html", "std", {**HEADER, "command": "bench report --out <dir> -->"})
    parser = _StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.problems == [] and parser.stack == []
    assert parser.comments[:2] == ["command: bench report --out <dir> - ->", "git_sha: 0123abc"]
    assert parser.bold == ["28.30", "23.70"]
    assert "<td>CSD (paper only)</td><td>—; paper 10.51</td>" in page


def test_csv_round_trips(spec, results):
    text = render(spec, results, FAILED, "csv", "std", HEADER)
    assert text.splitlines()[0] == "# command: bench report mini --preset coco"
    df = pd.read_csv(io.StringIO(text), comment="#")
    assert tuple(df.columns) == CSV_COLUMNS
    agg = aggregate(results, spec)
    assert list(df["row_id"]) == list(agg["row_id"]) and list(df["n"]) == list(agg["n"])
    pd.testing.assert_series_equal(df["mean"], agg["mean"], check_names=False)
    pd.testing.assert_series_equal(df["err"], agg["err"], check_names=False)
    assert list(df["status"]) == ["ok", "partial", "ok", "failed", "paper-only", "paper-only"]
    assert list(df["n_failed"]) == [0, 1, 0, 3, 0, 0]
    assert list(df["paper"]) == [20.75, 28.27, 23.95, 31.97, 10.51, 18.63]
    assert list(df["paper_std"]) == [0.12, 0.11, 0.02, 0.09, 0.06, 0.07]


def test_write_all_writes_four_files_atomically(spec, results, tmp_path):
    out = tmp_path / "reports" / "mini"
    paths = write_all(spec, results, FAILED, out, "std", HEADER)
    assert [p.name for p in paths] == ["mini.md", "mini.csv", "mini.tex", "mini.html"]
    assert paths[0].read_text(encoding="utf-8") == GOLDEN_MD
    for p, fmt in zip(paths, ("md", "csv", "tex", "html")):
        assert p.read_text(encoding="utf-8") == render(spec, results, FAILED, fmt, "std", HEADER)
    before = {p: p.read_bytes() for p in paths}
    write_all(spec, results, iter(FAILED), out, "std", HEADER)  # a generator of failures works too
    assert {p: p.read_bytes() for p in paths} == before
    assert sorted(f.name for f in out.iterdir()) == sorted(p.name for p in paths)  # no temp files left


def test_write_all_writes_nothing_when_a_format_fails(spec, results, tmp_path):
    with pytest.raises(ValueError, match="header lacks timestamp"):
        write_all(spec, results, FAILED, tmp_path, "std", {k: v for k, v in HEADER.items() if k != "timestamp"})
    assert list(tmp_path.iterdir()) == []


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("row,col,message", [
    ("ubteacher_lsn", "coco_standard_1", "results name row 'ubteacher_lsn', not in spec mini"),
    ("ubteacher", "coco_standard_2", "results name column 'coco_standard_2', not in spec mini"),
    ("csd", "coco_standard_1", "results name row 'csd' of mini, which is paper-only"),
])
def test_results_the_spec_cannot_place_are_refused(spec, row, col, message):
    bad = pd.DataFrame([(row, col, 1, 20.0)], columns=["row_id", "column_id", "seed", "AP"])
    with pytest.raises(BenchError, match=message):
        aggregate(bad, spec)


def test_duplicate_seed_is_refused(spec, results):
    with pytest.raises(BenchError, match=r"several runs of \(row, column, seed\) = \(ubteacher, coco_standard_1, 1\)"):
        aggregate(pd.concat([results, results.iloc[:1]]), spec)


def test_bad_options_are_refused(spec, results):
    with pytest.raises(BenchError, match="unknown error measure 'var'; use one of: std, sem"):
        aggregate(results, spec, err="var")
    with pytest.raises(BenchError, match="unknown report format 'pdf'"):
        render(spec, results, fmt="pdf", header=HEADER)
    with pytest.raises(BenchError, match="results lack column"):
        aggregate(results.drop(columns=["seed"]), spec)
    with pytest.raises(BenchError, match="failed cells name column 'coco_additional'"):
        render(spec, results, [("ubteacher", "coco_additional", 1)], header=HEADER)
    with pytest.raises(ValueError, match="render needs a header"):
        render(spec, results)


def test_area_scale_is_shown_in_the_header_and_under_every_table(spec, results):
    """A preset with rescaled size bins (the demo's 0.2) says so where a reader looks: the header
    comment and the visible legend of md, tex and html; at 1 nothing is added."""
    plain = render(spec, results, FAILED, "md", "std", HEADER)
    assert "area_scale" not in plain and "Size bins" not in plain
    scaled = {**HEADER, "area_scale": "0.2"}
    md = render(spec, results, FAILED, "md", "std", scaled)
    assert "<!-- area_scale: 0.2 -->" in md
    assert r"times eval.area\_scale = 0.2 (small \< 6.4 px, large > 19.2 px)." in md.split("-->")[-1]
    tex = render(spec, results, FAILED, "tex", "std", scaled)
    assert r"eval.area\_scale = 0.2 (small \textless{} 6.4 px, large \textgreater{} 19.2 px)" in tex.split(r"\caption")[1]
    html = render(spec, results, FAILED, "html", "std", scaled)
    assert "eval.area_scale = 0.2 (small &lt; 6.4 px, large &gt; 19.2 px)" in html.split("<p>")[1]
    assert "# area_scale: 0.2" in render(spec, results, FAILED, "csv", "std", scaled)


def test_table_header_reports_the_cells_area_scale(monkeypatch):
    from bench import runner
    from core.config import load_config
    from bench.plan import Cell

    monkeypatch.setattr(runner.tracking, "git_sha", lambda: "0123abc")
    demo = [Cell("ubteacher", "c5", 1, load_config("demo", [], method="ubteacher"), "k1")]
    assert runner.table_header("bench run table1", "demo", [], demo)["area_scale"] == "0.2"
    coco = [Cell("ubteacher", "c5", 1, load_config("coco", [], method="ubteacher"), "k2")]
    assert "area_scale" not in runner.table_header("bench run table1", "coco", [], coco)
    both = runner.table_header("bench run table1", "demo", [], demo + coco)
    assert both["area_scale"] == "0.2, 1"  # a table mixing scales lists each
