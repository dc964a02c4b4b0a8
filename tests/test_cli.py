"""The command line: bad input is one line on stderr with exit code 2, never a traceback."""

import subprocess
import sys

import pytest


def bench(*args, home):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          env={"BENCH_HOME": str(home), "PATH": "/usr/bin:/bin"}, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "ubteachr"], "unknown method 'ubteachr'; known methods: supervised, ubteacher"),
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
