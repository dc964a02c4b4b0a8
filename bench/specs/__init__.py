"""Paper artifacts as data: one YAML file per table or figure (``bench/specs/<name>.yaml``).

A spec lists the artifact's columns (data settings) and rows (methods and variants), each with the
config overrides that select it, so planning, running and reporting all read the same
description instead of hard-coding tables. Rows whose method has no adapter stay in the spec with
the paper's numbers only; that keeps every published number visible next to what we reproduce.

Two features beyond a plain grid, both needed to describe the paper faithfully:

- ``only_columns`` on a row: the cells of the paper's layout. Table 6 puts UBT and DDETR in
  different settings; other cells are not part of the artifact (not run, left blank).
- ``params`` on a column, substituted for ``${name}`` in a row's overrides and variant: Figure 5's
  columns are threshold values that set ``semi.t`` for the UBT row and ``lsm.alpha`` for the LSM
  row. Use `ArtifactSpec.cells` and `ArtifactSpec.cell_overrides` rather than merging by hand.

A spec of one's own need not be a paper artifact: without ``paper_table`` it has no paper values
(the tables show ours only), and ``preset`` names the preset it runs on when ``--preset`` is not
given (``bench run forest`` runs on the ``forest`` preset).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import BenchError

SPEC_DIR = Path(__file__).parent
KNOWN_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

Scalar = Union[bool, int, float, str]
OverrideValue = Union[Scalar, list[Scalar]]
_PARAM = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnSpec(_Frozen):
    """One data setting of the artifact: `setting` is the paper CSV's key for it."""

    id: str
    setting: str
    label: str
    overrides: dict[str, OverrideValue] = {}
    params: dict[str, Scalar] = {}  # substituted for ${name} in the rows' overrides and variant
    note: str = ""


class RowSpec(_Frozen):
    """One method/variant of the artifact; (method, lsm, variant) is its key in the paper CSV."""

    id: str
    label: str  # as printed in the paper
    method: str  # a name of the method table (core/methods.py) or the paper's name for methods never implemented
    lsm: bool
    variant: str = ""
    overrides: dict[str, OverrideValue] = {}
    only_columns: list[str] | None = None  # None: every column of the spec
    paper_only: bool = False  # needs a component no config expresses (e.g. MLC) even if the method runs
    note: str = ""


class AbsentSpec(_Frozen):
    """Cells of the paper's layout without a published number ("-" in a table, a figure point)."""

    row: str
    columns: list[str] = Field(min_length=1)
    reason: str


