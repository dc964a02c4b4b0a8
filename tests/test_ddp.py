"""Multi-GPU cells on CPU: a cell trained by 2 gloo processes against the 1-process run.

One spawn of 2 ranks runs every DDP scenario in turn (each with its own MASTER_PORT, through the
environment as torchrun sets it), so the interpreter start is paid once; the tests then compare
what the ranks recorded with 1-process runs made in this process.
"""

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import _utils as det_utils

from adapters.engine.hooks import HookBase
from adapters.engine.trainer import StopTraining
from core.config import load_config
from core.errors import BenchError
from bench.worker import run_cell
from tests.conftest import TINY
from tests.test_worker import StopAfter

# Every image fits one 64x64 canvas, so padding (which changes the features near an image's
# border) is the same in a rank's half batch as in the global batch.
SAME_CANVAS = ["data.aug.max_size=64"]
# A trunk with frozen BatchNorm (as R50 and the demo's MobileNetV2): the tiny trunk's train-mode
# BatchNorm normalises each rank's half batch with its own statistics, which no averaging undoes.
FROZEN_BN = ["model.arch=mobilenet_v2_fpn", "model.weights=none", "model.trainable_layers=0"]
EXACT = TINY + SAME_CANVAS + FROZEN_BN
ODD_BATCH = "solver.ims_per_batch_labeled=3"


def _take_first(self, matched_idxs):
    """BalancedPositiveNegativeSampler with the first positives/negatives instead of random ones:
    as many RoIs and anchors per image as the random sampler, chosen per image, independent of
    the batch and of the RNG, so the 1- and 2-process runs train on the same samples."""
    pos_idx, neg_idx = [], []
    for labels in matched_idxs:
        positive = torch.where(labels >= 1)[0]
        negative = torch.where(labels == 0)[0]
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
        pos_mask = torch.zeros_like(labels, dtype=torch.uint8)
        neg_mask = torch.zeros_like(labels, dtype=torch.uint8)
        pos_mask[positive[:num_pos]] = 1
        neg_mask[negative[:num_neg]] = 1
        pos_idx.append(pos_mask)
        neg_idx.append(neg_mask)
    return pos_idx, neg_idx


class Recorder(HookBase):
    """Each step's logged scalars and, at the end, this rank's models."""

    def __init__(self, path: Path):
        self.path = path
        self.steps = []

    def after_step(self):
        self.steps.append({k: v for k, v in self.trainer.latest.items() if k.startswith(("loss", "total"))})

    def after_train(self):
        a = self.trainer.adapter
        models = {"student": a.student.state_dict()}
        if hasattr(a, "teacher"):
            models["teacher"] = a.teacher.state_dict()
        _SAVE({"steps": self.steps, "models": models}, self.path)


_SAVE = torch.save


