"""A finished (or half-finished) study as the frames the figures and tables are made from."""

from __future__ import annotations

import optuna
import pandas as pd
from optuna.trial import TrialState

from studies.definitions import FIGURE5_CURVES, StudyDef


def figure5_points(studies: list[tuple[optuna.Study, StudyDef]]) -> pd.DataFrame:
    """curve, threshold, seed, AP, cell_key: one row per finished cell (a re-run point counts once)."""
    rows = []
    for study, defn in studies:
        param = FIGURE5_CURVES[defn.curve]
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            rows.append({"curve": defn.curve, "threshold": float(t.params[param]), "seed": int(t.params["seed"]),
                         "AP": float(t.value), "cell_key": t.user_attrs.get("cell_key", ""), "trial": t.number,
                         "study": study.study_name})
    df = pd.DataFrame(rows, columns=["curve", "threshold", "seed", "AP", "cell_key", "trial", "study"])
    df = df.drop_duplicates(["curve", "threshold", "seed"], keep="last")
    return df.sort_values(["curve", "threshold", "seed"]).reset_index(drop=True)


def table5_results(study: optuna.Study, defn: StudyDef, metrics: list[str]) -> tuple[pd.DataFrame, list[tuple]]:
    """(results frame for bench.report.tables: row_id, column_id, seed + metrics; failed cells)."""
    from bench.specs import load_spec

    column = load_spec("table5").columns[0].id
    done, failed = {}, set()
    for t in study.get_trials(deepcopy=False):
        point = (t.params.get("row"), column, t.params.get("seed"))
        if None in point:
            continue
        if t.state == TrialState.COMPLETE:
            done[point] = {m: t.user_attrs.get(m, float("nan")) for m in metrics}
        elif t.state == TrialState.FAIL:
            failed.add(point)
    rows = [{"row_id": r, "column_id": c, "seed": s, **m} for (r, c, s), m in sorted(done.items())]
    frame = pd.DataFrame(rows, columns=["row_id", "column_id", "seed", *metrics])
    return frame, sorted(p for p in failed if p not in done)
