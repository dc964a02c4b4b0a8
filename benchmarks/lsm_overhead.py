"""LSM's training cost: one Unbiased Teacher step with and without LSM (PIM + SD), same batch.

    python benchmarks/lsm_overhead.py [--preset demo|coco] [--device cpu|cuda] [--iters 12]

Prints the step time of each variant, the ratio UBT+LSM / UBT (target <= 1.3: PIM's extra
forward sees a quarter of the pixels) and the peak-memory ratio. Memory: on CUDA the peak
allocated memory of the step; on CPU each variant runs in its own process and the increase of
peak RSS during the steps (over the RSS after building the model and the batch) is compared.
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


def build(preset: str, lsm: bool, device: str, home: Path, overrides: list[str]):
    cfg = load_config(preset, overrides + [f"device={device}", f"lsm.enabled={str(lsm).lower()}",
                                           "solver.max_iter=100000", "semi.burn_in=0"], method="ubteacher")
    data = prepare_data(cfg.data, home)
    seed_everything(cfg.seed)
    adapter = get_adapter("ubteacher")(cfg, data.num_classes, torch.device(device))
    adapter.teacher.load_state_dict(adapter.student.state_dict())
    # a teacher that finds something: lower its score threshold so that pseudo-labels exist
    adapter.teacher.roi_heads.score_thresh = 0.0
    batch = next(batch_stream(cfg, adapter, data, cfg.semi.burn_in))
    return cfg, adapter, batch


def run_variant(args, lsm: bool) -> dict:
    device = torch.device(args.device)
    cfg, adapter, batch = build(args.preset, lsm, args.device, Path(args.home), args.overrides)
    opt = torch.optim.SGD(adapter.student.parameters(), lr=1e-5)
    amp = cfg.solver.amp and device.type == "cuda"  # as the Trainer: fp16 autocast + loss scaling
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step():
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out = adapter.training_step(1, batch)
        opt.zero_grad()
        scaler.scale(sum(out.losses.values())).backward()
        scaler.step(opt)
        scaler.update()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = time_it(step, device, warmup=2, repeats=args.iters)
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
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--home", default=None)
    ap.add_argument("--variant", choices=["ubt", "lsm"], help="run one variant in this process and print JSON")
    ap.add_argument("--profile", action="store_true", help="with --variant: print the top ops of 3 profiled steps")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()
    args.home = args.home or tempfile.mkdtemp(prefix="bench-lsm-")
    if args.variant:
        print(json.dumps(run_variant(args, args.variant == "lsm")))
        return
    results = {}
    for variant in ("ubt", "lsm", "ubt", "lsm"):  # twice each, alternating, in fresh processes
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--preset", args.preset,
                              "--device", args.device, "--iters", str(args.iters), "--home", args.home,
                              *args.overrides], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.setdefault(variant, {"times": [], "peak": []})
        results[variant]["times"] += r["times"]
        results[variant]["peak"].append(r["peak_bytes"])
    t = {v: statistics.median(r["times"]) for v, r in results.items()}
    m = {v: max(r["peak"]) for v, r in results.items()}
    print(f"preset {args.preset}, device {args.device}")
    print(f"UBT step:       {summary(results['ubt']['times'])}, peak +{m['ubt'] / 2**20:.0f} MiB")
    print(f"UBT+LSM step:   {summary(results['lsm']['times'])}, peak +{m['lsm'] / 2**20:.0f} MiB")
    print(f"time ratio LSM / UBT: {t['lsm'] / t['ubt']:.3f}  (target <= 1.3)")
    print(f"peak memory ratio LSM / UBT: {m['lsm'] / max(m['ubt'], 1):.3f}")


if __name__ == "__main__":
    main()