def _free_ports(k: int) -> list[int]:
    socks = [socket.socket() for _ in range(k)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _scenarios():
    """(name, home, overrides, method, run options) of every DDP run, in order."""
    ubt_resume = TINY + ["solver.checkpoint_period=2"]
    return [
        ("supervised", "a", EXACT, "supervised", {"deterministic": True, "track": True}),
        ("ubteacher", "a", EXACT, "ubteacher", {"deterministic": True}),
        ("odd_batch", "a", TINY + [ODD_BATCH], "supervised", {}),
        ("ubt_full", "b", ubt_resume, "ubteacher", {}),
        ("ubt_killed", "c", ubt_resume, "ubteacher", {"stop_at": 4}),
        ("ubt_resumed", "c", ubt_resume, "ubteacher", {}),
    ]


def _rank_main(rank: int, world: int, ports: list[int], root: str) -> None:
    """One rank: every scenario, recording what it wrote, raised and trained."""
    from adapters.engine import distributed
    from bench import tracking, worker
    from core.data import splits, synth

    torch.set_num_threads(1)
    root = Path(root)
    writes = []
    orig_manifest_save, orig_atomic = splits.SplitManifest.save, worker.atomic_write_json
    orig_start = tracking.Tracker.start

    def manifest_save(self, path, *a, **k):
        writes.append(("manifest", Path(path).name))
        return orig_manifest_save(self, path, *a, **k)

    orig_generate = synth.generate

    def generate(out, *a, **k):
        writes.append(("synthetic data", Path(out).parent.name))
        return orig_generate(out, *a, **k)

    def atomic(path, obj):
        writes.append(("json", Path(path).name))
        return orig_atomic(path, obj)

    def torch_save(obj, path, *a, **k):
        if isinstance(path, (str, os.PathLike)):  # not the pickling of all_gather_object
            writes.append(("torch.save", Path(path).name))
        return _SAVE(obj, path, *a, **k)

    def start(self, *a, **k):
        if self.enabled:
            writes.append(("mlflow", "start"))
        return orig_start(self, *a, **k)

    splits.SplitManifest.save, worker.atomic_write_json, tracking.Tracker.start = manifest_save, atomic, start
    torch.save, synth.generate = torch_save, generate
    sampler_call = det_utils.BalancedPositiveNegativeSampler.__call__
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1"})
    out = {}
    for (name, home, overrides, method, opts), port in zip(_scenarios(), ports):
        os.environ["MASTER_PORT"] = str(port)
        if opts.get("deterministic"):
            det_utils.BalancedPositiveNegativeSampler.__call__ = _take_first
        hooks = [Recorder(root / f"{name}.rank{rank}.pt")] + ([StopAfter(opts["stop_at"])] if "stop_at" in opts else [])
        cfg = load_config("demo", overrides, method=method)
        try:
            result = run_cell(cfg, root / home, track=opts.get("track", False), progress=False, extra_hooks=hooks)
            out[name] = {"result": result, "group_left": distributed.is_distributed()}
        except (BenchError, StopTraining) as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            det_utils.BalancedPositiveNegativeSampler.__call__ = sampler_call
    from core.data.sources import prepare_data

    out["split_sha256"] = prepare_data(load_config("demo", TINY).data, root / "a").manifest.sha256
    out["writes"] = writes
    (root / f"out.rank{rank}.json").write_text(json.dumps(out, default=str))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Runs the 2-rank scenarios once; returns (directory, [rank 0's record, rank 1's record])."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("ddp")
    # a hang must fail the test, not stall the suite: collectives time out, and so does the whole run
    os.environ["BENCH_DDP_TIMEOUT_MIN"] = "5"
    try:
        ctx = mp.start_processes(_rank_main, args=(2, _free_ports(len(_scenarios())), str(root)), nprocs=2,
                                 start_method="spawn", join=False)
    finally:
        del os.environ["BENCH_DDP_TIMEOUT_MIN"]
    deadline = time.monotonic() + 600
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-rank DDP scenarios did not finish in 10 minutes")
    records = [json.loads((root / f"out.rank{r}.json").read_text()) for r in range(2)]
    for rec in records:
        rec["writes"] = [tuple(w) for w in rec["writes"]]
    return root, records


def _one_process(tmp_path, method, monkeypatch):
    """The 1-process run with the global batch, with the same per-image sampling."""
    monkeypatch.setattr(det_utils.BalancedPositiveNegativeSampler, "__call__", _take_first)
    rec = Recorder(tmp_path / f"{method}.single.pt")
    run_cell(load_config("demo", EXACT, method=method), tmp_path, track=False, progress=False,
             extra_hooks=[rec])
    return torch.load(rec.path, weights_only=True)


def _max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("method", ["supervised", "ubteacher"])
def test_two_processes_train_as_one_with_the_global_batch(ddp, tmp_path, monkeypatch, method):
    root, records = ddp
    ranks = [torch.load(root / f"{method}.rank{r}.pt", weights_only=True) for r in range(2)]
    single = _one_process(tmp_path, method, monkeypatch)
    # every rank logs the global batch's mean losses and holds identical weights (teacher: EMA of them)
    assert ranks[0]["steps"] == ranks[1]["steps"]
    for name in ranks[0]["models"]:
        for k, v in ranks[0]["models"][name].items():
            assert torch.equal(v, ranks[1]["models"][name][k]), (name, k)
    # the same losses as 1 process x the global batch, step by step, within float tolerance
    assert len(ranks[0]["steps"]) == len(single["steps"]) == 6
    for it, (two, one) in enumerate(zip(ranks[0]["steps"], single["steps"])):
        assert two.keys() == one.keys()
        for k in one:
            assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), (it, k)
    for name in single["models"]:
        assert _max_abs_diff(ranks[0]["models"][name], single["models"][name]) < 1e-5, name
    assert records[0][method]["result"]["world_size"] == 2


