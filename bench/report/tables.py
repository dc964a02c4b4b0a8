"""One paper artifact as a table: our mean ± spread per cell beside the paper's number.

Input is a results frame with one row per finished run (``row_id, column_id, seed`` plus metric
columns such as AP, APs) and the failed runs as ``(row_id, column_id, seed)`` tuples. Everything
here is a pure function of its arguments (the timestamp comes in through ``header``), so the
same results always give byte-identical files that can be diffed and committed.

Formats: md (reading), csv (long form, for scripts), tex (booktabs, for the paper draft) and html.
"""

from __future__ import annotations

import html as _html
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
from scipy import stats

from core.errors import BenchError
from bench.specs import ArtifactSpec, RowSpec

ID_COLUMNS = ("row_id", "column_id", "seed")
ERR_KINDS = {"std": "sample standard deviation (ddof=1)", "sem": "standard error of the mean"}
FORMATS = ("md", "csv", "tex", "html")
HEADER_KEYS = ("command", "git_sha", "preset", "timestamp")
MIN_SEEDS_FOR_TEST = 5  # the paper's protocol: 5 folds; fewer pairs make a t-test meaningless
CSV_COLUMNS = ("row_id", "column_id", "metric", "mean", "err", "n", "paper", "paper_std", "status", "n_failed")


# -- inputs ------------------------------------------------------------------------------------
def _check_cells(spec: ArtifactSpec, pairs: Iterable[tuple[str, str]], what: str) -> None:
    """Refuse results that the spec cannot place, instead of silently dropping them."""
    rows, cols = {r.id for r in spec.rows}, {c.id for c in spec.columns}
    for row_id, col_id in sorted(set(pairs)):
        if row_id not in rows:
            raise BenchError(f"{what} name row '{row_id}', not in spec {spec.name}; "
                             f"rows: {', '.join(r.id for r in spec.rows)}")
        if col_id not in cols:
            raise BenchError(f"{what} name column '{col_id}', not in spec {spec.name}; "
                             f"columns: {', '.join(c.id for c in spec.columns)}")
        if not spec.in_artifact(row_id, col_id):
            raise BenchError(f"{what} name ({row_id}, {col_id}), not a cell of {spec.name}; "
                             f"row {row_id} has only columns {spec.row(row_id).only_columns}")
        if spec.row_status(row_id) != "implemented":
            raise BenchError(f"{what} name row '{row_id}' of {spec.name}, which is paper-only "
                             f"(method {spec.row(row_id).method}); remove them or implement the method")


def _results_frame(results: pd.DataFrame | None, spec: ArtifactSpec) -> pd.DataFrame:
    """Validated copy with every spec metric as a float column (NaN where a run lacks it)."""
    if results is None or (len(results) == 0 and not set(ID_COLUMNS) <= set(results.columns)):
        results = pd.DataFrame({c: pd.Series(dtype=object) for c in ID_COLUMNS})
    missing = [c for c in ID_COLUMNS if c not in results.columns]
    if missing:
        raise BenchError(f"results lack column(s) {', '.join(missing)}; expected row_id, column_id, seed and metrics")
    df = results.copy()
    df["row_id"] = df["row_id"].astype(str) if len(df) else df["row_id"]
    df["column_id"] = df["column_id"].astype(str) if len(df) else df["column_id"]
    _check_cells(spec, zip(df["row_id"], df["column_id"]), "results")
    dup = df.duplicated(list(ID_COLUMNS), keep=False)
    if dup.any():
        row_id, col_id, seed = df.loc[dup, list(ID_COLUMNS)].iloc[0].tolist()
        raise BenchError(f"results hold several runs of (row, column, seed) = ({row_id}, {col_id}, {seed}); "
                         "keep one per seed")
    for m in spec.all_metrics:
        if m not in df.columns:
            df[m] = np.nan
        try:
            df[m] = pd.to_numeric(df[m], errors="raise").astype(float)
        except (TypeError, ValueError):
            raise BenchError(f"results column {m} holds non-numeric values") from None
    return df


def _failed_counts(failed: Iterable[tuple], spec: ArtifactSpec, df: pd.DataFrame) -> Counter:
    """Failed seeds per (row, column); a failure later rerun successfully no longer counts."""
    failed = {(str(r), str(c), s) for r, c, s in failed}
    _check_cells(spec, ((r, c) for r, c, _ in failed), "failed cells")
    done = set(zip(df["row_id"], df["column_id"], df["seed"]))
    return Counter((r, c) for r, c, s in failed if (r, c, s) not in done)


