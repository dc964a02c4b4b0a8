"""LSM's training cost per method: one training step with and without LSM, same batch, same weights.

    python benchmarks/lsm_overhead.py [--methods ubteacher,softteacher,pseco,stac,ddetr] [--preset demo]
                                      [--device cpu|cuda] [--iters 12] [--clock wall|cpu] [overrides ...]

Each method starts where its semi-supervised training starts: mean-teacher methods from their
trained burn-in cell (student and teacher), STAC and Deformable DETR (strategy stac) from the
trained supervised teacher's pseudo-labels; those cells are trained once into --home and reused.

Time: both variants are built in one process and their steps alternate (without, with, without,
...), so a slow spell of a shared or virtual machine hits both alike; the ratio is the median of
the per-pair ratios (target <= 1.3). Memory: each variant alone in its own process; on CUDA the
peak allocated memory of the step, on CPU the increase of peak RSS during the steps (over the RSS
after building the model and the batch). With `--variant` one variant (or `paired`) runs in this
process and prints JSON (`--profile`: the top ops of 3 more steps of one variant).
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

from _common import build, summary, time_it
from _common import make_step as common_step

import torch


METHODS = ("ubteacher", "softteacher", "pseco", "stac", "ddetr")


def make_step(args, lsm: bool):
    """One training step of the method (with or without LSM) from the start of its semi-supervised
    phase, on a fixed batch: the callable that is timed."""
    cfg, adapter, batch, start = build(args.method, args.preset, lsm, args.device, Path(args.home), args.overrides)
    return common_step(cfg, adapter, batch, start, torch.device(args.device))


def run_paired(args) -> dict:
    """Both variants in one process, their steps alternating: a slow spell of the machine (other
    jobs, a virtual machine's stolen time) then hits both alike, and each pair gives a ratio."""
    device = torch.device(args.device)
    steps = {"without": make_step(args, False), "lsm": make_step(args, True)}
    for step in steps.values():
        time_it(step, device, warmup=2, repeats=0)
    times = {"without": [], "lsm": []}
    for _ in range(args.iters):
        for variant, step in steps.items():
            times[variant] += time_it(step, device, warmup=0, repeats=1, clock=args.clock)
    return {"times": times}


def run_variant(args, lsm: bool) -> dict:
    """One variant alone in this process: its peak memory (and step times)."""
    device = torch.device(args.device)
    step = make_step(args, lsm)
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
            print(f"--- {args.method}{'+LSM' if lsm else ''}, sorted by {key}", file=sys.stderr)
            print(prof.key_averages().table(sort_by=key, row_limit=20), file=sys.stderr)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"times": times, "peak_bytes": peak}


def _subprocess(args, method: str, variant: str, iters: int) -> dict | str:
    """The JSON a `--variant` process prints, or its error output."""
    out = subprocess.run([sys.executable, __file__, "--variant", variant, "--method", method,
                          "--preset", args.preset, "--device", args.device, "--iters", str(iters),
                          "--clock", args.clock, "--home", args.home, *args.overrides], capture_output=True, text=True)
    if out.returncode != 0:
        return out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: each step's process CPU time (CPU device only; robust on a busy machine)")
    ap.add_argument("--home", default=None, help="BENCH_HOME for the data and the start cells (default: a temp dir)")
    ap.add_argument("--variant", choices=["without", "lsm", "paired"],
                    help="run one variant (or both, alternating: paired) in this process and print JSON")
    ap.add_argument("--method", default="ubteacher", help="with --variant: the method")
    ap.add_argument("--profile", action="store_true", help="with --variant: print the top ops of 3 profiled steps")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        ap.error("--clock cpu measures CPU steps; use --device cpu or the default wall clock")
    args.home = args.home or tempfile.mkdtemp(prefix="bench-lsm-")
    if args.variant:
        print(json.dumps(run_paired(args) if args.variant == "paired" else run_variant(args, args.variant == "lsm")))
        return
    print(f"preset {args.preset}, device {args.device}, {args.iters} step pairs per method, {args.clock} clock")
    rows, failed = [], []
    for method in args.methods.split(","):
        # time: both variants alternating in one process; memory: each variant alone (peaks do not mix)
        runs = {v: _subprocess(args, method, v, iters) for v, iters in
                (("paired", args.iters), ("without", 3), ("lsm", 3))}
        if errors := {v: r for v, r in runs.items() if isinstance(r, str)}:
            for v, err in errors.items():
                print(f"{method} {v} failed:\n{err}", flush=True)
            failed.append(method)
            continue
        times = runs["paired"]["times"]
        pair_ratio = statistics.median(b / a for a, b in zip(times["without"], times["lsm"]))
        m = {v: runs[v]["peak_bytes"] for v in ("without", "lsm")}
        print(f"{method:12s} without LSM: {summary(times['without'])}, peak +{m['without'] / 2**20:.0f} MiB", flush=True)
        print(f"{method:12s} with LSM:    {summary(times['lsm'])}, peak +{m['lsm'] / 2**20:.0f} MiB", flush=True)
        rows.append((method, pair_ratio, m["lsm"] / max(m["without"], 1)))
    print("\nmethod        time LSM / without, median over pairs (target <= 1.3)   peak memory LSM / without")
    for method, tr, mr in rows:
        print(f"{method:12s}  {tr:.3f}{'' if tr <= 1.3 else '  (over target)':16s}                                   {mr:.3f}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
