"""`python -m studies.worker --study NAME --home DIR [--storage URL] [--index I]`: one study worker.

`bench study ... --workers N` starts N of these on one study; each rebuilds the study's definition
from the storage, so they need nothing else. The orchestrator has already created the study, its
MLflow run and recovered dead trials before any worker starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="studies.worker")
    ap.add_argument("--study", required=True)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--storage", default=None)
    ap.add_argument("--index", type=int, default=0, help="worker number (offsets the TPE seed)")
    ap.add_argument("--no-track", action="store_true")
    args = ap.parse_args(argv)

    from studies.mlflow_callback import MLflowStudyCallback
    from studies.run import load_study, work

    study, defn = load_study(args.study, args.home, args.storage, worker_index=args.index)
    work(study, defn, args.home.resolve(), MLflowStudyCallback(args.home, enabled=not args.no_track))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
