"""`bench study` / `bench figure` through Typer, as bench/cli.py will wire them."""

import typer
from PIL import Image
from typer.testing import CliRunner

from core.errors import BenchError
from studies.cli import figure, study_app

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _app():
    app = typer.Typer()
    app.add_typer(study_app, name="study")
    app.command("figure", context_settings=EXTRA)(figure)
    return app


def test_study_figure5_then_figure_regenerates_it(tmp_path, tiny):
    app, runner = _app(), CliRunner()
    out = tmp_path / "results"
    args = ["--seeds", "1", "--grid", "0.5,0.8", "--ratio", "25", "--home", str(tmp_path), "--out", str(out), "--no-track"]
    r = runner.invoke(app, ["study", "figure5", *args, *tiny], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "alpha 0.8 left out" in r.output and "study figure5-demo-ubteacher: 2 complete" in r.output
    assert "study figure5-demo-ubteacher_lsm: 1 complete" in r.output
    def data_lines():
        return [line for line in (out / "figure5_data.csv").read_text().splitlines() if not line.startswith("#")]

    assert data_lines()[0].startswith("curve,threshold,seed,AP") and len(data_lines()) == 1 + 3
    # rerun: nothing left to train, same three points
    r = runner.invoke(app, ["study", "figure5", *args, *tiny], catch_exceptions=False)
    assert r.exit_code == 0 and "2 complete" in r.output and len(data_lines()) == 4
    (out / "figure5.png").unlink()
    r = runner.invoke(app, ["figure", "figure5", "--home", str(tmp_path), "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert Image.open(out / "figure5.png").info["Description"].startswith("bench ")


def test_bad_input_is_one_bench_error(tmp_path, tiny):
    app, runner = _app(), CliRunner()
    r = runner.invoke(app, ["figure", "fig9", "--home", str(tmp_path)])
    assert isinstance(r.exception, BenchError) and "unknown figure 'fig9'" in str(r.exception)
    r = runner.invoke(app, ["figure", "figure5", "--home", str(tmp_path)])
    assert isinstance(r.exception, BenchError) and "bench study figure5" in str(r.exception)
    r = runner.invoke(app, ["study", "figure5", "--grid", "0.5,x", "--home", str(tmp_path)])
    assert isinstance(r.exception, BenchError) and "--grid takes numbers" in str(r.exception)
    r = runner.invoke(app, ["study", "tune", "--trials", "0", "--home", str(tmp_path), *tiny])
    assert isinstance(r.exception, BenchError) and "--trials must be at least 1" in str(r.exception)
    r = runner.invoke(app, ["figure", "fig4", "--home", str(tmp_path), "--seeds", "1", *tiny])
    assert isinstance(r.exception, BenchError) and "pass --train" in str(r.exception)


def test_ui_hint_keeps_the_extras_brackets(monkeypatch, tmp_path, capsys):
    """rich reads `[dashboard]` as a style tag unless escaped; the install hint must print it."""
    import studies.cli as study_cli
    from studies import ui as ui_mod

    monkeypatch.setattr(ui_mod, "dashboard_available", lambda: False)
    from types import SimpleNamespace

    ended = SimpleNamespace(name="mlflow", url="http://127.0.0.1:1", process=SimpleNamespace(poll=lambda: 0))
    monkeypatch.setattr(ui_mod, "start", lambda *a: [ended])  # a server that has already exited
    monkeypatch.setattr(ui_mod, "stop", lambda services: None)
    monkeypatch.setattr(study_cli, "console", __import__("rich.console").console.Console(width=300))
    study_cli.ui(port=1, dashboard_port=2, dashboard=True, storage=None, home=tmp_path)
    assert "pip install 'lsm-bench[dashboard]'" in capsys.readouterr().out


def test_pl_quality_draws_lsm_alpha_set_beside_the_sets_above_t(tmp_path, tiny):
    """UBT's set above t, UBT + LSM's above t and its set above alpha (the one PIM and SD train on)."""
    import pandas as pd

    out = tmp_path / "out"
    r = CliRunner().invoke(_app(), ["figure", "pl-quality", "--train", "--seeds", "1", "--ratio", "10",
                                    "--home", str(tmp_path), "--out", str(out), *tiny], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = pd.read_csv(out / "pseudo_label_quality_data.csv", comment="#")
    assert set(data["method"]) == {"UBteacher, score > t", "UBteacher + LSM, score > t", "UBteacher + LSM, score > α"}
    # recall is logged whatever the teacher finds: every log period (2) after the burn-in, iterations 4 and 6
    steps = data[(data["stat"] == "recall") & (data["size"] == "all")].groupby("method")["iteration"].unique()
    assert all(sorted(s) == [4, 6] for s in steps)
