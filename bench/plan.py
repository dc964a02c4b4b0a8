"""A paper artifact's cells: spec rows x columns x seeds -> configs, content keys, cache status.

A cell's key is `bench.keys.cell_key` (config + split manifest + data hash + method code
version), so `plan` answers "what is done" without running anything, and `run` recomputes only
what is not. Seed i trains with seed i on split fold i: the paper's 5 runs are 5 folds.
Cells that share a burn-in (bench/burn_in.py) depend on a burn-in cell, listed before them;
`start_cell` is the one place that says which cell a cell starts from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from bench.burn_in import burn_in_config
from core.config import RunConfig, load_config, preset_planning, preset_table_ratios
from core.methods import upstream
from core.data.sources import prepare_data
from core.paths import RunDir, read_result, run_dir
from bench.keys import cell_key
from bench.teacher import teacher_config

# Columns that change the data setting cannot run on the synthetic demo data.
_SETTING_KEYS = ("data.setting", "data.dataset", "data.unlabeled")
# A column whose labeled split has fewer images than this per class is left out unless its ratio
# is asked for by name (--ratios); a preset's `table_ratios` narrows the default columns further.
MIN_LABELED_PER_CLASS = 2


@dataclass
class Cell:
    row_id: str
    column_id: str
    seed: int
    config: RunConfig
    key: str
    depends_on: str | None = None  # key of the cell this one starts from: its burn-in or its teacher

    BURN_IN_ROW = "burn-in"
    TEACHER_ROW = "teacher"

    @property
    def is_burn_in(self) -> bool:
        return self.config.stage == "burn_in"

    @property
    def is_start(self) -> bool:
        """A burn-in or a teacher planned only as other cells' start: no cell of the table."""
        return self.row_id in (self.BURN_IN_ROW, self.TEACHER_ROW)

    @property
    def iterations(self) -> int:
        """The iteration this cell's training ends at."""
        return self.config.semi.burn_in if self.is_burn_in else self.config.solver.max_iter

    @property
    def starts_after_burn_in(self) -> bool:
        return self.depends_on is not None and upstream(self.config) == "burn_in"

    @property
    def work(self) -> int:
        """Iterations this cell trains itself (a cell with a shared burn-in starts after it)."""
        return self.iterations - (self.config.semi.burn_in if self.starts_after_burn_in else 0)

    def directory(self, home: Path) -> Path:
        return run_dir(home, self.key)

    def start_from(self, home: Path) -> Path | None:
        """The directory of the cell this one starts from, handed to its worker."""
        return run_dir(home, self.depends_on) if self.depends_on else None

    def run_dir(self, home: Path) -> RunDir:
        """The cell's run directory with its files and status."""
        return RunDir(self.directory(home))

    def status(self, home: Path) -> str:
        """done | corrupt | failed | running | partial | pending (`core.paths.RunDir.status`)."""
        return self.run_dir(home).status()


class StartCell(NamedTuple):
    """The cell another one starts from: its shared burn-in or STAC's supervised teacher."""
    row_id: str  # Cell.BURN_IN_ROW or Cell.TEACHER_ROW
    config: RunConfig
    key: str


def start_cell(cfg: RunConfig, data) -> StartCell | None:
    """The cell `cfg` starts from, on its prepared `data`, or None. The planner, `bench train` and
    the studies ask here; the worker only receives the directory (its `start_from`)."""
    if (bcfg := burn_in_config(cfg)) is not None:
        return StartCell(Cell.BURN_IN_ROW, bcfg, cell_key(bcfg, data))
    if (tcfg := teacher_config(cfg)) is not None:
        return StartCell(Cell.TEACHER_ROW, tcfg, cell_key(tcfg, data))
    return None


