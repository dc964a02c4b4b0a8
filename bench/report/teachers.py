"""A table's burn-in teachers: how many validation objects each one covers above its students'
threshold t, and how precisely. A semi-supervised row means little if the teacher it starts from
hands over almost nothing above t (or mostly wrong boxes), so every table with burn-in cells
publishes this next to its numbers: `<table>_teachers.md` and `.csv`.

The values come from each burn-in cell's `burn_in_teacher` (result.json), measured at the end of
the burn-in on the validation set: cover = fraction of objects matched (IoU >= 0.5, same class) by
a detection scoring above t; precision = fraction of the detections above t that match an object.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.report.tables import comment_value
from core.paths import done_result, run_dir

COLUMNS = ["method", "column", "t", "seed", "AP", "cover", "precision"]


def burn_in_teachers(cells, home: Path, spec) -> pd.DataFrame:
    """One row per (done burn-in cell, t of a cell that starts from it); `cells`: the plan's."""
    rows, seen = [], set()
    for c in cells:
        if not c.starts_after_burn_in or (c.depends_on, c.config.semi.t) in seen:
            continue
        teacher = (done_result(run_dir(home, c.depends_on) / "result.json") or {}).get("burn_in_teacher")
        if not teacher:
            continue
        seen.add((c.depends_on, c.config.semi.t))
        t = c.config.semi.t
        rows.append({"method": c.config.method, "column": spec.column(c.column_id).label, "t": t, "seed": c.seed,
                     "AP": teacher.get("AP"), "cover": teacher.get(f"cover_{t:g}"),
                     "precision": teacher.get(f"precision_{t:g}")})
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["method", "column", "seed"], kind="stable")


def render_md(frame: pd.DataFrame, title: str, aim: tuple[float, float] = (0.30, 0.70)) -> str:
    """Mean over seeds per method and column, each seed's value in brackets (seed order)."""

    def cell(values: pd.Series, digits: int) -> str:
        each = ", ".join("—" if pd.isna(v) else f"{v:.{digits}f}" for v in values)
        return f"{values.mean():.{digits}f} ({each})" if len(values) > 1 else f"{values.mean():.{digits}f}"

    out = [f"### {title}", "",
           f"At the end of each burn-in, on the validation set: the fraction of objects a detection above t "
           f"covers (IoU >= 0.5, same class) and the precision of those detections; mean over seeds, each "
           f"seed in brackets. Aim for a useful teacher: cover >= {aim[0]:.2f} at precision >= {aim[1]:.2f}.", "",
           "| method | labels | t | seeds | AP | cover above t | precision above t |",
           "|---|---|---:|---:|---:|---|---|"]
    for (method, column, t), g in frame.groupby(["method", "column", "t"], sort=False):
        out.append(f"| {method} | {column} | {t:g} | {len(g)} | {g['AP'].mean():.1f} | {cell(g['cover'], 2)} | "
                   f"{cell(g['precision'], 2)} |")
    return "\n".join(out) + "\n"


def write_teachers(frame: pd.DataFrame, spec_name: str, out_dir: Path, header: dict) -> list[Path]:
    """`<table>_teachers.md` and `.csv`, with the table's header (command, commit, preset) on top."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    comments = "".join(f"<!-- {k}: {comment_value(str(v))} -->\n" for k, v in header.items())
    md, csv = out_dir / f"{spec_name}_teachers.md", out_dir / f"{spec_name}_teachers.csv"
    md.write_text(comments + "\n" + render_md(frame, f"{spec_name}: the burn-in teachers"))
    csv.write_text("".join(f"# {k}: {v}\n" for k, v in header.items()) + frame.to_csv(index=False, lineterminator="\n"))
    return [md, csv]