def _check_err(err: str) -> None:
    if err not in ERR_KINDS:
        raise BenchError(f"unknown error measure '{err}'; use one of: {', '.join(ERR_KINDS)}")


# -- statistics --------------------------------------------------------------------------------
def aggregate(results: pd.DataFrame | None, spec: ArtifactSpec, err: str = "std") -> pd.DataFrame:
    """mean, err (std or sem over seeds) and n per cell x metric, in spec order, every cell listed."""
    _check_err(err)
    df = _results_frame(results, spec)
    long = df.melt(id_vars=list(ID_COLUMNS), value_vars=list(spec.metrics), var_name="metric",
                   value_name="value").dropna(subset=["value"])
    grouped = long.groupby(["row_id", "column_id", "metric"])["value"].agg(["mean", "std", "count"])
    keys = [(r.id, c.id, m) for r, c in spec.cells() for m in spec.metrics]
    out = grouped.reindex(pd.MultiIndex.from_tuples(keys, names=["row_id", "column_id", "metric"])).reset_index()
    out["n"] = out["count"].fillna(0).astype(int)
    std = out["std"].astype(float)
    out["err"] = std if err == "std" else std / np.sqrt(out["n"].where(out["n"] > 0))
    out["mean"] = out["mean"].astype(float)
    return out[["row_id", "column_id", "metric", "mean", "err", "n"]]


def paired_deltas(results: pd.DataFrame | None, spec: ArtifactSpec) -> pd.DataFrame:
    """LSM - baseline per seed for each baseline pair, column and paired metric: mean, 95 %
    confidence interval of the mean (Student's t, n >= 2) and a paired t-test when n >= 5.

    Pairing by seed removes the split-to-split variance both rows share (seed i = fold i), which is
    larger than most LSM gains at 1%. `seeds`/`deltas` are tuples in seed order; `paper_delta` is
    the same difference of the paper's numbers, NaN where either is missing.
    """
    df = _results_frame(results, spec)
    records = []
    for base_id, lsm_id in spec.baseline_pairs:
        for col in spec.columns:
            if not (spec.in_artifact(base_id, col) and spec.in_artifact(lsm_id, col)):
                continue
            for m in spec.paired_metrics:
                base = _seed_values(df, base_id, col.id, m)
                lsm = _seed_values(df, lsm_id, col.id, m)
                both = base.index.intersection(lsm.index).sort_values()
                b, a = base.loc[both].to_numpy(), lsm.loc[both].to_numpy()
                deltas = a - b
                t = p = lo = hi = math.nan
                if len(both) >= 2:
                    half = stats.t.ppf(0.975, len(both) - 1) * deltas.std(ddof=1) / math.sqrt(len(both))
                    lo, hi = float(deltas.mean() - half), float(deltas.mean() + half)
                if len(both) >= MIN_SEEDS_FOR_TEST:
                    with warnings.catch_warnings(), np.errstate(all="ignore"):
                        warnings.simplefilter("ignore", RuntimeWarning)  # identical deltas: t = +-inf
                        res = stats.ttest_rel(a, b)
                    t, p = float(res.statistic), float(res.pvalue)
                pb, pl = spec.paper(base_id, col, m), spec.paper(lsm_id, col, m)
                records.append({
                    "baseline_id": base_id, "lsm_id": lsm_id, "column_id": col.id, "metric": m,
                    "n": len(both), "seeds": tuple(both.tolist()), "deltas": tuple(float(d) for d in deltas),
                    "mean": float(deltas.mean()) if len(both) else math.nan, "ci_low": lo, "ci_high": hi,
                    "t": t, "p": p,
                    "paper_delta": pl[0] - pb[0] if pb and pl else math.nan,
                })
    cols = ["baseline_id", "lsm_id", "column_id", "metric", "n", "seeds", "deltas", "mean", "ci_low", "ci_high",
            "t", "p", "paper_delta"]
    return pd.DataFrame(records, columns=cols)


def _seed_values(df: pd.DataFrame, row_id: str, col_id: str, metric: str) -> pd.Series:
    sel = df[(df["row_id"] == row_id) & (df["column_id"] == col_id)].dropna(subset=[metric])
    return pd.Series(sel[metric].to_numpy(), index=pd.Index(sel["seed"].tolist(), name="seed"))


