"""The Slurm executor: job arrays per resource profile, DDP variables, CLI errors (no Slurm needed),
and 4 tiny cells through a real slurmctld/slurmd (`sudo .ci/slurm_cluster.sh start`; skipped without).
"""

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.errors import BenchError
from bench.plan import build_plan
from bench.specs import load_spec_file

SPEC = """
name: slurm_mini
title: Supervised at 5% and 10%
paper_table: table1
metrics: [AP]
columns:
  - {id: coco_standard_5, setting: coco_standard_5, label: "5%", overrides: {data.ratio: 5}}
  - {id: coco_standard_10, setting: coco_standard_10, label: "10%", overrides: {data.ratio: 10}}
rows:
  - {id: supervised, label: Supervised, method: supervised, lsm: false}
"""
# the cell cancelled while it trains: long enough (about 20 s of one core) that it cannot finish in
# the seconds between scancel's SIGTERM (which submitit ignores) and slurmstepd's SIGKILL
LONG = ["solver.max_iter=400", "solver.steps=[300]", "solver.checkpoint_period=5", "solver.log_period=1"]


def _spec(tmp_path):
    path = tmp_path / "slurm_mini.yaml"
    path.write_text(SPEC)
    return load_spec_file(path)


def _slurm_up() -> str:
    """Empty if a Slurm cluster answers here, else why not."""
    for tool in ("sbatch", "sinfo", "squeue", "scancel", "srun"):
        if shutil.which(tool) is None:
            return f"'{tool}' not on PATH (apt-get install slurm-wlm munge; sudo .ci/slurm_cluster.sh start)"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed (pip install 'lsm-bench[slurm]')"
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not any(s.strip("*") in ("idle", "mix", "alloc") for s in out.stdout.split()):
        why = (out.stderr or out.stdout).strip()[:200]
        return f"no Slurm node is up (sinfo: {why}); sudo .ci/slurm_cluster.sh start"
    return ""


# --- without Slurm ---------------------------------------------------------------------------------

@pytest.fixture
def no_checks(monkeypatch):
    """A SlurmExecutor object without sbatch on PATH (only its planning parts are exercised)."""
    monkeypatch.setattr("bench.executors.slurm.check_slurm", lambda: None)


def test_cells_are_grouped_into_one_array_per_resource_profile(tmp_path, tiny, no_checks, monkeypatch):
    """Burn-ins train 2 of 6 iterations: a shorter time limit, their own array; the 4 cells that
    start from them train 4 of 6 (the same profile, one array of 4)."""
    from bench.executors.slurm import SlurmExecutor
    from tests.test_runner import MINI, RATIOS

    cells, _ = build_plan(load_spec_file(MINI), "demo", 1, tmp_path, RATIOS, overrides=tiny)
    ex = SlurmExecutor(time="60:00:00", gpus_per_cell=2, cpus_per_cell=16, partition="gpu")
    profiles = {c.key: ex.resources(c) for c in cells}
    burn = {profiles[c.key] for c in cells if c.is_burn_in}
    rest = {profiles[c.key] for c in cells if not c.is_burn_in}
    assert len(burn) == len(rest) == 1
    (b,), (r,) = burn, rest
    assert (b.time_min, r.time_min) == (1200, 2400)  # 60 h x 2/6 and x 4/6, in whole 10-minute steps
    assert r.gpus == 2 and r.tasks == 2 and r.cpus_per_task == 8 and r.partition == "gpu"
    params = ex._parameters(r)
    assert params["gpus_per_node"] == 2 and params["ntasks_per_node"] == 2 and params["array_parallelism"] == 256

    batches = []

    class FakeJob:
        def __init__(self, jid):
            self.job_id = jid
            self.paths = type("P", (), {"stdout": tmp_path / f"{jid}.out"})()

    class FakeExecutor:  # records what would go to sbatch: one batch = one array
        def __init__(self, folder, max_num_timeout):
            self.params = {}

        def update_parameters(self, **p):
            self.params = p

        def batch(self):
            import contextlib

            batches.append((self.params, []))
            return contextlib.nullcontext()

        def submit(self, task):
            batches[-1][1].append(task)
            return FakeJob(f"{len(batches)}_{len(batches[-1][1]) - 1}")

    monkeypatch.setattr("submitit.SlurmExecutor", FakeExecutor)
    jobs = ex.submit_many([(c, 1) for c in cells], tmp_path, "parent123")
    assert sorted(len(tasks) for _, tasks in batches) == [2, 4]
    assert {p["time"] for p, _ in batches} == {1200, 2400}
    assert len(ex.jobs) == 6 and ex.submitted == [j.job_id for j in jobs]
    task = batches[0][1][0]
    assert task.argv[1:] == ["--home", str(tmp_path.resolve()), "--parent-run-id", "parent123"]
    # the cells that start from a burn-in get its directory, as the plan resolved it
    starts = {str(c.start_from(tmp_path.resolve())) for c in cells if c.depends_on}
    assert {t.argv[t.argv.index("--start-from") + 1] for t in batches[1][1]} == starts and len(starts) == 2
    import yaml

    assert yaml.safe_load(Path(task.argv[0]).read_text())["device"] == "cuda"  # GPU profile
    assert jobs[0].log.is_symlink() and jobs[0].log.name == "slurm.log"


