"""The paper's published numbers (Tables 1-6, Figure 5), shipped with the package.

`paper_values.csv` is a verbatim copy of the curated long-form table in the shared paper folder
(one row per published number: table, setting, method, lsm, variant, metric, value, std, note),
so reports can put the paper's value beside ours without network or repository access.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

CSV_PATH = Path(__file__).parent / "paper_values.csv"
KEY = ("table", "setting", "method", "lsm", "variant", "metric")


@lru_cache(maxsize=1)
def _load() -> pd.DataFrame:
    df = pd.read_csv(
        CSV_PATH,
        dtype={"table": str, "setting": str, "method": str, "lsm": str, "variant": str, "metric": str, "note": str},
        keep_default_na=False,  # an empty variant is "", not NaN
    )
    lsm = df["lsm"].str.strip().str.lower()
    bad = sorted(set(lsm) - {"true", "false"})
    if bad:
        raise ValueError(f"{CSV_PATH}: column lsm must be true/false, got {bad}")
    df["lsm"] = lsm == "true"
    for col in ("value", "std"):
        df[col] = pd.to_numeric(df[col].replace("", np.nan), errors="raise").astype(float)
    dup = df.duplicated(list(KEY), keep=False)
    if dup.any():
        raise ValueError(f"{CSV_PATH}: duplicate entries {df.loc[dup, list(KEY)].to_dict('records')}")
    return df


def paper_values() -> pd.DataFrame:
    """All published numbers; a copy, so callers cannot alter the cached table."""
    return _load().copy()


@lru_cache(maxsize=1)
def _index() -> dict[tuple, tuple[float, float]]:
    df = _load()
    return {
        tuple(r[k] for k in KEY): (float(r["value"]), float(r["std"]))
        for r in df.to_dict("records")
    }


def paper_value(table: str, setting: str, method: str, lsm: bool, variant: str = "",
                metric: str = "AP") -> tuple[float, float] | None:
    """(value, std) of one published number, std NaN where the paper gives none; None if absent."""
    return _index().get((table, setting, method, bool(lsm), variant, metric))