def _cell_table(spec: ArtifactSpec, results, failed, err: str) -> pd.DataFrame:
    """aggregate + paper value, failures and a status per cell x metric (the csv's rows)."""
    agg = aggregate(results, spec, err)
    counts = _failed_counts(failed, spec, _results_frame(results, spec))
    paper = [spec.paper(r, c, m) for r, c, m in zip(agg["row_id"], agg["column_id"], agg["metric"])]
    agg["paper"] = [p[0] if p else math.nan for p in paper]
    agg["paper_std"] = [p[1] if p else math.nan for p in paper]
    agg["n_failed"] = [counts[(r, c)] for r, c in zip(agg["row_id"], agg["column_id"])]
    status = []
    for r, n, k in zip(agg["row_id"], agg["n"], agg["n_failed"]):
        if spec.row_status(r) != "implemented":
            status.append("paper-only")
        elif n and k:
            status.append("partial")
        elif n:
            status.append("ok")
        else:
            status.append("failed" if k else "not-run")
    agg["status"] = status
    return agg[list(CSV_COLUMNS)]


# -- rendering ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Style:
    """What differs between md, tex and html: escaping, bold, and a few symbols."""

    escape: Callable[[str], str]
    bold: Callable[[str], str]
    pm: str
    dash: str
    delta: str
    minus: str


def _md_escape(s: str) -> str:
    for ch in ("\\", "`", "*", "_", "|", "<"):
        s = s.replace(ch, "\\" + ch)
    return s


_TEX_CHARS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
              "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
              "<": r"\textless{}", ">": r"\textgreater{}", "—": "---", "–": "--", "±": r"$\pm$",
              "Δ": r"$\Delta$", "−": "$-$", "×": r"$\times$", "≥": r"$\geq$"}


def _tex_escape(s: str) -> str:
    return "".join(_TEX_CHARS.get(ch, ch) for ch in s)


_STYLES = {
    "md": _Style(_md_escape, lambda s: f"**{s}**", " ± ", "—", "Δ", "−"),
    "tex": _Style(_tex_escape, lambda s: rf"\textbf{{{s}}}", r" $\pm$ ", "---", r"$\Delta$", "$-$"),
    "html": _Style(lambda s: _html.escape(s, quote=False), lambda s: f"<b>{s}</b>", " ± ", "—", "Δ", "−"),
}


def _num(x: float) -> str:
    return f"{x:.2f}"


def _signed(x: float) -> str:
    return f"{x:+.2f}"


def _pvalue(p: float) -> str:
    return f"{p:.3g}"


def _header_lines(header: dict | None, err: str) -> list[tuple[str, str]]:
    if header is None:
        raise ValueError(f"render needs a header dict with {', '.join(HEADER_KEYS)}")
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise ValueError(f"header lacks {', '.join(missing)}")
    keys = list(HEADER_KEYS) + sorted(k for k in header if k not in HEADER_KEYS and k != "err")
    lines = [(k, " ".join(str(header[k]).split())) for k in keys]
    return lines + [("err", f"{err} ({ERR_KINDS[err]})")]


def _column_headers(spec: ArtifactSpec) -> list[tuple[str, str, str]]:
    """(column_id, metric, header text) for each data column of the table."""
    out = []
    for c in spec.columns:
        for m in spec.metrics:
            if len(spec.metrics) == 1:
                text = c.label
            elif len(spec.columns) == 1:
                text = m
            else:
                text = f"{c.label} {m}"
            out.append((c.id, m, text))
    return out


def _row_label(spec: ArtifactSpec, row: RowSpec) -> str:
    return row.label + (" (paper only)" if spec.row_status(row) != "implemented" else "")


def _best(cells: pd.DataFrame) -> set[tuple[str, str, str]]:
    """(row, column, metric) keys of the best shown mean per column; ties all bold."""
    best = set()
    ours = cells[(cells["n"] > 0) & (cells["status"] != "paper-only")]
    for (col, m), grp in ours.groupby(["column_id", "metric"]):
        shown = grp["mean"].round(2)
        best |= {(r, col, m) for r in grp.loc[shown == shown.max(), "row_id"]}
    return best


def _cell_text(rec: dict | None, is_best: bool, st: _Style) -> str:
    if rec is None:  # not a cell of the artifact
        return ""
    if rec["status"] == "paper-only":
        ours = st.dash
    elif rec["n"] > 0:
        ours = st.bold(_num(rec["mean"])) if is_best else _num(rec["mean"])
        if not math.isnan(rec["err"]):
            ours += st.pm + _num(rec["err"])
        ours += f" ({rec['n']})"
        if rec["n_failed"]:
            ours += f", {rec['n_failed']} failed"
    else:
        ours = "failed" if rec["n_failed"] else st.dash
    if not math.isnan(rec["paper"]):
        ours += f"; paper {_num(rec['paper'])}"
    return ours


