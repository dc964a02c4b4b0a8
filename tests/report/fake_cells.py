"""Done cells without training: a planned table's result.json files written by hand.

`bench report`, `bench figure deltas` and the parent run read nothing else of a cell, so a test can
put numbers it computes by hand into a store in a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import TINY

MINI = Path(__file__).parent / "mini.yaml"
RATIOS = [1.0, 5.0]  # named: the tiny data's splits are too small for the preset's default ratios
SIZES = ("AP", "APs", "APm", "APl")


def mini_by_size(tmp_path: Path) -> Path:
    """mini.yaml with its deltas paired by object size too (as table1): a spec file in tmp_path."""
    spec = yaml.safe_load(MINI.read_text())
    spec["delta_metrics"] = list(SIZES)
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def plan(spec_path: Path, home: Path, seeds: int):
    from bench.plan import build_plan
    from bench.specs import load_spec_file

    spec = load_spec_file(spec_path)
    cells, notes = build_plan(spec, "demo", seeds, home, RATIOS, list(TINY))
    return spec, cells, notes


def mark_done(cells, home: Path, values: dict[tuple[str, str, int], dict[str, float]],
              run_ids: dict[tuple[str, str, int], str] | None = None) -> None:
    """`values[(row_id, column_id, seed)]`: the metrics of that cell's reported model."""
    for c in cells:
        key = (c.row_id, c.column_id, c.seed)
        if key not in values:
            continue
        d = c.directory(home)
        d.mkdir(parents=True, exist_ok=True)
        (d / "result.json").write_text(json.dumps({
            "key": c.key, "method": c.config.method, "stage": "full", "lsm": c.config.lsm.enabled,
            "preset": "demo", "ratio": c.config.data.ratio, "seed": c.seed, "iterations": c.iterations,
            "primary_model": "teacher", "mlflow_run_id": (run_ids or {}).get(key),
            "metrics": {"teacher": dict(values[key])}}))