def test_the_split_is_made_once_by_rank_0(ddp):
    _, (r0, r1) = ddp
    assert sum(w[0] == "manifest" for w in r0["writes"]) == 3  # homes a, b and c: once each
    assert sum(w[0] == "synthetic data" for w in r0["writes"]) == 6  # train and val, in each home
    assert not [w for w in r1["writes"] if w[0] in ("manifest", "synthetic data")]
    assert r0["split_sha256"] == r1["split_sha256"]


def test_only_rank_0_writes_results_metrics_checkpoints_and_mlflow(ddp):
    import mlflow

    root, (r0, r1) = ddp
    assert r1["writes"] == []
    assert ("json", "result.json") in r0["writes"] and ("torch.save", "model_final.pth") in r0["writes"]
    assert ("mlflow", "start") in r0["writes"]
    result = r0["supervised"]["result"]
    assert json.dumps(r1["supervised"]["result"], sort_keys=True) == json.dumps(result, sort_keys=True)  # rank 0's file
    rdir = root / "a" / "runs" / result["key"][:2] / result["key"]
    rows = [json.loads(line) for line in (rdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "total_loss" in r] == [2, 4, 6]  # log_period 2, written once
    mlflow.set_tracking_uri(f"sqlite:///{root / 'a' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lsm-bench"])
    assert len(runs) == 1 and runs.iloc[0]["tags.world_size"] == "2"
    history = mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "total_loss")
    assert sorted(m.step for m in history) == [2, 4, 6]
    assert not r0["supervised"]["group_left"]  # run_cell tears down the group it created


def test_a_killed_ddp_run_resumes_to_the_uninterrupted_result(ddp):
    root, (r0, r1) = ddp
    assert r0["ubt_killed"] == r1["ubt_killed"] == {"error": "StopTraining: "}
    full, resumed = r0["ubt_full"]["result"], r0["ubt_resumed"]["result"]
    assert full["key"] == resumed["key"]
    final = [torch.load(root / h / "runs" / full["key"][:2] / full["key"] / "model_final.pth", weights_only=True)
             for h in ("b", "c")]
    for name in final[0]:
        for k in final[0][name]:
            assert torch.equal(final[0][name][k], final[1][name][k]), (name, k)
    assert json.dumps(resumed["metrics"], sort_keys=True) == json.dumps(full["metrics"], sort_keys=True)
    # the resumed steps (5, 6) log what the uninterrupted run logged there, on both ranks
    steps = {n: [torch.load(root / f"{n}.rank{r}.pt", weights_only=True)["steps"] for r in range(2)]
             for n in ("ubt_full", "ubt_resumed")}
    for r in range(2):
        assert steps["ubt_resumed"][r] == steps["ubt_full"][r][4:]
    # the tiny trunk's train-mode BatchNorm statistics are averaged: the ranks' models stay identical
    ranks = [torch.load(root / f"ubt_full.rank{r}.pt", weights_only=True)["models"] for r in range(2)]
    for name in ranks[0]:
        for k in ranks[0][name]:
            assert torch.equal(ranks[0][name][k], ranks[1][name][k]), (name, k)


