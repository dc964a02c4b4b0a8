"""One cell = one training run, start to finish, resumable.

`run_cell` prepares the data, builds the adapter, resumes from the newest checkpoint of the cell's
directory if there is one, trains, evaluates the models the adapter names, and writes
`result.json` last and atomically: a cell with a result.json is done and never recomputed.
The cell it starts from (its burn-in, STAC's teacher) is its caller's business: the caller finds it
(`bench.plan.start_cell`), trains it first and hands over its directory as `start_from`.

With WORLD_SIZE > 1 in the environment (torchrun, `bench run --gpus-per-cell N`, a Slurm task)
the cell is one DDP job of N processes: rank 0 makes the split, writes every file, logs to MLflow
and evaluates; batch sizes are global; gradients are averaged (docs/runner.md, "Multi-GPU cells").
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from adapters.base import get_adapter
from adapters.engine import distributed
from adapters.engine.checkpoint import Checkpointer, fsync_directory, rank_rng_state, set_rng_state
from adapters.engine.hooks import EvalHook, MetricsWriter, PeriodicCheckpointer, ProgressHook
from adapters.engine.inference import run_inference
from adapters.engine.solver import build_optimizer, build_scheduler
from adapters.engine.trainer import StopTraining, Trainer
from bench import burn_in, tracking
from bench.tracking import cell_label, run_name, run_tags
from core.config import RunConfig, dump_config
from core.data.loader import make_loader
from core.data.sources import SemiData, prepare_data
from core.data.transforms import view_settings
from core.evaluate import evaluate_coco, evaluate_voc, teacher_diagnostics
from core.errors import BenchError
from bench.keys import cell_key
from core.methods import upstream
from core.paths import done_result, read_result, result_ok, run_dir
from core.streams import UNLABELED_LOADER
from bench.teacher import attach_pseudo_labels


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"device '{name}' requested but CUDA is not available; use device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")  # two ranks may fail at once
    with open(tmp, "w") as f:  # on disk before the rename (a power cut must not leave an empty result.json)
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=float))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)



def batch_stream(cfg: RunConfig, adapter, data: SemiData, start_iter: int):
    """{"labeled": items, "unlabeled": items} per iteration; a pure function of (seed, iteration).

    Unlabeled items are None before `adapter.unlabeled_start()` (burn-in reads no unlabeled images).
    Under DDP each rank gets its slice of the global batch (core/data/loader.py)."""
    s = cfg.solver
    strong = "strong" in adapter.labeled_views + adapter.unlabeled_views
    aug = view_settings(cfg.data.aug, strong)
    part = {"rank": distributed.rank(), "world_size": distributed.world_size()}
    labeled = make_loader(data.labeled, aug, adapter.labeled_views, s.ims_per_batch_labeled,
                          seed=cfg.seed, start_iter=start_iter, max_iter=s.max_iter, num_workers=cfg.data.num_workers,
                          **part)
    if not adapter.unlabeled_views:
        for items in labeled:
            yield {"labeled": items}
        return
    if not data.unlabeled.records:
        raise BenchError(f"method {cfg.method} needs unlabeled images but the split has none; lower data.ratio below 100")
    u_start = max(start_iter, adapter.unlabeled_start())
    unlabeled = iter(make_loader(data.unlabeled, aug, adapter.unlabeled_views, s.ims_per_batch_unlabeled,
                                 seed=cfg.seed + UNLABELED_LOADER, start_iter=u_start, max_iter=s.max_iter,
                                 num_workers=cfg.data.num_workers, **part))
    for it, items_l in enumerate(labeled, start_iter):
        yield {"labeled": items_l, "unlabeled": next(unlabeled) if it >= u_start else None}


# A burn-in is shared by cells of different thresholds (Soft Teacher's t 0.9, PseCo's 0.5, LSM's
# alpha): its teacher is diagnosed at each of them.
BURN_IN_THRESHOLDS = {f"{v:g}": v for v in (0.3, 0.5, 0.7, 0.9)}


def evaluate_models(adapter, data: SemiData, cfg: RunConfig, device, models: dict | None = None,
                    thresholds: dict[str, float] | None = None) -> dict[str, dict]:
    """COCO metrics of `models` (default: every model the adapter names, teacher first for
    mean-teacher methods), each with its teacher diagnostics at semi.t and lsm.alpha (core/evaluate.py): how good a teacher it
    is or would be, for every method, supervised included (its config carries the preset's t and alpha)."""
    out = {}
    test_aug = view_settings(cfg.data.aug, False)
    thresholds = thresholds or {"t": cfg.semi.t, "alpha": cfg.lsm.alpha}
    for name, model in (models or adapter.eval_models()).items():
        dets = run_inference(model, data.val, test_aug, device, batch_size=cfg.solver.ims_per_batch_labeled)
        if cfg.data.dataset == "voc":  # VOC07 test: 11-point AP50 and AP50:95 (detectron2's evaluator)
            out[name] = evaluate_voc(data.val, dets, use_07_metric=True)
        else:
            out[name] = evaluate_coco(data.val, dets, backend=cfg.eval.backend, area_scale=cfg.eval.area_scale)
        out[name].update(teacher_diagnostics(data.val, dets, thresholds, cfg.eval.area_scale))
    return out


def _scalar_metrics(results: dict[str, dict], prefix: str = "eval") -> dict[str, float]:
    flat = {}
    for model_name, stats in results.items():
        for k, v in stats.items():
            if isinstance(v, (int, float)):
                flat[f"{prefix}.{model_name}.{k}"] = float(v)
            elif isinstance(v, dict):  # per-class AP
                flat.update({f"{prefix}.{model_name}.{k}.{c}": float(x) for c, x in v.items()
                             if isinstance(x, (int, float)) and x == x})
    return flat


def run_cell(cfg: RunConfig, home: Path, *, start_from: Path | None = None, track: bool = True,
             progress: bool = True, parent_run_id: str | None = None, extra_hooks: list | None = None) -> dict:
    """Train + evaluate one configuration (or return its cached result). Returns result.json's dict.

    `start_from`: the directory of the cell `cfg` starts from (`bench.plan.start_cell`), trained by
    the caller. A burn-in's checkpoint is loaded if it has one (else the cell trains alone from
    iteration 0, to the same result); STAC's teacher must be done. No other cell is trained here.

    With WORLD_SIZE > 1 in the environment this process is one rank of the cell's DDP job (every
    rank calls run_cell, with the same `start_from`, and returns the same result); a group that
    already exists is used as is."""
    home, start_from = Path(home), None if start_from is None else Path(start_from)
    if start_from is not None and upstream(cfg) == "none":  # a caller's bug, not user input
        raise ValueError(f"a {cfg.method} cell (stage {cfg.stage}) starts from no cell; got start_from={start_from}")
    created = distributed.env_world_size() > 1 and not distributed.is_distributed()
    if created:
        distributed.init_process_group(resolve_device(cfg.device))
    # On an exception the group is left to the process's exit: other ranks may still be in a
    # collective, and the launcher stops them.
    result = _run_cell(cfg, home, start_from, track, progress, parent_run_id, extra_hooks)
    if created:
        distributed.teardown()
    return result


def _run_cell(cfg: RunConfig, home: Path, start_from: Path | None, track: bool, progress: bool,
              parent_run_id: str | None, extra_hooks: list | None) -> dict:
    if distributed.is_distributed():  # batch sizes are global: each rank reads global / N images
        distributed.per_rank_batch(cfg.solver.ims_per_batch_labeled, "solver.ims_per_batch_labeled")
        if get_adapter(cfg.method).unlabeled_views:
            distributed.per_rank_batch(cfg.solver.ims_per_batch_unlabeled, "solver.ims_per_batch_unlabeled")
    # The split is made once, by rank 0; the other ranks read its manifest (splits made per
    # process would train each GPU on a different labeled subset).
    data = distributed.main_first(lambda: prepare_data(cfg.data, home))
    distributed.check_same(data.manifest.sha256, "the split manifest's sha256")
    key = cell_key(cfg, data)
    rdir = run_dir(home, key)
    result_path = rdir / "result.json"
    # an unreadable result is not done: the cell is trained again
    if distributed.broadcast_object((cached := done_result(result_path)) is not None):
        return cached if cached is not None else read_result(result_path)
    rdir.mkdir(parents=True, exist_ok=True)
    # One process per cell: a second one (e.g. a rerun while an orphaned worker of a killed
    # orchestrator still trains) waits here, then finds the result. The OS drops the lock when
    # its holder dies, however it dies. Under DDP rank 0 holds it for the job.
    lock = (rdir / "lock").open("w") if distributed.is_main() else None
    if lock is not None:
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        if distributed.broadcast_object((cached := done_result(result_path)) is not None):
            return cached if cached is not None else read_result(result_path)
        return _train_cell(cfg, home, data, key, rdir, start_from, track, progress, parent_run_id, extra_hooks)
    finally:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()


def _train_cell(cfg: RunConfig, home: Path, data: SemiData, key: str, rdir: Path, start_from: Path | None,
                track: bool, progress: bool, parent_run_id: str | None, extra_hooks: list | None) -> dict:
    result_path = rdir / "result.json"
    main = distributed.is_main()  # under DDP only rank 0 writes files, logs and evaluates
    if main:
        (rdir / "config.yaml").write_text(dump_config(cfg))
        (rdir / "failed.json").unlink(missing_ok=True)

    seed_everything(cfg.seed)  # every rank: identical initial weights
    device = distributed.rank_device(resolve_device(cfg.device))
    adapter = get_adapter(cfg.method)(cfg, data.num_classes, device)
    optimizer = build_optimizer(adapter.param_groups(), cfg.solver)
    scheduler = build_scheduler(optimizer, cfg.solver)
    end_iter = cfg.semi.burn_in if cfg.stage == "burn_in" else cfg.solver.max_iter
    trainer = Trainer(adapter, optimizer, scheduler, None, 0, end_iter, device, amp=cfg.solver.amp,
                      clip_grad_norm=cfg.solver.clip_grad_norm, distributed=distributed.is_distributed())

    checkpointer = Checkpointer(rdir / "checkpoints")
    burn_in_from = None
    own_rng = False
    if (latest := distributed.broadcast_object(checkpointer.latest())) is not None:  # resume this cell
        state = checkpointer.load(latest)
        trainer.load_state_dict(state)
        if (rng := rank_rng_state(state)) is not None:
            set_rng_state(rng)
            own_rng = True
        trainer.start_iter = state["iteration"] + 1
    elif start_from is not None and upstream(cfg) == "burn_in":  # or start from its shared burn-in, if trained
        # an imported burn-in (bench/archive.py) has its result but no weights: train alone then
        if distributed.broadcast_object(result_ok(start_from / "result.json")
                                        and (start_from / burn_in.CHECKPOINT).exists()):
            trainer.start_iter = burn_in.load(start_from / burn_in.CHECKPOINT, trainer)
            burn_in_from = start_from.name
    if distributed.is_distributed():
        # what DDP does at construction: every rank starts from rank 0's weights
        distributed.broadcast_tensors([m.state_dict() for m in (adapter.student, getattr(adapter, "teacher", None))
                                       if isinstance(m, torch.nn.Module)])
        if distributed.rank() > 0 and not own_rng:  # its own RoI/anchor sampling stream
            seed_everything(distributed.rank_seed(cfg.seed))
    if upstream(cfg) == "supervised_teacher":  # STAC: pseudo-labels from its done supervised teacher cell
        if start_from is None:
            raise BenchError(f"a {cfg.method} cell needs its teacher cell's directory; train it with `bench train` "
                             "or `bench run`, which train the teacher first")
        # rank 0 writes the pseudo-label file, the others read it
        distributed.main_first(lambda: attach_pseudo_labels(adapter, start_from, data, device))
    trainer.iter = trainer.start_iter
    trainer.data = batch_stream(cfg, adapter, data, trainer.start_iter)

    tracker = tracking.Tracker(home, enabled=track and main)
    run_id_file = rdir / "mlflow_run_id"
    prior_run = run_id_file.read_text().strip() if (track and main and run_id_file.exists()) else None
    tags = run_tags(cfg, key, data.manifest.sha256)
    if distributed.is_distributed():
        tags["world_size"] = str(distributed.world_size())
    run_id = tracker.start(run_name(cfg), tags, tracking.flatten(cfg.model_dump(mode="json")),  # bench run renames it
                           parent_run_id=parent_run_id, run_id=prior_run)
    if run_id:
        run_id_file.write_text(run_id)

    def periodic_eval(iteration: int) -> dict:
        results = evaluate_models(adapter, data, cfg, device) if main else {}
        distributed.barrier()  # the other ranks wait while rank 0 evaluates
        return results

    def log_eval(iteration: int, results: dict) -> None:
        if not main:
            return
        flat = _scalar_metrics(results)
        with (rdir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"iteration": iteration, **flat}) + "\n")
        tracker.log_metrics(flat, step=iteration)

    trainer.register_hooks([
        *adapter.hooks(),
        PeriodicCheckpointer(checkpointer, cfg.solver.checkpoint_period),
        EvalHook(cfg.solver.eval_period, periodic_eval, log_eval),
        *([MetricsWriter(rdir / "metrics.jsonl", tracker, cfg.solver.log_period),
           ProgressHook(f"{cell_label(cfg)} r={cfg.data.ratio:g}% seed={cfg.seed}",
                        enabled=progress)] if main else []),
        *(extra_hooks or []),
    ])
    t0 = time.perf_counter()
    try:
        trainer.train()
        # a burn-in cell evaluates the model it hands over as every dependent cell's first teacher
        burn = cfg.stage == "burn_in"
        handed_over = adapter.burn_in_teacher() if burn else None
        results = evaluate_models(adapter, data, cfg, device, dict([handed_over]) if burn else None,
                                  BURN_IN_THRESHOLDS if burn else None) if main else {}
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, StopTraining)) else "FAILED"
        if not isinstance(exc, (KeyboardInterrupt, StopTraining)):
            import traceback

            atomic_write_json(rdir / "failed.json", {"error": f"{type(exc).__name__}: {exc}",
                                                      "traceback": traceback.format_exc(), "iteration": trainer.iter,
                                                      **({"rank": distributed.rank()} if distributed.is_distributed()
                                                         else {})})
        tracker.end(status)
        raise
    result = {
        "key": key, "method": cfg.method, "stage": cfg.stage, "lsm": cfg.lsm.enabled, "preset": cfg.preset,
        "ratio": cfg.data.ratio, "fold": cfg.data.fold, "seed": cfg.seed, "iterations": end_iter,
        "train_seconds_this_session": time.perf_counter() - t0, "burn_in_from": burn_in_from,
        "mlflow_run_id": run_id,
    }
    if distributed.is_distributed():
        result["world_size"] = distributed.world_size()
    if not main:
        distributed.barrier()  # rank 0 evaluates and writes; then every rank returns its result.json
        return json.loads(result_path.read_text())
    if cfg.stage == "burn_in":
        burn_in.save(rdir / burn_in.CHECKPOINT, trainer, end_iter - 1)
        log_eval(end_iter, results)
        # not "metrics": a burn-in is no row of a table; this is the teacher its cells start from
        result["burn_in_teacher"] = {k: v for k, v in results.get(handed_over[0], {}).items() if k != "summary"}
    else:
        log_eval(end_iter, results)
        torch.save({name: m.state_dict() for name, m in adapter.eval_models().items()}, rdir / "model_final.pth")
        primary = next(iter(results))
        result.update({"primary_model": primary, "summary": results[primary].get("summary", ""),
                       "metrics": {n: {k: v for k, v in r.items() if k != "summary"} for n, r in results.items()}})
    atomic_write_json(result_path, result)
    shutil.rmtree(rdir / "checkpoints", ignore_errors=True)  # the cell is done: its outputs are above
    tracker.log_artifact(rdir / "config.yaml")
    tracker.log_artifact(result_path)
    tracker.end("FINISHED")
    distributed.barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.worker CONFIG.yaml --home DIR [--start-from DIR] [--parent-run-id ID]`: one
    cell, no progress bar; `--start-from` is the directory of the cell it starts from (the plan's
    `depends_on`), the same for every rank of a DDP job.

    The runner starts one such process per cell, so a crash, a NaN or an out-of-memory kill stays
    in that cell (its failed.json) and the orchestrator goes on.
    """
    import argparse

    import yaml

    ap = argparse.ArgumentParser(prog="bench.worker")
    ap.add_argument("config", type=Path)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--start-from", type=Path, default=None)
    ap.add_argument("--parent-run-id", default=None)
    ap.add_argument("--no-track", action="store_true")
    args = ap.parse_args(argv)
    cfg = RunConfig.model_validate(yaml.safe_load(args.config.read_text()))
    run_cell(cfg, args.home, start_from=args.start_from, track=not args.no_track, progress=False,
             parent_run_id=args.parent_run_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
