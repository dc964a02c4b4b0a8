"""Does LSM help on the demo? UBT vs UBT+LSM (PIM+SD) vs UBT+PIM only, paired over seeds.

    python benchmarks/lsm_demo.py [--seeds 1 2 3] [--ratio 10] [--preset demo] [--home DIR]

Trains (or reads from the cache) one cell per (variant, seed) through the same worker as
`bench train`, then prints the teacher's AP per seed, the paired deltas against UBT and their
mean. Until the runner (`bench run table1`) exists, this is how the demo comparison is measured.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)

from core.config import load_config
from core.paths import bench_home
from bench.runner import run_with_start

VARIANTS = {
    "UBT": [],
    "UBT+LSM": ["lsm.enabled=true"],
    "UBT+PIM": ["lsm.enabled=true", "lsm.sd=false"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--ratio", type=float, default=10.0)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    home = args.home or bench_home()
    ap_of: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    for seed in args.seeds:
        for name, extra in VARIANTS.items():
            cfg = load_config(args.preset, args.overrides + extra + [f"data.ratio={args.ratio}"],
                              method="ubteacher", seed=seed)
            result = run_with_start(cfg, home)
            ap_of[name][seed] = result["metrics"]["teacher"]
            print(f"{name:8s} seed {seed}: teacher AP {result['metrics']['teacher']['AP']:.2f}  "
                  f"student AP {result['metrics']['student']['AP']:.2f}  (cell {result['key'][:12]})", flush=True)
    print(f"\n{args.preset} preset, ratio {args.ratio:g}%, teacher AP (APs / APm / APl)")
    for name in VARIANTS:
        cells = "  ".join(f"s{s}: {m['AP']:.2f} ({m['APs']:.1f}/{m['APm']:.1f}/{m['APl']:.1f})"
                          for s, m in ap_of[name].items())
        mean = statistics.mean(m["AP"] for m in ap_of[name].values())
        print(f"{name:8s} mean {mean:.2f}   {cells}")
    for name in ("UBT+LSM", "UBT+PIM"):
        deltas = [ap_of[name][s]["AP"] - ap_of["UBT"][s]["AP"] for s in args.seeds]
        print(f"{name} - UBT per seed: {', '.join(f'{d:+.2f}' for d in deltas)}  mean {statistics.mean(deltas):+.2f}")
    deltas = [ap_of["UBT+LSM"][s]["AP"] - ap_of["UBT+PIM"][s]["AP"] for s in args.seeds]
    print(f"PIM+SD - PIM only per seed: {', '.join(f'{d:+.2f}' for d in deltas)}  mean {statistics.mean(deltas):+.2f}")


if __name__ == "__main__":
    main()