def _grid(spec: ArtifactSpec, cells: pd.DataFrame, st: _Style) -> tuple[list[str], list[list[str]]]:
    """Header and body text (escaped, formatted) of the main table."""
    by_key = {(r["row_id"], r["column_id"], r["metric"]): r for r in cells.to_dict("records")}
    best = _best(cells)
    cols = _column_headers(spec)
    head = ["Method"] + [st.escape(text) for _, _, text in cols]
    body = []
    for row in spec.rows:
        line = [st.escape(_row_label(spec, row))]
        for col_id, m, _ in cols:
            key = (row.id, col_id, m)
            line.append(_cell_text(by_key.get(key), key in best, st))
        body.append(line)
    return head, body


def _delta_grid(spec: ArtifactSpec, deltas: pd.DataFrame, st: _Style) -> tuple[list[str], list[list[str]]]:
    head = ["Baseline", "LSM", "Column", "Metric", f"Per-seed {st.delta}", f"Mean {st.delta} (n)", "95% CI",
            "p (paired t)", f"Paper {st.delta}"]
    if st is _STYLES["tex"]:
        head[6], head[7] = r"95\% CI", "$p$ (paired $t$)"
    body = []
    for d in deltas.to_dict("records"):
        per_seed = ", ".join(f"{s}: {_signed(x)}" for s, x in zip(d["seeds"], d["deltas"])) or st.dash
        mean = f"{_signed(d['mean'])} ({d['n']})" if d["n"] else st.dash
        body.append([
            st.escape(spec.row(d["baseline_id"]).label), st.escape(spec.row(d["lsm_id"]).label),
            st.escape(spec.column(d["column_id"]).label), st.escape(d["metric"]), st.escape(per_seed),
            mean, st.dash if math.isnan(d["ci_low"]) else f"[{_signed(d['ci_low'])}, {_signed(d['ci_high'])}]",
            st.dash if math.isnan(d["p"]) else _pvalue(d["p"]),
            st.dash if math.isnan(d["paper_delta"]) else _signed(d["paper_delta"]),
        ])
    if spec.paper_table is None:  # a spec of our own: no paper column
        head, body = head[:-1], [row[:-1] for row in body]
    return head, body


def _legend(spec: ArtifactSpec, err: str, header: list[tuple[str, str]] = ()) -> str:
    paper = "paper: the published value; " if spec.paper_table is not None else ""
    text = (f"Cells: our mean ± {err} over seeds (n runs); {paper}"
            f"bold: the best mean of a column. Deltas pair runs by seed; 95% CI of the mean delta "
            f"(Student's t) when n ≥ 2, p from a paired t-test when n ≥ {MIN_SEEDS_FOR_TEST}.")
    return text + _area_scale_note(dict(header).get("area_scale"))


def _area_scale_note(area_scale: str | None) -> str:
    """The visible sentence for a header's `area_scale` (eval.area_scale, when not 1): the size
    bins of APs/APm/APl are not COCO's, and a reader comparing them with the paper must know."""
    if not area_scale:
        return ""
    bounds = []
    for part in area_scale.split(","):
        s = float(part)
        bounds.append(f"{s:g} (small < {32 * s:g} px, large > {96 * s:g} px)")
    return (f" Size bins (APs/APm/APl) use COCO's bounds (32 and 96 px, square root of the box area) times "
            f"eval.area_scale = {'; '.join(bounds)}.")


def comment_value(v: str) -> str:
    """An html/md comment must not close early: break up `-->`, `--!>` and `-- >`."""
    return re.sub(r"--(?=\s*!?>)", "- -", v)


def _render_md(spec, cells, deltas, header, err) -> str:
    st = _STYLES["md"]
    out = [f"<!-- {k}: {comment_value(v)} -->" for k, v in header]
    out += ["", f"### {_md_escape(spec.name)}: {_md_escape(spec.title)}", ""]
    head, body = _grid(spec, cells, st)
    out += _md_table(head, body)
    out += ["", _md_escape(_legend(spec, err, header))]
    if len(deltas):
        dhead, dbody = _delta_grid(spec, deltas, st)
        out += ["", f"#### LSM {st.minus} baseline, paired by seed", ""] + _md_table(dhead, dbody, n_left=5)
    return "\n".join(out) + "\n"