def test_ddp_env_maps_slurm_tasks_to_torch_distributed():
    from bench.executors.slurm import ddp_env

    env = ddp_env(global_rank=3, local_rank=1, world_size=4, hostnames=["gpu07", "gpu08"], job_id="4242_3")
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(20000 + 42423 % 20000)}
    # every task of one job agrees on the port; another job gets another one
    assert ddp_env(0, 0, 4, ["gpu07"], "4242_3")["MASTER_PORT"] == env["MASTER_PORT"]
    assert ddp_env(0, 0, 4, ["gpu07"], "4243_3")["MASTER_PORT"] != env["MASTER_PORT"]


@pytest.mark.parametrize("value, minutes", [("48:00:00", 2880), ("2-00:00:00", 2880), ("90", 90), ("1-12", 2160),
                                            ("10:30", 11), ("0:05:00", 5)])
def test_slurm_time_formats(value, minutes):
    from bench.executors.slurm import parse_time

    assert parse_time(value) == minutes


@pytest.mark.parametrize("value", ["two days", "0", "48h"])
def test_bad_slurm_time_is_refused(value):
    from bench.executors.slurm import parse_time

    with pytest.raises(BenchError, match="is"):
        parse_time(value)


def _bench(*args, home, path="/usr/bin:/bin"):
    bindir = str(Path(sys.executable).parent)  # the venv's python, not Slurm's tools
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, timeout=120,
                          env={"BENCH_HOME": str(home), "PATH": f"{bindir}:{path}", "COLUMNS": "200"})


