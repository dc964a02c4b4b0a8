"""How good a teacher does a burn-in schedule hand over? Trains one burn-in cell and prints its
diagnostics at the method's own threshold: AP, the fraction of validation objects covered above t,
and the precision of the detections above t.

The configuration is the method's baseline row of Table 1 (its overrides: Soft Teacher's CE loss
and t 0.9, PseCo's t 0.5) plus the overrides given here. A calibration probe for a preset's
schedule: it reads only the baseline's supervised burn-in, never an LSM run. The cell is cached in
BENCH_HOME like any other, so a schedule a table already trained costs nothing.

    python benchmarks/burn_in_teacher.py ubteacher --ratio 5 --seed 1 semi.burn_in=1000 solver.max_iter=1400

With `pseco.ema_from_start=true` (or `softteacher.`) it diagnoses the originals' teacher, an EMA of
the student kept from iteration 0, instead of the student copied at the end of burn-in.
"""

from __future__ import annotations

import argparse
import json

from bench.burn_in import burn_in_config
from bench.specs import load_spec
from bench.worker import run_cell
from core.config import load_config
from core.errors import BenchError
from core.paths import bench_home


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method", help="a method with a shared burn-in: ubteacher, softteacher, pseco")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--ratio", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1, help="training seed and split fold, as in a table")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_intermixed_args()
    row = next((r for r in load_spec("table1").rows if r.method == args.method and not r.lsm), None)
    if row is None:
        raise BenchError(f"method {args.method} has no baseline row in Table 1; use ubteacher, softteacher or pseco")
    row_overrides = [f"{k}={v}" for k, v in row.overrides.items()]
    cfg = load_config(args.preset, [*row_overrides, f"data.ratio={args.ratio:g}", f"data.fold={args.seed}",
                                    f"seed={args.seed}", *args.overrides], method=args.method)
    burn_in = burn_in_config(cfg)
    if burn_in is None:
        raise BenchError(f"method {args.method} with semi.burn_in={cfg.semi.burn_in} has no shared burn-in cell")
    teacher = run_cell(burn_in, bench_home(), track=False, progress=True)["burn_in_teacher"]
    t = f"{cfg.semi.t:g}"
    if f"cover_{t}" not in teacher:
        known = sorted(k.split("_")[1] for k in teacher if k.count("_") == 1 and k.startswith("cover_"))
        raise BenchError(f"semi.t={t}: a burn-in is diagnosed at {', '.join(known)}; pick one of those")
    print(json.dumps({"method": args.method, "ratio": args.ratio, "seed": args.seed, "t": float(t),
                      "AP": round(teacher["AP"], 2), "cover_above_t": round(teacher[f"cover_{t}"], 3),
                      "precision_above_t": round(teacher[f"precision_{t}"], 3)}))


if __name__ == "__main__":
    main()