class ArtifactSpec(_Frozen):
    name: str
    title: str
    paper_table: str | None = None  # the paper CSV's table key; None: a spec with no paper values
    preset: str | None = None  # the preset `bench plan/run/report` use without --preset (default demo)
    metrics: list[str] = Field(min_length=1)
    columns: list[ColumnSpec] = Field(min_length=1)
    rows: list[RowSpec] = Field(min_length=1)
    baseline_pairs: list[tuple[str, str]] = []
    # metrics of the paired LSM - baseline deltas (default: `metrics`), e.g. AP by object size
    delta_metrics: list[str] = []
    paper_absent: list[AbsentSpec] = []
    note: str = ""

    @model_validator(mode="after")
    def _check(self) -> "ArtifactSpec":
        col_ids = [c.id for c in self.columns]
        row_ids = [r.id for r in self.rows]
        for kind, ids in (("column", col_ids), ("row", row_ids)):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            if dup:
                raise ValueError(f"duplicate {kind} ids: {', '.join(dup)}")
        bad = [m for m in (*self.metrics, *self.delta_metrics) if m not in KNOWN_METRICS]
        if bad:
            raise ValueError(f"unknown metrics {bad}; known: {', '.join(KNOWN_METRICS)}")
        params = {c.id: c.params for c in self.columns}
        for r in self.rows:
            unknown = [c for c in (r.only_columns or []) if c not in col_ids]
            if unknown:
                raise ValueError(f"row {r.id}: only_columns names unknown columns {unknown}")
            if r.method not in known_methods():  # a typo would silently become "paper values only"
                raise ValueError(f"row {r.id}: unknown method '{r.method}'; implemented: "
                                 f"{', '.join(_implemented())}; with paper values only: "
                                 f"{', '.join(sorted(set(known_methods()) - set(_implemented())))}")
            if "method" in r.overrides:
                raise ValueError(f"row {r.id}: set the method with the row's `method`, not an override")
            enabled = r.overrides.get("lsm.enabled")
            if isinstance(enabled, bool) and enabled != r.lsm:
                raise ValueError(f"row {r.id}: lsm is {r.lsm} but overrides set lsm.enabled={enabled}")
            used = set(_PARAM.findall(r.variant))
            for v in r.overrides.values():
                used |= set(_PARAM.findall(v)) if isinstance(v, str) else set()
            for c in r.only_columns or col_ids:
                missing = used - set(params[c])
                if missing:
                    raise ValueError(f"row {r.id} uses ${{{', '.join(sorted(missing))}}} "
                                     f"that column {c} does not define in params")
        for base, lsm in self.baseline_pairs:
            for rid in (base, lsm):
                if rid not in row_ids:
                    raise ValueError(f"baseline_pairs names unknown row '{rid}'")
            if not any(self.in_artifact(base, c) and self.in_artifact(lsm, c) for c in col_ids):
                raise ValueError(f"baseline pair ({base}, {lsm}) shares no column")
        for a in self.paper_absent:
            if a.row not in row_ids:
                raise ValueError(f"paper_absent names unknown row '{a.row}'")
            for c in a.columns:
                if c not in col_ids:
                    raise ValueError(f"paper_absent names unknown column '{c}'")
                if not self.in_artifact(a.row, c):
                    raise ValueError(f"paper_absent: ({a.row}, {c}) is not a cell of the artifact")
        return self

    # -- lookup -------------------------------------------------------------------------------
    @property
    def paired_metrics(self) -> list[str]:
        return list(self.delta_metrics or self.metrics)

    @property
    def all_metrics(self) -> list[str]:
        """Every metric a table of this spec reads from a cell: the grid's and the deltas'."""
        return list(dict.fromkeys([*self.metrics, *self.delta_metrics]))

    def row(self, row_id: str) -> RowSpec:
        for r in self.rows:
            if r.id == row_id:
                return r
        raise BenchError(f"spec {self.name} has no row '{row_id}'; rows: {', '.join(r.id for r in self.rows)}")

    def column(self, column_id: str) -> ColumnSpec:
        for c in self.columns:
            if c.id == column_id:
                return c
        raise BenchError(f"spec {self.name} has no column '{column_id}'; "
                         f"columns: {', '.join(c.id for c in self.columns)}")

    def _r(self, row: RowSpec | str) -> RowSpec:
        return self.row(row) if isinstance(row, str) else row

    def _c(self, column: ColumnSpec | str) -> ColumnSpec:
        return self.column(column) if isinstance(column, str) else column

    def row_status(self, row: RowSpec | str) -> Literal["implemented", "paper-only"]:
        """implemented: the method has an adapter and the row needs nothing else we lack."""
        from core.methods import METHODS

        r = self._r(row)
        return "implemented" if r.method in METHODS and not r.paper_only else "paper-only"

    def in_artifact(self, row: RowSpec | str, column: ColumnSpec | str) -> bool:
        r, c = self._r(row), self._c(column)
        return r.only_columns is None or c.id in r.only_columns

    def cells(self, implemented_only: bool = False) -> list[tuple[RowSpec, ColumnSpec]]:
        """The artifact's (row, column) cells in spec order (row-major)."""
        return [(r, c) for r in self.rows for c in self.columns
                if self.in_artifact(r, c) and (not implemented_only or self.row_status(r) == "implemented")]

    # -- one cell -----------------------------------------------------------------------------
    def cell_overrides(self, row: RowSpec | str, column: ColumnSpec | str) -> dict[str, Any]:
        """Flat dotted-key overrides of one cell: method, column's, then row's (row wins)."""
        r, c = self._r(row), self._c(column)
        if not self.in_artifact(r, c):
            raise BenchError(f"({r.id}, {c.id}) is not a cell of {self.name}; row {r.id} has only {r.only_columns}")
        out: dict[str, Any] = {"method": r.method}
        out.update(c.overrides)
        out.update({k: _substitute(v, c.params) for k, v in r.overrides.items()})
        return out

    def cell_override_args(self, row: RowSpec | str, column: ColumnSpec | str) -> list[str]:
        """`cell_overrides` as `key=value` strings for `core.config.load_config`."""
        return [f"{k}={_yaml_value(v)}" for k, v in self.cell_overrides(row, column).items()]

    def cell_variant(self, row: RowSpec | str, column: ColumnSpec | str) -> str:
        """The row's CSV variant with the column's params filled in (Figure 5: alpha=0.5)."""
        r, c = self._r(row), self._c(column)
        return _PARAM.sub(lambda m: _yaml_value(c.params[m.group(1)]), r.variant)

    def paper(self, row: RowSpec | str, column: ColumnSpec | str, metric: str) -> tuple[float, float] | None:
        """(value, std) published for the cell, or None."""
        from bench.paper import paper_value

        r, c = self._r(row), self._c(column)
        if self.paper_table is None or not self.in_artifact(r, c):
            return None
        return paper_value(self.paper_table, c.setting, r.method, r.lsm, self.cell_variant(r, c), metric)

    def paper_absence(self, row: RowSpec | str, column: ColumnSpec | str) -> str | None:
        """Why the paper has no number for the cell, if the spec documents it."""
        r, c = self._r(row), self._c(column)
        for a in self.paper_absent:
            if a.row == r.id and c.id in a.columns:
                return a.reason
        return None


