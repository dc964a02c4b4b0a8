"""Bad input and broken state (issue 19): one line on stderr naming the value and the fix, exit 2
for bad input, 1 for failed work, 130 for an interrupt; nothing published is overwritten."""

import json
import sys
from pathlib import Path

import pytest

from bench.plan import build_plan
from bench.specs import load_spec_file
from tests.conftest import TINY
from tests.test_runner import MINI, RATIOS


def cli(monkeypatch, capsys, *args, home):
    """`bench ARGS` in this process (no interpreter start): (exit code, stdout, stderr)."""
    import bench.cli

    monkeypatch.setenv("BENCH_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "argv", ["bench", *map(str, args)])
    try:
        bench.cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


def fake_done(cell, home, ap=30.0):
    """A finished cell's result.json without training it (the report only reads this file)."""
    d = cell.run_dir(home)
    d.write_config(cell.config)
    result = {"key": cell.key, "method": cell.config.method, "lsm": cell.config.lsm.enabled, "preset": "demo",
              "ratio": cell.config.data.ratio, "seed": cell.seed, "iterations": cell.iterations,
              "primary_model": "teacher", "metrics": {"teacher": {"AP": ap}}}
    (d / "result.json").write_text(json.dumps(result))


def mini_cells(home):
    return build_plan(load_spec_file(MINI), "demo", 1, home, RATIOS, overrides=list(TINY))[0]


TABLE = [MINI, "--seeds", "1", "--ratios", "1,5", *TINY]


# -- item 3: a published table is never overwritten by an empty one ----------------------------------
@pytest.mark.parametrize("bad, message", [
    (["--seeds", "0"], "--seeds 0: give 1 to 100"),
    (["--seeds", "-1"], "--seeds -1: give 1 to 100"),
    (["--ratios", "0"], "--ratios 0: 0 is not a percent in (0, 100]"),
    (["--ratios", "150"], "--ratios 150: 150 is not a percent in (0, 100]"),
    (["--ratios", "abc"], "'abc' is not a number"),
    (["--ratios", "25,"], "'' is not a number"),
    (["--ratios", "3"], "table mini on preset demo has no cell to run with --ratios 3 (its columns' ratios: 1, 5)"),
])
@pytest.mark.parametrize("command", ["report", "run"])
def test_bad_seeds_or_ratios_leave_the_published_table(tmp_path, monkeypatch, capsys, command, bad, message):
    out = tmp_path / "results"
    fake_done(next(c for c in mini_cells(tmp_path) if c.row_id == "ubteacher"), tmp_path)
    code, _, err = cli(monkeypatch, capsys, "report", *TABLE, "--out", out, home=tmp_path)
    assert code == 0, err
    published = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"mini.md", "mini.csv", "mini.tex", "mini.html"} <= set(published)
    args = [MINI, "--seeds", "1", "--ratios", "1,5", *bad, *TINY, "--out", out]
    if command == "run":
        args += ["--no-track", "--devices", "cpu"]
    code, _, err = cli(monkeypatch, capsys, command, *args, home=tmp_path)
    assert code == 2 and message in err and one_line(err), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == published


def test_a_report_with_no_cell_done_writes_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "mini.md").write_text("the published table")
    code, _, err = cli(monkeypatch, capsys, "report", *TABLE, "--out", out, home=tmp_path / "fresh")
    assert code == 2 and one_line(err) and "no cell of mini on preset demo is done" in err, err
    assert (out / "mini.md").read_text() == "the published table" and len(list(out.iterdir())) == 1


def test_a_run_whose_cells_all_fail_keeps_the_published_table(tmp_path, monkeypatch, capsys):
    """Every cell fails (a diverging learning rate): exit 1, the failures listed, no table written."""
    import bench.runner

    out = tmp_path / "results"
    out.mkdir()
    (out / "mini.md").write_text("the published table")

    def all_fail(cells, executor, home, **_):
        todo = [c for c in cells if c.status(home) != "done"]
        for c in todo:
            c.directory(home).mkdir(parents=True, exist_ok=True)
            (c.directory(home) / "failed.json").write_text(json.dumps({"error": "FloatingPointError: loss became nan"}))
        return {"done": [], "failed": todo, "skipped": []}

    monkeypatch.setattr(bench.runner, "run_cells", all_fail)
    code, stdout, err = cli(monkeypatch, capsys, "run", *TABLE, "--out", out, "--no-track", "--devices", "cpu",
                            home=tmp_path)
    assert code == 1, err
    assert "0 done, 6 failed" in stdout and "no cell is done: tables not written" in " ".join(stdout.split())
    assert (out / "mini.md").read_text() == "the published table" and len(list(out.iterdir())) == 1


