"""How good a teacher does a burn-in schedule hand over? Trains one burn-in cell and prints its
diagnostics at the method's own threshold: AP, the fraction of validation objects covered above t,
and the precision of the detections above t.

A calibration probe for a preset's schedule (it reads only the baseline's supervised burn-in,
never an LSM run). The cell is cached in BENCH_HOME like any other: a schedule a table already
trained costs nothing.

    python benchmarks/burn_in_teacher.py ubteacher --ratio 5 --seed 1 semi.burn_in=1000 solver.max_iter=1400
    python benchmarks/burn_in_teacher.py softteacher model.cls_loss=ce   # as its Table 1 row trains

Pass the overrides of the method's table row (Soft Teacher's CE loss): they shape its burn-in.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench.burn_in import burn_in_config
from bench.worker import run_cell
from core.config import load_config
from core.errors import BenchError

TABLE1_T = {"ubteacher": 0.7, "softteacher": 0.9, "pseco": 0.5}  # each method's own t in Table 1's rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method", help="a method with a shared burn-in: ubteacher, softteacher, pseco")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--ratio", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1, help="training seed and split fold, as in a table")
    ap.add_argument("--t", type=float, default=None,
                    help="threshold (default: the method's in Table 1: ubteacher 0.7, softteacher 0.9, pseco 0.5)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_intermixed_args()
    cfg = load_config(args.preset, [f"data.ratio={args.ratio:g}", f"data.fold={args.seed}", f"seed={args.seed}",
                                    *args.overrides], method=args.method)
    burn_in = burn_in_config(cfg)
    if burn_in is None:
        raise BenchError(f"method {args.method} with semi.burn_in={cfg.semi.burn_in} has no shared burn-in cell")
    home = Path(os.environ.get("BENCH_HOME", ".bench"))
    teacher = run_cell(burn_in, home, track=False, progress=True)["burn_in_teacher"]
    t = f"{args.t if args.t is not None else TABLE1_T.get(args.method, cfg.semi.t):g}"
    if f"cover_{t}" not in teacher:
        known = sorted(k.split("_")[1] for k in teacher if k.count("_") == 1 and k.startswith("cover_"))
        raise BenchError(f"--t {t}: a burn-in is diagnosed at {', '.join(known)}; pick one of those")
    print(json.dumps({"method": args.method, "ratio": args.ratio, "seed": args.seed, "t": float(t),
                      "AP": round(teacher["AP"], 2), "cover_above_t": round(teacher[f"cover_{t}"], 3),
                      "precision_above_t": round(teacher[f"precision_{t}"], 3)}))


if __name__ == "__main__":
    main()