def test_cli_without_sbatch_is_one_line_naming_the_fix(tmp_path, tiny):
    empty = tmp_path / "bin"
    empty.mkdir()
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    out = _bench("run", str(spec), "--seeds", "1", "--executor", "slurm", *tiny, home=tmp_path, path=str(empty))
    assert out.returncode == 2, out.stderr
    assert "'sbatch' is not on PATH" in out.stderr and "--executor local" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_cli_unknown_executor_is_one_line(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    out = _bench("run", str(spec), "--seeds", "1", "--executor", "kubernetes", home=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "unknown executor 'kubernetes'; use --executor local or --executor slurm" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# --- with a real Slurm -----------------------------------------------------------------------------

def _wait_running(job_id: str, cell_dir: Path, timeout: float = 120) -> None:
    """Until the job is RUNNING and its worker has saved a checkpoint (it trains)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((cell_dir / "checkpoints").glob("iter_*.pth")):
            state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
            assert "RUNNING" in state, state
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not start training within {timeout} s")


@pytest.mark.skipif(bool(_slurm_up()), reason=_slurm_up() or "slurm is up")
def test_a_refused_submission_is_one_line(tmp_path, tiny):
    from bench.executors.slurm import SlurmExecutor

    cells, _ = build_plan(_spec(tmp_path), "demo", 1, tmp_path, [5.0], overrides=tiny)
    ex = SlurmExecutor(partition="no-such-partition", gpus_per_cell=0, time="5", track=False)
    with pytest.raises(BenchError, match=r"sbatch refused the cells \(.*[Ii]nvalid partition.*\); check --partition"):
        ex.submit_many([(cells[0], 1)], tmp_path, None)
    assert not ex.jobs


@pytest.mark.skipif(bool(_slurm_up()), reason=_slurm_up() or "slurm is up")
def test_four_cells_through_slurm_then_scancel_one_and_rerun_only_it(tmp_path, tiny):
    from bench.executors.slurm import SlurmExecutor
    from bench.runner import report, run_cells

    home = tmp_path / "home"
    spec = _spec(tmp_path)
    cells, _ = build_plan(spec, "demo", 2, home, [5.0, 10.0], overrides=tiny)
    assert len(cells) == 4 and not any(c.depends_on for c in cells)

    def executor():
        return SlurmExecutor(gpus_per_cell=0, cpus_per_cell=1, time="00:10:00", array_parallelism=4,
                             track=False, poll_interval=1.0)

    ex = executor()
    outcome = run_cells(cells, ex, home)
    assert len(outcome["done"]) == 4 and not outcome["failed"], outcome
    assert len({j.split("_")[0] for j in ex.submitted}) == 1  # one array of 4
    paths = report(spec, cells, home, tmp_path / "results", "demo", "bench run slurm_mini", tracker=None)
    md = paths[0].read_text()
    assert "Supervised" in md and "(2)" in md  # 2 seeds in each column
    for c in cells:  # submitit's log, reached from the cell
        assert (c.directory(home) / "slurm.log").resolve().is_file()

    # the acceptance case: the table grows by a longer cell; scancel it while it trains, rerun
    victim = build_plan(spec, "demo", 3, home, [5.0], overrides=tiny + LONG)[0][-1]
    assert victim.seed == 3 and victim.key not in {c.key for c in cells}
    table = cells + [victim]
    before = {c.key: (c.directory(home) / "result.json").stat().st_mtime_ns for c in cells}
    ex = executor()
    result = {}
    thread = threading.Thread(target=lambda: result.update(run_cells(table, ex, home)))
    thread.start()
    deadline = time.time() + 30
    while not ex.submitted and time.time() < deadline:
        time.sleep(0.05)
    assert len(ex.submitted) == 1  # the done cells are not submitted
    _wait_running(ex.submitted[0], victim.directory(home))
    subprocess.run(["scancel", ex.submitted[0]], check=True)
    thread.join(timeout=120)
    assert [c.key for c in result["failed"]] == [victim.key]
    failed = json.loads((victim.directory(home) / "failed.json").read_text())
    assert "CANCELLED" in failed["traceback"]  # the job's state, at the end of its log tail
    assert list((victim.directory(home) / "checkpoints").glob("iter_*.pth"))  # what the rerun resumes from

    ex = executor()
    again = run_cells(table, ex, home)
    assert len(again["done"]) == 5 and not again["failed"]
    assert len(ex.submitted) == 1  # only the cancelled cell went to Slurm again
    assert (victim.directory(home) / "result.json").exists()
    assert {c.key: (c.directory(home) / "result.json").stat().st_mtime_ns for c in cells} == before
    iterations = [json.loads(line)["iteration"] for line in (victim.directory(home) / "metrics.jsonl").open()
                  if '"total_loss"' in line]
    assert iterations[-1] == 400 and iterations.count(1) == 1  # resumed from the checkpoint, not restarted