# -- item 9: values that passed validation and crashed later, or were silently ignored ---------------
@pytest.mark.parametrize("args, message", [
    (["train", "--seed", "-1", *TINY], "seed -1: must be in 0 .. 2^32-1"),
    (["train", "--device", "tpu", *TINY], "--device 'tpu': unknown device; use auto, cpu, cuda or cuda:N"),
    (["train", "--device", "mps", *TINY], "--device 'mps': unknown device"),
    (["train", "--device", "", *TINY], "--device '': unknown device"),
    (["train", "device=tpu", *TINY], "device 'tpu': unknown device"),
    (["train", *TINY, "solver.base_lr=inf"], "solver.base_lr=inf: must be a finite number"),
    (["train", *TINY, "solver.base_lr=.nan"], "invalid value for 'solver.base_lr'"),
    (["train", *TINY, "solver.base_lr=1e30"], "solver.base_lr=1e+30: a learning rate above 10 diverges at once"),
    (["train", "method=foo", *TINY], "override 'method=foo': method is not an override here; set it with --method"),
    (["plan", *TABLE, "method=foo"], "override 'method=foo': method is not an override here; set it with a spec row's"),
    (["plan", *TABLE, "seed=3"], "override 'seed=3': seed is not an override here; set it with --seeds"),
    (["plan", MINI, "--seeds", "9999"], "--seeds 9999: give 1 to 100"),
    (["run", *TABLE, "--devices", "tpu"], "--devices 'tpu': unknown device 'tpu'"),
    (["run", *TABLE, "--devices", "cpu,"], "--devices 'cpu,': unknown device ''"),
    (["plan", *TABLE, "--home", ""], "--home '' is empty"),
    (["status", "--home", ""], "--home '' is empty"),
])
def test_values_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, args, message):
    code, _, err = cli(monkeypatch, capsys, *args, home=tmp_path / "store")
    assert code == 2 and message in err and one_line(err), err
    assert not (tmp_path / "store" / "runs").exists()  # nothing trained, nothing written


