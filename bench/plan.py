"""A paper artifact's cells: spec rows x columns x seeds -> configs, content keys, cache status.

A cell's key is the worker's `cell_key` (config + split manifest + data hash + method code
version), so `plan` answers "what is done" without running anything, and `run` recomputes only
what is not. Seed i trains with seed i on split fold i: the paper's 5 runs are 5 folds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.config import RunConfig, load_config
from bench.data.sources import prepare_data
from bench.paths import run_dir
from bench.worker import cell_key

# Columns that change the data setting cannot run on the synthetic demo data.
_SETTING_KEYS = ("data.setting", "data.dataset", "data.unlabeled")


@dataclass
class Cell:
    row_id: str
    column_id: str
    seed: int
    config: RunConfig
    key: str

    def directory(self, home: Path) -> Path:
        return run_dir(home, self.key)

    def status(self, home: Path) -> str:
        """done | failed | partial (a checkpoint to resume from) | pending."""
        d = self.directory(home)
        if (d / "result.json").exists():
            return "done"
        if (d / "failed.json").exists():
            return "failed"
        if (d / "checkpoints" / "last_checkpoint").exists():
            return "partial"
        return "pending"


def build_plan(spec, preset: str, seeds: int, home: Path, ratios: list[float] | None = None,
               overrides: list[str] | None = None) -> tuple[list[Cell], list[str]]:
    """(cells of the implemented rows, notes on what was skipped and why)."""
    base = load_config(preset, overrides or [])
    notes, cells, data_cache = [], [], {}
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
        for seed in range(1, seeds + 1):
            args = (overrides or []) + spec.cell_override_args(row, col) + [f"data.fold={seed}", f"seed={seed}"]
            cfg = load_config(preset, args)
            data_key = cfg.data.model_dump_json()
            if data_key not in data_cache:
                data_cache[data_key] = prepare_data(cfg.data, home)
            cells.append(Cell(row.id, col.id, seed, cfg, cell_key(cfg, data_cache[data_key])))
    return cells, notes