def test_a_global_batch_not_divisible_by_the_processes_is_one_line_error(ddp):
    _, (r0, r1) = ddp
    expected = ("BenchError: solver.ims_per_batch_labeled=3 is the global batch and must be divisible by the 2 "
                "processes of the cell; set it to a multiple of 2 or change --gpus-per-cell")
    assert r0["odd_batch"] == r1["odd_batch"] == {"error": expected}


def test_ranks_read_disjoint_slices_whose_union_is_the_global_batch():
    from core.data.loader import IterationBatchSampler

    one = list(IterationBatchSampler(10, 4, 3, 2, 7))  # crosses an epoch boundary (10 images)
    parts = [list(IterationBatchSampler(10, 4, 3, 2, 7, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*parts)] == one
    assert all(len(a) == 2 and not set(a) & set(b) for a, b in zip(*parts))
    with pytest.raises(BenchError, match="not divisible by 2 processes"):
        IterationBatchSampler(10, 3, 0, 0, 1, rank=0, world_size=2)


def test_gpu_slots_are_groups_of_gpus_per_cell_with_torchrun_variables(monkeypatch):
    from bench.executors.local import LocalExecutor

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # slots index into the user's own list
    ex = LocalExecutor(["cuda:0", "cuda:1", "cuda:2", "cuda:3"], gpus_per_cell=2, track=False, prestart=False)
    assert ex.slots == 2
    envs, _ = ex._ddp_env(1, 29512)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["6,7", "6,7"]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs] == [
        ("0", "0", "2", "127.0.0.1", "29512"), ("1", "1", "2", "127.0.0.1", "29512")]
    with pytest.raises(BenchError, match="groups of 2, got 3"):
        LocalExecutor(["cuda:0", "cuda:1", "cuda:2"], gpus_per_cell=2, prestart=False)


class _FakeProcess:
    def __init__(self, exitcode=None):
        self.exitcode = exitcode
        self.terminated = False

    def terminate(self):
        self.terminated, self.exitcode = True, -15


def test_a_ddp_job_ends_with_its_first_failing_rank_and_stops_the_others(tmp_path):
    from bench.executors.local import Job

    ranks = [_FakeProcess(), _FakeProcess(3), _FakeProcess()]
    job = Job("cell", 0, ranks[0], tmp_path / "worker.log", processes=ranks)
    assert job.exitcode() == 3 and ranks[0].terminated and ranks[2].terminated
    assert job.log.name == "worker.rank1.log"  # the runner's failure tail comes from the rank that failed
    ranks = [_FakeProcess(0), _FakeProcess()]
    job = Job("cell", 0, ranks[0], tmp_path / "worker.log", processes=ranks)
    assert job.exitcode() is None  # done when all ranks are
    ranks[1].exitcode = 0
    assert job.exitcode() == 0 and job.log.name == "worker.log"


def test_local_executor_runs_a_cell_as_two_processes(tmp_path, tiny):
    from core.data.sources import prepare_data
    from bench.executors.local import LocalExecutor
    from bench.keys import cell_key
    from bench.plan import Cell
    from bench.runner import run_cells

    cfg = load_config("demo", tiny + ["solver.max_iter=2"])
    cell = Cell("supervised", "coco_standard_25", 1, cfg, cell_key(cfg, prepare_data(cfg.data, tmp_path)))
    outcome = run_cells([cell], LocalExecutor(["cpu"], gpus_per_cell=2, track=False), tmp_path)
    assert [c.key for c in outcome["done"]] == [cell.key] and not outcome["failed"]
    rdir = cell.directory(tmp_path)
    assert json.loads((rdir / "result.json").read_text())["world_size"] == 2
    assert (rdir / "worker.log").exists() and (rdir / "worker.rank1.log").exists()
