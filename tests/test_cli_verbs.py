"""`bench run` with config overrides, and the listings of `bench plan` / `bench status` in every
--format: full keys and method names wherever stdout is not a terminal."""

import csv
import io
import json
import re

import pytest

from tests.test_errors import TABLE, cli, fake_done, mini_cells, one_line

RUN = ["--no-track", "--devices", "cpu"]
FULL_KEY = re.compile(r"\b[0-9a-f]{64}\b")


@pytest.fixture
def planned(monkeypatch):
    """bench.runner.run_cells replaced by a recorder: the cells each `bench run` hands over, none trained."""
    import bench.runner

    runs = []

    def record(cells, executor, home, **_):
        runs.append(cells)
        return {"done": [], "failed": [], "skipped": []}

    monkeypatch.setattr(bench.runner, "run_cells", record)
    return runs


def test_run_overrides_enter_every_cells_config_and_key(tmp_path, monkeypatch, capsys, planned):
    code, _, err = cli(monkeypatch, capsys, "run", *TABLE, *RUN, home=tmp_path)
    assert code == 0, err
    code, _, err = cli(monkeypatch, capsys, "run", *TABLE, "semi.lambda_u=3.5", *RUN, home=tmp_path)
    assert code == 0, err
    plain, changed = ([c for c in cells if not c.is_start] for cells in planned)
    assert [(c.row_id, c.column_id, c.seed) for c in plain] == [(c.row_id, c.column_id, c.seed) for c in changed]
    assert len(changed) == 4 and all(c.config.semi.lambda_u == 3.5 for c in changed)
    assert all(c.config.semi.lambda_u != 3.5 for c in plain)
    assert not {c.key for c in plain} & {c.key for c in changed}  # other cells, not the cached ones
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/*/result.json"))


@pytest.mark.parametrize("override, message", [
    ("method=foo", "override 'method=foo': method is not an override here; set it with a spec row's `method`"),
    ("data.fold=2", "override 'data.fold=2': data.fold is not an override here; set it with --seeds"),
    ("solver.lr=0.1", "unknown config key 'solver.lr'"),
    ("solver.max_iter", "override 'solver.max_iter' is not of the form key=value"),
])
def test_run_refuses_a_bad_override_before_anything_runs(tmp_path, monkeypatch, capsys, planned, override, message):
    code, _, err = cli(monkeypatch, capsys, "run", *TABLE, override, *RUN, home=tmp_path / "store")
    assert code == 2 and message in err and one_line(err), err
    assert planned == [] and not (tmp_path / "store" / "runs").exists()


def _plan_cells(home):
    return [c for c in mini_cells(home) if not c.is_start]


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_plan_csv_and_json_have_full_keys_and_method_names(tmp_path, monkeypatch, capsys, fmt):
    cells = mini_cells(tmp_path)
    fake_done(next(c for c in cells if c.row_id == "ubteacher_lsm"), tmp_path)
    code, out, err = cli(monkeypatch, capsys, "plan", *TABLE, "--format", fmt, home=tmp_path)
    assert code == 0, err
    rows = json.loads(out) if fmt == "json" else list(csv.DictReader(io.StringIO(out)))
    assert [r["key"] for r in rows] == [c.key for c in cells]  # 64 hex digits, not 12
    assert [r["method"] for r in rows] == [c.config.method for c in cells]
    assert {r["row"] for r in rows} == {"burn-in", "ubteacher", "ubteacher_lsm"}
    assert sorted(r["status"] for r in rows).count("done") == 1
    assert "training iterations left" in err and "csd" in err  # notes and the summary: stderr, not the data


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_status_csv_and_json_have_full_keys_and_method_names(tmp_path, monkeypatch, capsys, fmt):
    cells = _plan_cells(tmp_path)
    for c in cells[:2]:
        fake_done(c, tmp_path, ap=12.5)
    code, out, err = cli(monkeypatch, capsys, "status", "--format", fmt, home=tmp_path)
    assert code == 0, err
    rows = json.loads(out) if fmt == "json" else list(csv.DictReader(io.StringIO(out)))
    assert sorted(r["key"] for r in rows) == sorted(c.key for c in cells[:2])
    assert {r["method"] for r in rows} == {"ubteacher"} and {str(r["status"]) for r in rows} == {"done"}
    assert {float(r["AP"]) for r in rows} == {12.5}
    assert "2 done" in err


def test_the_table_is_not_cut_when_stdout_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    cells = _plan_cells(tmp_path)
    fake_done(cells[0], tmp_path)
    from rich.console import Console

    # 40 columns would cut names and keys; stdout here is not a terminal, so nothing is cut
    monkeypatch.setattr("bench.cli_common.console", Console(width=40))
    code, out, err = cli(monkeypatch, capsys, "plan", *TABLE, home=tmp_path)
    assert code == 0, err
    assert {c.key for c in cells} <= set(FULL_KEY.findall(out)) and "ubteacher_lsm" in out and "…" not in out
    code, out, err = cli(monkeypatch, capsys, "status", home=tmp_path)
    assert code == 0, err
    assert FULL_KEY.findall(out) == [cells[0].key] and "1 done" in out and "…" not in out


def test_an_unknown_format_is_one_line(tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "status", "--format", "xml", home=tmp_path)
    assert code == 2 and "--format xml: use table, csv or json" in err and one_line(err), err


def test_eval_scores_a_finished_run_and_refuses_damaged_weights_in_one_line(tmp_path, monkeypatch, capsys):
    """`bench eval` evaluates the final weights again; truncated or foreign weights are one line
    naming the file and the fix, not a torch traceback."""
    import torch

    from tests.test_archive import _one_done_cell

    result = _one_done_cell(tmp_path)
    key = result["key"]
    code, out, err = cli(monkeypatch, capsys, "eval", key[:12], home=tmp_path)
    assert code == 0 and "Average Precision" in out, err
    weights = next((tmp_path / "runs").glob(f"*/{key}/model_final.pth"))
    whole = weights.read_bytes()
    for damaged in (whole[: len(whole) // 2], b""):
        weights.write_bytes(damaged)
        code, _, err = cli(monkeypatch, capsys, "eval", key[:12], home=tmp_path)
        assert code == 2 and one_line(err) and f"{weights} cannot be read as this run's final weights" in err, err
        assert f"delete {weights.parent} and train the cell again" in err
    torch.save({"student": {}}, weights)  # a readable file with no weights of this model in it
    code, _, err = cli(monkeypatch, capsys, "eval", key[:12], home=tmp_path)
    assert code == 2 and one_line(err) and "cannot be read as this run's final weights" in err, err


@pytest.mark.parametrize("args, message", [
    (["ui", "--port", "-1"], "Invalid value for '--port'"),  # was an OverflowError from bind()
    (["serve", "mlflow", "--port", "70000"], "Invalid value for '--port'"),
    (["figure", "fig1", "--ratio", "0"], "0 is not a percent in (0, 100]"),  # a falsy 0 meant the default 100
    (["study", "figure5", "--ratio", "101"], "101 is not a percent in (0, 100]"),
])
def test_ports_and_ratios_out_of_range_are_usage_errors(tmp_path, monkeypatch, capsys, args, message):
    code, _, err = cli(monkeypatch, capsys, *args, home=tmp_path)
    assert code == 2 and message in err and "Traceback" not in err and "internal error" not in err, err


@pytest.mark.parametrize("args", [
    ["run", "table1", "--seeds", "1"], ["report", "table1"], ["figure", "deltas", "table1"],
    ["study", "figure5"], ["export", "table1"],
])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys, planned, args):
    """It used to surface when the tables were written (after a whole `bench run`) as an internal error."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / ("cells.tar.gz" if args[0] == "export" else "results")
    code, _, err = cli(monkeypatch, capsys, *args, "--out", out, home=tmp_path)
    assert code == 2 and one_line(err) and f"--out {out}: {blocker} is a file" in err, err
    assert planned == [] and not (tmp_path / "runs").exists()


def test_train_refuses_lsm_on_supervised_and_anchor_lists_that_do_not_fit_the_fpn(tmp_path, monkeypatch, capsys):
    """--lsm on Supervised trained a second Supervised cell under another key; an empty anchor list
    was an IndexError inside the detector."""
    code, _, err = cli(monkeypatch, capsys, "train", "--method", "supervised", "--lsm", home=tmp_path)
    assert code == 2 and one_line(err) and "--lsm: the supervised method has no LSM variant" in err, err
    for value, message in [("[]", "List should have at least 5 items"), ("[8,16,32,64,128,256]", "at most 5 items"),
                           ("[8,16,32,64,0]", "'model.anchor_sizes.4': Input should be greater than 0")]:
        code, _, err = cli(monkeypatch, capsys, "train", "--method", "ubteacher", f"model.anchor_sizes={value}",
                           home=tmp_path)
        assert code == 2 and one_line(err) and message in err, err
    assert not (tmp_path / "runs").exists()


def test_train_refuses_a_mean_teacher_run_that_ends_inside_its_burn_in(tmp_path, monkeypatch, capsys):
    """semi.burn_in >= solver.max_iter trained the supervised burn-in only and reported it as the
    method's result (the README's own example did, on the demo's 1000-iteration burn-in)."""
    code, _, err = cli(monkeypatch, capsys, "train", "--method", "ubteacher", "solver.max_iter=500", home=tmp_path)
    assert code == 2 and one_line(err), err
    assert "semi.burn_in=1000 is not below solver.max_iter=500: ubteacher would train only its supervised burn-in" in err
    assert not (tmp_path / "runs").exists()