def test_cuda_devices_without_a_gpu_are_one_refusal_up_front(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code, _, err = cli(monkeypatch, capsys, "run", *TABLE, "--devices", "cuda:0", home=tmp_path)
    assert code == 2 and one_line(err) and "--devices cuda:0: no CUDA GPU is visible on this machine" in err, err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, _, err = cli(monkeypatch, capsys, "run", *TABLE, "--devices", "cuda:0,cuda:2", home=tmp_path)
    assert code == 2 and "cuda:2 does not exist (2 GPU(s) visible: cuda:0, cuda:1)" in err, err
    assert not (tmp_path / "runs").exists()


def test_an_empty_bench_home_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(monkeypatch, capsys, "status", home="")
    assert code == 2 and one_line(err) and "BENCH_HOME is set but empty" in err, err


def test_a_typo_in_a_spec_rows_method_is_refused(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "mini.yaml"
    spec.write_text(MINI.read_text().replace("method: ubteacher, lsm: true", "method: ubteachr, lsm: true"))
    code, _, err = cli(monkeypatch, capsys, "plan", spec, "--seeds", "1", *TINY, home=tmp_path)
    assert code == 2 and one_line(err), err
    assert f"spec file {spec}" in err and "row ubteacher_lsm: unknown method 'ubteachr'" in err
    assert "csd" in err  # the paper's methods stay allowed (their rows show the paper's values only)


# -- item 4: a corrupt or truncated result.json blocks nothing ---------------------------------------
def test_a_corrupt_result_is_named_counted_as_not_done_and_cleaned(tmp_path, monkeypatch, capsys):
    cells = [c for c in mini_cells(tmp_path) if not c.is_start]
    good, bad, keyless = cells[0], cells[1], cells[2]
    for c in (good, bad, keyless):
        fake_done(c, tmp_path)
    broken = bad.directory(tmp_path) / "result.json"
    broken.write_text(broken.read_text()[:25])  # a write cut short
    (keyless.directory(tmp_path) / "result.json").write_text('{"key": "x"}')  # valid JSON, no metrics
    code, out, err = cli(monkeypatch, capsys, "status", home=tmp_path)
    assert code == 0, err
    text = " ".join(out.split())
    assert "1 done" in text and "2 corrupt" in text and str(broken) in text
    assert "JSONDecodeError" in text and "no metrics of its primary model" in text

    code, out, err = cli(monkeypatch, capsys, "plan", *TABLE, home=tmp_path)
    assert code == 0, err
    assert str(broken) in " ".join(err.split()) and "counts as not done" in err
    assert sum(" corrupt " in line for line in out.splitlines()) == 2

    code, out, err = cli(monkeypatch, capsys, "report", *TABLE, "--out", tmp_path / "results", home=tmp_path)
    assert code == 0, err
    assert "n=1" in (tmp_path / "results" / "mini.md").read_text()  # the readable cell only

    code, out, err = cli(monkeypatch, capsys, "clean", "--corrupt", home=tmp_path)
    assert code == 0 and "removed 2 run directories" in out, err
    assert not bad.directory(tmp_path).exists() and (good.directory(tmp_path) / "result.json").exists()


def test_a_cell_with_a_corrupt_result_trains_again_to_the_same_result(tmp_path, tiny):
    """The worker reads an unreadable result.json as not done (it used to return json.loads of it)."""
    from core.config import load_config
    from bench.worker import run_cell

    cfg = load_config("demo", tiny, method="supervised")
    first = run_cell(cfg, tmp_path, track=False, progress=False)
    path = next(tmp_path.glob("runs/*/*/result.json"))
    path.write_text(path.read_text()[: len(path.read_text()) // 2])
    again = run_cell(cfg, tmp_path, track=False, progress=False)
    same = json.dumps(first["metrics"], sort_keys=True)  # NaN (a class without boxes) == NaN as text
    assert json.dumps(again["metrics"], sort_keys=True) == same
    assert json.dumps(json.loads(path.read_text())["metrics"], sort_keys=True) == same


# -- item 5: a truncated last checkpoint: resume from the newest readable one ------------------------
@pytest.mark.parametrize("damage", ["truncate", "scramble"])
def test_a_truncated_last_checkpoint_resumes_from_the_one_before(tmp_path, tiny, capfd, damage):
    """Killed while the last checkpoint was written (cut to half its size) or with its bytes
    damaged: the cell resumes from the previous checkpoint and ends as an uninterrupted run."""
    import torch

    from adapters.engine.trainer import StopTraining
    from core.config import load_config
    from bench.worker import run_cell
    from tests.test_worker import StopAfter, _assert_same_states, _final_state

    cfg = load_config("demo", tiny + ["solver.checkpoint_period=2"], method="supervised")
    full = run_cell(cfg, tmp_path / "a", track=False, progress=False)
    with pytest.raises(StopTraining):
        run_cell(cfg, tmp_path / "b", track=False, progress=False, extra_hooks=[StopAfter(5)])
    ckpts = sorted((tmp_path / "b").glob("runs/*/*/checkpoints/iter_*.pth"))
    assert [p.name for p in ckpts] == ["iter_0000001.pth", "iter_0000003.pth"]
    data = ckpts[-1].read_bytes()
    if damage == "truncate":
        ckpts[-1].write_bytes(data[: len(data) // 2])
    else:  # the zip directory intact, a stored tensor's bytes not: torch.load fails on its checksum
        ckpts[-1].write_bytes(data[:2000] + bytes(len(data) - 4000) + data[-2000:])
    with pytest.raises(Exception):
        torch.load(ckpts[-1], weights_only=False)
    capfd.readouterr()
    resumed = run_cell(cfg, tmp_path / "b", track=False, progress=False)
    assert f"checkpoint {ckpts[-1]}" in capfd.readouterr().err  # named by path
    _assert_same_states(_final_state(tmp_path / "a", full), _final_state(tmp_path / "b", resumed))
    assert json.dumps(resumed["metrics"], sort_keys=True) == json.dumps(full["metrics"], sort_keys=True)


def test_checkpoints_and_results_are_fsynced_before_their_rename(tmp_path, monkeypatch):
    import os

    import torch

    from adapters.engine.checkpoint import Checkpointer
    from bench.worker import atomic_write_json

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), real_replace(a, b))[1])
    Checkpointer(tmp_path / "ck").save(0, {"w": torch.zeros(2)})
    atomic_write_json(tmp_path / "result.json", {"a": 1})
    assert events[:2] == ["fsync", "replace iter_0000000.pth"]
    assert events[2:4] == ["fsync", "replace last_checkpoint"]
    assert events[-2:] == ["replace result.json", "fsync"] and events[-3] == "fsync"