def _implemented() -> list[str]:
    from core.methods import METHODS

    return list(METHODS)


def known_methods() -> list[str]:
    """What a row's `method` may name: an implemented method, or one of the paper's (its values only)."""
    from bench.paper import paper_values

    return list(dict.fromkeys([*_implemented(), *sorted(set(paper_values()["method"]))]))


def _substitute(value: Any, params: dict[str, Any]) -> Any:
    """"${x}" alone -> the param itself (keeps its type); inside a longer string -> its text."""
    if isinstance(value, list):
        return [_substitute(v, params) for v in value]
    if not isinstance(value, str):
        return value
    whole = _PARAM.fullmatch(value)
    if whole:
        return params[whole.group(1)]
    return _PARAM.sub(lambda m: _yaml_value(params[m.group(1)]), value)


def _yaml_value(v: Any) -> str:
    """The text `parse_overrides` reads back as `v` (true, 0.5, [p3,p4], coco_additional)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ",".join(_yaml_value(x) for x in v) + "]"
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).splitlines()[0]


def available_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown field '{loc}'; remove it or fix its spelling"
    got = f" (got {first['input']!r})" if "input" in first and first["type"] != "value_error" else ""
    return f"{source}: invalid field '{loc}': {first['msg']}{got}"


def load_spec_file(path: Path) -> ArtifactSpec:
    """Parse and validate one spec file; every problem is a one-line BenchError naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise BenchError(f"cannot read spec file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise BenchError(f"spec file {path}: invalid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise BenchError(f"spec file {path}: expected a mapping with name, title, columns, rows, ...")
    try:
        spec = ArtifactSpec.model_validate(data)
    except ValidationError as err:
        raise BenchError(_format_error(err, f"spec file {path}")) from None
    if spec.name != path.stem:
        raise BenchError(f"spec file {path}: name '{spec.name}' must match the file name '{path.stem}'")
    return spec


def load_spec(name: str) -> ArtifactSpec:
    """The packaged spec `name` (table1 ... table6, figure5), or a spec file of one's own (*.yaml)."""
    if name.endswith((".yaml", ".yml")):
        return load_spec_file(Path(name))
    path = SPEC_DIR / f"{name}.yaml"
    if not path.is_file():
        raise BenchError(f"unknown table '{name}'; known tables: {', '.join(available_specs())} "
                         "(or the path of a spec .yaml file)")
    return load_spec_file(path)
