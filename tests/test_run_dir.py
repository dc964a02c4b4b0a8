"""core.paths.RunDir: one run directory's files, its status and its config writer."""

import fcntl
import json
import os
from pathlib import Path

from core.paths import RunDir, remove_runs, run_dir, run_dirs

KEY = "ab" + "0" * 62


def test_a_run_dir_is_path_like_and_run_dir_still_returns_the_path(tmp_path):
    d = RunDir.of(tmp_path, KEY)
    assert run_dir(tmp_path, KEY) == d.path == tmp_path / "runs" / "ab" / KEY
    assert os.fspath(d) == str(d.path) and d / "result.json" == d.result_file and d.key == KEY
    assert d == RunDir(d.path) and len({d, RunDir(d.path)}) == 1


def test_status_from_pending_to_done(tmp_path, tiny):
    from core.config import load_config

    d = RunDir.of(tmp_path, KEY)
    assert d.status() == "pending"
    d.write_config(load_config("demo", tiny))
    assert d.config()["preset"] == "demo" and d.status() == "pending"
    (d.checkpoints).mkdir()
    (d.checkpoints / "last_checkpoint").write_text("iter_0000003.pth")
    assert d.status() == "partial"
    with d.lock_file.open("w") as lock:  # a worker holds the cell
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert d.status() == "running"
    d.record_failure("FloatingPointError: loss became nan")
    assert d.status() == "failed" and d.error() == "FloatingPointError: loss became nan"
    d.failed_file.unlink()
    d.result_file.write_text('{"key": "x"}')  # no metrics: not done
    assert d.status() == "corrupt" and d.unreadable()
    d.result_file.write_text(json.dumps({"primary_model": "m", "metrics": {"m": {"AP": 1.5}}}))
    assert d.status() == "done" and d.done_result()["metrics"]["m"]["AP"] == 1.5
    d.record_failure("late")  # a done cell is never marked failed
    assert not d.failed_file.exists()
    summary = d.summary()
    assert summary["key"] == KEY and summary["method"] == "supervised" and summary["AP"] == 1.5
    assert summary["problems"] == [] and tuple(summary) == RunDir.SUMMARY_FIELDS


def test_remove_runs_takes_the_failed_or_the_unreadable(tmp_path):
    failed, broken, fine = (RunDir.of(tmp_path, k * 64) for k in "abc")
    failed.record_failure("boom")
    broken.path.mkdir(parents=True)
    broken.config_file.write_text("- a list, not a config")
    fine.path.mkdir(parents=True)
    assert [d.key[0] for d in run_dirs(tmp_path)] == ["a", "b", "c"]
    assert broken.unreadable() and not fine.unreadable() and not failed.unreadable()
    assert remove_runs(tmp_path, failed=True) == 1 and not failed.path.exists()
    assert remove_runs(tmp_path, corrupt=True) == 1 and not broken.path.exists()
    assert [Path(d) for d in run_dirs(tmp_path)] == [fine.path]
