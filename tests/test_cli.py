"""The command line: bad input is one line on stderr with exit code 2, never a traceback."""

import subprocess
import sys

import pytest


def bench(*args, home):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          env={"BENCH_HOME": str(home), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "ubteachr"], "unknown method 'ubteachr'; known methods: supervised, ubteacher, softteacher, pseco, stac"),
    (["train", "solver.lr=0.1"], "unknown config key 'solver.lr'"),
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--preset", "coco"], "data.root is required for data.dataset=coco"),
    (["train", "--preset", "coco", "--data-root", "/nonexistent"], "COCO train2017 annotations not found"),
    (["data", "check", "/does/not/exist.json"], "/does/not/exist.json"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    out = bench(*args, home=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_config_show_prints_the_validated_preset(tmp_path):
    out = bench("config", "show", "--preset", "demo", "lsm.enabled=true", home=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "enabled: true" in out.stdout and "arch: mobilenet_v2_fpn" in out.stdout
    # a method's protocol: the preset's method_defaults for it (Soft Teacher's EMA on coco)
    out = bench("config", "show", "--preset", "coco", "--method", "softteacher", home=tmp_path)
    assert out.returncode == 0 and "method: softteacher" in out.stdout and "ema_keep_rate: 0.999" in out.stdout
    out = bench("config", "show", "--method", "softteachr", home=tmp_path)
    assert out.returncode == 2 and "unknown method 'softteachr'" in out.stderr


def test_plan_status_report_on_partial_results(tmp_path):
    """Half a table done: `plan` shows done / pending, `status` lists the runs, `report` builds the
    table from what is done and marks the rest, and none of them trains anything."""
    from core.config import load_config
    from bench.worker import run_cell
    from tests.conftest import TINY
    from tests.test_runner import MINI

    cfg = load_config("demo", TINY + ["data.ratio=1", "data.fold=1", "lsm.enabled=false"], method="ubteacher")
    run_cell(cfg, tmp_path, track=False, progress=False)  # the UBT 1% cell (alone: no burn-in cell)
    args = [str(MINI), "--seeds", "1", "--ratios", "1,5", *TINY]
    out = bench("plan", *args, home=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "coco_standard" in line]
    assert sum("done" in line for line in lines) == 1 and sum("pending" in line for line in lines) == 5
    assert "csd" in out.stdout  # the paper-only row is named
    # time left: the finished cell's speed for its kind, the preset's reference timings for the rest
    assert "min of one worker slot (4 cells from preset demo's reference timings)" in " ".join(out.stdout.split())

    out = bench("status", home=tmp_path)
    assert out.returncode == 0 and "1 done" in out.stdout

    out = bench("report", *args, "--out", str(tmp_path / "results"), home=tmp_path)
    assert out.returncode == 0, out.stderr
    md = (tmp_path / "results" / "mini.md").read_text()
    assert "(n=1)" in md or "n=1" in md
    assert {p.suffix for p in (tmp_path / "results").iterdir()} >= {".md", ".csv", ".tex", ".html"}
    assert len(list((tmp_path / "runs").glob("*/*/result.json"))) == 1  # nothing was trained


def test_ctrl_c_exits_130_with_the_resume_hint(monkeypatch, capsys):
    """Typer returns Ctrl-C as exit code 130 instead of raising; a shell script or the runner's
    caller must still see the interruption (an exit code of 0 would read as a finished table)."""
    import bench.cli as cli

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["bench", "config", "show"])
    monkeypatch.setattr("core.config.load_config", interrupted)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["plan"], "Missing argument 'table'"),
    (["plan", "table1", "--seeds", "abc"], "Invalid value for '--seeds'"),
    (["ui", "--host", "0.0.0.0"], "No such option: --host"),
])
def test_usage_errors_exit_2_without_a_traceback(tmp_path, args, message):
    out = bench(*args, home=tmp_path)
    assert out.returncode == 2 and message in out.stderr and "Usage: " in out.stderr
    assert "Traceback" not in out.stderr


def test_a_commands_exit_code_reaches_the_shell(monkeypatch):
    """`bench run` ends with typer.Exit(1) when cells failed; typer returns that code instead of
    raising it, and it must not become exit 0."""
    import typer

    import bench.cli as cli

    def failed_cells(*_, **__):
        raise typer.Exit(1)

    monkeypatch.setattr(sys, "argv", ["bench", "config", "show"])
    monkeypatch.setattr("core.config.load_config", failed_cells)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 1