def seconds_per_iteration(home: Path) -> dict[tuple, float]:
    """Measured training speed of the finished cells in `home`, by (preset, method, lsm, stage)."""
    speeds: dict[tuple, list[float]] = {}
    for path in Path(home).glob("runs/*/*/result.json"):
        try:
            r = read_result(path)
            first = r["iterations"] - (0 if not r.get("burn_in_from") else _burn_in_of(path.parent))
            if r.get("train_seconds_this_session") and first > 0:
                kind = (r["preset"], r["method"], r["lsm"], r.get("stage", "full"))
                speeds.setdefault(kind, []).append(r["train_seconds_this_session"] / first)
        except Exception:  # an unreadable result.json or config.yaml: `bench status` names it; no timing
            continue
    return {k: sorted(v)[len(v) // 2] for k, v in speeds.items()}


def reference_seconds_per_iteration(preset: str) -> dict[tuple, float]:
    """The preset's own timings (`reference_seconds_per_iteration`: "method[+lsm][:burn_in]" ->
    seconds, measured on the machine the preset names), keyed like `seconds_per_iteration`: the
    estimate of a fresh store, before any cell of a kind has finished."""
    out = {}
    for kind, seconds in (preset_planning(preset, "reference_seconds_per_iteration") or {}).items():
        name, _, stage = str(kind).partition(":")
        method, _, lsm = name.partition("+")
        out[(preset, method, lsm == "lsm", stage or "full")] = float(seconds)
    return out


def _burn_in_of(rdir: Path) -> int:
    import yaml

    return yaml.safe_load((rdir / "config.yaml").read_text())["semi"]["burn_in"]


def estimate_seconds(cell: Cell, speeds: dict[tuple, float]) -> float | None:
    """Training time left for a cell that is not done, from finished cells of its kind (None if none)."""
    cfg = cell.config
    speed = speeds.get((cfg.preset, cfg.method, cfg.lsm.enabled, cfg.stage))
    if speed is None:
        return None
    return speed * cell.work


def too_few_labels(data) -> bool:
    """A labeled split too small to compare methods on (fewer than MIN_LABELED_PER_CLASS per class)."""
    return len(data.labeled.records) < MIN_LABELED_PER_CLASS * data.num_classes


def build_plan(spec, preset: str, seeds: int, home: Path, ratios: list[float] | None = None,
               overrides: list[str] | None = None) -> tuple[list[Cell], list[str]]:
    """(burn-in cells + cells of the implemented rows, notes on what was skipped and why)."""
    base = load_config(preset, overrides or [])
    default_ratios = None if ratios else preset_table_ratios(preset)
    notes, cells, data_cache, starts = [], [], {}, {}
    for row in spec.rows:
        if spec.row_status(row) != "implemented":
            notes.append(f"row {row.id}: method {row.method} not implemented, paper values only")
    skipped_columns = set()
    for row, col in spec.cells(implemented_only=True):
        if base.data.dataset == "synthetic" and any(k in col.overrides for k in _SETTING_KEYS):
            if col.id not in skipped_columns:
                notes.append(f"column {col.id}: needs real data ({col.setting}), not available on preset {preset}")
                skipped_columns.add(col.id)
            continue
        ratio = col.overrides.get("data.ratio")
        if ratios and ratio is not None and float(ratio) not in ratios:
            continue
        if default_ratios and ratio is not None and float(ratio) not in default_ratios:
            if col.id not in skipped_columns:
                notes.append(f"column {col.id}: not among preset {preset}'s table ratios "
                             f"({', '.join(f'{r:g}' for r in default_ratios)}); run it with --ratios {ratio:g}")
                skipped_columns.add(col.id)
            continue
        for seed in range(1, seeds + 1):
            args = (overrides or []) + spec.cell_override_args(row, col) + [f"data.fold={seed}", f"seed={seed}"]
            cfg = load_config(preset, args)
            data_key = cfg.data.model_dump_json()
            if data_key not in data_cache:
                data_cache[data_key] = prepare_data(cfg.data, home)
            data = data_cache[data_key]
            n_labeled, n_classes = len(data.labeled.records), data.num_classes
            if not ratios and too_few_labels(data):
                if col.id not in skipped_columns:
                    fix = f"run it anyway with --ratios {ratio:g}" if ratio is not None else "use a larger data set"
                    notes.append(f"column {col.id}: {n_labeled} labeled images for {n_classes} classes on preset "
                                 f"{preset}, too few to compare methods; {fix}")
                    skipped_columns.add(col.id)
                break
            cell = Cell(row.id, col.id, seed, cfg, cell_key(cfg, data))
            if (start := start_cell(cfg, data)) is not None:
                cell.depends_on = start.key
                starts.setdefault(start.key, Cell(start.row_id, col.id, seed, start.config, start.key))
            cells.append(cell)
    # a burn-in or teacher is needed while one of its cells is not done; one that is a cell of the
    # table already (STAC's teacher = the Supervised row's cell) is not planned twice
    planned = {c.key for c in cells}
    needed = {c.depends_on for c in cells if c.depends_on and c.status(home) != "done"}
    return [b for k, b in starts.items()
            if k not in planned and (k in needed or b.status(home) == "done")] + cells, notes