def _md_table(head: list[str], body: list[list[str]], n_left: int = 1) -> list[str]:
    """A pipe table; text columns left-aligned, numbers right-aligned."""
    align = ["---"] * n_left + ["---:"] * (len(head) - n_left)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


def _render_tex(spec, cells, deltas, header, err) -> str:
    st = _STYLES["tex"]
    out = [f"% {k}: {v}" for k, v in header]
    head, body = _grid(spec, cells, st)
    out += _tex_table(head, body, f"{spec.title}. {_legend(spec, err, header)}", f"tab:{spec.name}", "l" + "r" * (len(head) - 1))
    if len(deltas):
        dhead, dbody = _delta_grid(spec, deltas, st)
        out += [""] + _tex_table(dhead, dbody, f"{spec.title}: LSM − baseline, paired by seed.",
                                 f"tab:{spec.name}-deltas", "lllll" + "r" * (len(dhead) - 5))
    return "\n".join(out) + "\n"


def _tex_table(head, body, caption: str, label: str, align: str) -> list[str]:
    row = lambda cells: " & ".join(cells) + r" \\"  # noqa: E731
    return [r"\begin{table}[htbp]", r"\centering", rf"\caption{{{_tex_escape(caption)}}}",
            rf"\label{{{_tex_escape(label)}}}", rf"\begin{{tabular}}{{{align}}}", r"\toprule", row(head),
            r"\midrule", *[row(r) for r in body], r"\bottomrule", r"\end{tabular}", r"\end{table}"]


def _render_html(spec, cells, deltas, header, err) -> str:
    st = _STYLES["html"]
    esc = st.escape
    out = [f"<!-- {k}: {comment_value(v)} -->" for k, v in header]
    out += ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            f"<title>{esc(spec.name)}: {esc(spec.title)}</title>", "</head>", "<body>"]
    head, body = _grid(spec, cells, st)
    out += _html_table(head, body, f"{esc(spec.name)}: {esc(spec.title)}", spec.name)
    out += [f"<p>{esc(_legend(spec, err, header))}</p>"]
    if len(deltas):
        dhead, dbody = _delta_grid(spec, deltas, st)
        out += [f"<h4>LSM {st.minus} baseline, paired by seed</h4>"]
        out += _html_table(dhead, dbody, None, f"{spec.name}-deltas")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def _html_table(head, body, caption: str | None, table_id: str) -> list[str]:
    out = [f'<table id="{_html.escape(table_id)}">']
    if caption:
        out.append(f"<caption>{caption}</caption>")
    out += ["<thead>", "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>", "</thead>", "<tbody>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body]
    return out + ["</tbody>", "</table>"]


def _render_csv(cells: pd.DataFrame, header) -> str:
    lines = [f"# {k}: {v}" for k, v in header]
    return "\n".join(lines) + "\n" + cells.to_csv(index=False, lineterminator="\n")


def render(spec: ArtifactSpec, results: pd.DataFrame | None, failed: Iterable[tuple] = (), fmt: str = "md",
           err: str = "std", header: dict | None = None) -> str:
    """The artifact as one `fmt` document (md, csv, tex or html), reproducible byte for byte.

    `header` must give command, git_sha, preset and timestamp (written as comment lines, extra keys
    after them); no clock is read here so that the same inputs give the same output.
    """
    if fmt not in FORMATS:
        raise BenchError(f"unknown report format '{fmt}'; use one of: {', '.join(FORMATS)}")
    _check_err(err)
    head = _header_lines(header, err)
    cells = _cell_table(spec, results, failed, err)
    if fmt == "csv":
        return _render_csv(cells, head)
    deltas = paired_deltas(results, spec)
    return {"md": _render_md, "tex": _render_tex, "html": _render_html}[fmt](spec, cells, deltas, head, err)


def _write_atomic(path: Path, text: str) -> None:
    """Readers never see a half-written report: write a sibling temp file, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_all(spec: ArtifactSpec, results: pd.DataFrame | None, failed: Iterable[tuple], out_dir: Path | str,
              err: str = "std", header: dict | None = None) -> list[Path]:
    """`<name>.md/.csv/.tex/.html` in `out_dir` (created if needed); the paths written, in that order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = list(failed)
    texts = {fmt: render(spec, results, failed, fmt, err, header) for fmt in FORMATS}  # all or nothing
    paths = []
    for fmt, text in texts.items():
        path = out_dir / f"{spec.name}.{fmt}"
        _write_atomic(path, text)
        paths.append(path)
    return paths
