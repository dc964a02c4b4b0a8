"""LSM's training cost per method: one training step with and without LSM, same batch, same weights.

    python benchmarks/lsm_overhead.py [--methods ubteacher,softteacher,pseco,stac,ddetr] [--preset demo]
                                      [--device cpu|cuda] [--iters 12] [--clock wall|cpu] [overrides ...]

Each method starts where its semi-supervised training starts: mean-teacher methods from their
trained burn-in cell (student and teacher), STAC and Deformable DETR (strategy stac) from the
trained supervised teacher's pseudo-labels; those cells are trained once into --home and reused. Prints the step time of each
variant, the ratio LSM / without (target <= 1.3) and the peak-memory ratio. Memory: on CUDA the
peak allocated memory of the step; on CPU each variant runs in its own process and the increase of
peak RSS during the steps (over the RSS after building the model and the batch) is compared.
With `--variant` one variant runs in this process (`--profile`: the top ops of 3 more steps).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import summary, time_it

import torch

from adapters.base import get_adapter
from bench.config import load_config
from bench.data.sources import prepare_data
from bench.worker import batch_stream, seed_everything


METHODS = ("ubteacher", "softteacher", "pseco", "stac", "ddetr")
# The table rows' own settings (bench/specs/table1.yaml), so each method runs as on Table 1.
ROW_OVERRIDES = {"softteacher": ["semi.t=0.9", "model.cls_loss=ce"], "pseco": ["semi.t=0.5", "semi.lambda_u=2.0"],
                 "ddetr": ["ddetr.strategy=stac"]}


def build(method: str, preset: str, lsm: bool, device: str, home: Path, overrides: list[str]):
    """(config, adapter at the start of its semi-supervised phase, one batch of that iteration)."""
    from bench import burn_in
    from bench.burn_in import burn_in_config
    from bench.keys import cell_key
    from bench.paths import run_dir
    from bench.teacher import attach_pseudo_labels, teacher_config
    from bench.worker import run_cell

    extra = ["lsm.alpha=0.3"] if method == "pseco" else []
    cfg = load_config(preset, overrides + ROW_OVERRIDES.get(method, []) + extra +
                      [f"device={device}", f"lsm.enabled={str(lsm).lower()}"], method=method)
    data = prepare_data(cfg.data, home)
    dev = torch.device(device)
    seed_everything(cfg.seed)
    adapter = get_adapter(method)(cfg, data.num_classes, dev)
    start = 0
    if (bcfg := burn_in_config(cfg)) is not None:
        run_cell(bcfg, home, track=False, progress=False)
        state = torch.load(run_dir(home, cell_key(bcfg, data)) / burn_in.CHECKPOINT, map_location="cpu",
                           weights_only=False)
        adapter.student.load_state_dict(state["model"], strict=False)  # F_aux is not in a burn-in
        adapter.teacher.load_state_dict(adapter.student.state_dict())
        if (copy_hook := adapter.on_teacher_copy()) is not None:
            copy_hook()
        start = cfg.semi.burn_in
    elif teacher_config(cfg) is not None:
        attach_pseudo_labels(adapter, cfg, home, data, dev, track=False, progress=False)
    batch = next(batch_stream(cfg, adapter, data, start))
    return cfg, adapter, batch, start


def run_variant(args, lsm: bool) -> dict:
    device = torch.device(args.device)
    cfg, adapter, batch, start = build(args.method, args.preset, lsm, args.device, Path(args.home), args.overrides)
    opt = torch.optim.SGD(adapter.student.parameters(), lr=1e-5)
    amp = cfg.solver.amp and device.type == "cuda"  # as the Trainer: fp16 autocast + loss scaling
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step():
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out = adapter.training_step(start, batch)
        opt.zero_grad()
        scaler.scale(sum(out.losses.values())).backward()
        scaler.step(opt)
        scaler.update()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = time_it(step, device, warmup=2, repeats=args.iters, clock=args.clock)
    if args.profile:  # where the time goes: the top ops of 3 more steps, to stderr
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(3):
                step()
        for key in ["self_cpu_time_total"] + (["self_cuda_time_total"] if device.type == "cuda" else []):
            print(f"--- {'UBT+LSM' if lsm else 'UBT'}, sorted by {key}", file=sys.stderr)
            print(prof.key_averages().table(sort_by=key, row_limit=20), file=sys.stderr)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"times": times, "peak_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: each step's process CPU time (CPU device only; robust on a busy machine)")
    ap.add_argument("--home", default=None, help="BENCH_HOME for the data and the start cells (default: a temp dir)")
    ap.add_argument("--variant", choices=["without", "lsm"], help="run one variant in this process and print JSON")
    ap.add_argument("--method", default="ubteacher", help="with --variant: the method")
    ap.add_argument("--profile", action="store_true", help="with --variant: print the top ops of 3 profiled steps")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        ap.error("--clock cpu measures CPU steps; use --device cpu or the default wall clock")
    args.home = args.home or tempfile.mkdtemp(prefix="bench-lsm-")
    if args.variant:
        print(json.dumps(run_variant(args, args.variant == "lsm")))
        return
    print(f"preset {args.preset}, device {args.device}, {args.iters} steps per variant and process, "
          f"{args.clock} clock")
    rows, failed = [], []
    for method in args.methods.split(","):
        results = {}
        for variant in ("without", "lsm", "without", "lsm"):  # twice each, alternating, in fresh processes
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--method", method,
                                  "--preset", args.preset, "--device", args.device, "--iters", str(args.iters),
                                  "--clock", args.clock,
                                  "--home", args.home, *args.overrides], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{method} {variant} failed:\n{out.stderr[-3000:]}", flush=True)
                failed.append(method)
                break
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.setdefault(variant, {"times": [], "peak": []})
            results[variant]["times"] += r["times"]
            results[variant]["peak"].append(r["peak_bytes"])
        if method in failed:
            continue
        t = {v: statistics.median(r["times"]) for v, r in results.items()}
        m = {v: max(r["peak"]) for v, r in results.items()}
        print(f"{method:12s} without LSM: {summary(results['without']['times'])}, peak +{m['without'] / 2**20:.0f} MiB",
              flush=True)
        print(f"{method:12s} with LSM:    {summary(results['lsm']['times'])}, peak +{m['lsm'] / 2**20:.0f} MiB",
              flush=True)
        rows.append((method, t["lsm"] / t["without"], m["lsm"] / max(m["without"], 1)))
    print("\nmethod        time LSM / without (target <= 1.3)   peak memory LSM / without")
    for method, tr, mr in rows:
        print(f"{method:12s}  {tr:.3f}{'' if tr <= 1.3 else '  (over target)':16s}                  {mr:.3f}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
