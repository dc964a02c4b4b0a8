"""`results/index.html` (`bench report --all`): every table and figure of a results folder, linked,
with the command, preset, commit and date each file records; opened in Chromium where it is there."""

import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from bench.report import figures
from bench.report.index import INDEX, write_index
from tests.report.fake_cells import mark_done, mini_by_size, plan

CHROMIUM = Path("/usr/bin/chromium")


class _Rows(HTMLParser):
    """The artifact rows of the page: kind, name, link targets, and the text of each cell."""

    def __init__(self):
        super().__init__()
        self.rows, self._row, self._cell, self.images = [], None, None, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-name" in a:
            self._row = {"kind": a["class"], "name": a["data-name"], "links": [], "cells": []}
        elif self._row is not None and tag == "td":
            self._cell = []
        elif self._row is not None and tag == "a":
            self._row["links"].append(a["href"])
        elif tag == "img":
            self.images.append(a["src"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None


def _rows(path: Path) -> dict[str, dict]:
    p = _Rows()
    p.feed(path.read_text())
    return {r["name"]: r for r in p.rows}


@pytest.fixture
def results(tmp_path):
    """A results folder: a table with its forest plot (fake done cells), a figure whose CSV records
    only its command, a note without any header, and a subfolder."""
    from bench.runner import report

    home = tmp_path / "home"
    spec, cells, _ = plan(mini_by_size(tmp_path), home, seeds=2)
    values = {(r, c, s): {"AP": 20.0 + s + (2 if r.endswith("lsm") else 0), "APs": 5.0, "APm": 6.0 + s, "APl": 7.0}
              for r in ("ubteacher", "ubteacher_lsm") for c in ("coco_standard_1", "coco_standard_5") for s in (1, 2)}
    mark_done(cells, home, values)
    out = tmp_path / "results"
    report(spec, cells, home, out, "demo", "bench report mini.yaml --seeds 2")
    points = pd.DataFrame({"curve": ["ubteacher"] * 2, "threshold": [0.5, 0.7], "seed": [1, 1], "AP": [10.0, 11.0]})
    _, csv = figures.save(figures.plot_threshold_curves(points), points, out / "old" / "figure5.png",
                          "bench study figure5 --seeds 1 --preset demo_long")
    lines = csv.read_text().splitlines()  # as figures wrote before they recorded commit and time
    csv.write_text("\n".join(line for i, line in enumerate(lines) if i == 0 or not line.startswith("#")) + "\n")
    (out / "old" / "notes.txt").write_text("measured by hand\n")
    return out


def test_index_links_every_table_and_figure_with_its_metadata(results):
    path = write_index(results, "bench report --all --out results")
    assert path == results / INDEX
    rows = _rows(path)
    assert set(rows) == {"mini", "mini_deltas", "figure5", "notes.txt"}
    table = rows["mini"]
    assert table["kind"] == "table"
    assert table["links"] == ["mini.md", "mini.html", "mini.csv", "mini.tex"]
    header = {line.split(": ", 1)[0][5:]: line.split(": ", 1)[1][:-4]
              for line in (results / "mini.md").read_text().splitlines() if line.startswith("<!--")}
    command, preset, commit, date = table["cells"][3:7]
    assert (command, preset, commit, date) == ("bench report mini.yaml --seeds 2", "demo", header["git_sha"],
                                               header["timestamp"])
    assert "mini: UBteacher with and without LSM" in table["cells"][1]
    deltas = rows["mini_deltas"]  # the forest plot `bench report` wrote: its CSV records the table's header
    assert deltas["kind"] == "figure" and deltas["links"][-2:] == ["mini_deltas.png", "mini_deltas_data.csv"]
    assert deltas["cells"][3:7] == ["bench report mini.yaml --seeds 2", "demo", header["git_sha"], header["timestamp"]]
    old = rows["figure5"]  # a CSV with the command only: the preset read from it, no commit or date to show
    assert old["links"][-2:] == ["old/figure5.png", "old/figure5_data.csv"]
    assert old["cells"][3:7] == ["bench study figure5 --seeds 1 --preset demo_long", "demo_long", "—", "—"]
    assert rows["notes.txt"]["links"] == ["old/notes.txt"] and rows["notes.txt"]["cells"][3] == "—"
    for r in rows.values():  # every link resolves
        assert all((results / link).is_file() for link in r["links"])
    text = path.read_text()
    assert "<h2 id=\"old\">old/</h2>" in text and "bench report --all --out results" in text
    assert write_index(results, "bench report --all --out results").read_text() == text  # no clock in the page


def test_index_gives_the_files_git_commit_where_the_file_records_none(results):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_COMMITTER_DATE": "2026-01-02T03:04:05Z"}
    for cmd in (["git", "init", "-q"], ["git", "add", "old"], ["git", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=results, check=True, env=env, capture_output=True)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=results, capture_output=True, text=True,
                         check=True).stdout.strip()
    rows = _rows(write_index(results))
    assert rows["figure5"]["cells"][5:7] == [sha, "2026-01-02"]
    assert 'class="git" title="from git: the last commit of the file">' + sha in (results / INDEX).read_text()
    assert rows["mini"]["cells"][5] != sha  # the table's own header wins


def test_bench_report_all_writes_the_index(results, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "report", "--all", "--out", str(results),
                           "--home", str(tmp_path / "empty")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"index: {results / INDEX}" in " ".join(proc.stdout.split())
    assert set(_rows(results / INDEX)) == {"mini", "mini_deltas", "figure5", "notes.txt"}
    assert not (tmp_path / "empty").exists()  # nothing read from or written to a store


def test_report_refreshes_an_index_that_is_there(results, tmp_path):
    from bench.runner import report

    write_index(results)
    home = tmp_path / "home"
    spec, cells, _ = plan(mini_by_size(tmp_path), home, seeds=2)
    (results / "mini_deltas.png").unlink()
    report(spec, cells, home, results, "demo", "bench report mini.yaml --seeds 2")
    assert "mini_deltas" in _rows(results / INDEX)


def test_index_opens_in_chromium(results, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("no browser at /usr/bin/chromium: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    path = write_index(results)
    shots = Path(os.environ.get("BENCH_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(path.resolve().as_uri())
            page.get_by_text("lsm-bench results").first.wait_for(timeout=30_000)
            assert page.locator("tr.table").count() == 1 and page.locator("tr.figure").count() == 2
            # the figures' thumbnails load (naturalWidth > 0: the relative links resolve)
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) == 2 and min(widths) > 0
            page.screenshot(path=str(shots / "results-index.png"), full_page=True)
            page.get_by_role("link", name="md", exact=True).click()
            page.wait_for_url("**/mini.md", timeout=30_000)
        finally:
            browser.close()
