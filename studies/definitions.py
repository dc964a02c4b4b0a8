"""What each study searches and how a trial becomes a cell configuration.

A definition is plain data (`to_dict` / `from_dict`) stored in the study's user attrs, so a worker
process started with only the study's name and storage rebuilds the same search, sampler and
configurations, and a rerun with different settings is refused instead of mixing two studies.

- figure5 (one study per curve, paper Figure 5): GridSampler over {t or alpha} x seed. The cells
  are exactly `bench run figure5`'s (same spec overrides, seed i on fold i), so the two commands
  share their cache.
- table5: GridSampler over {Table 5 row} x seed, the rows of bench/specs/table5.yaml (baseline,
  naive large-area, the PIM level subsets), same cells as `bench run table5`.
- tune: TPE over t (and with LSM: alpha, pim_levels, pim_weight, sd_weight), median pruning on the
  periodic evaluation AP. t and alpha ranges do not overlap, so alpha <= t always holds (the
  config refuses alpha > t) and TPE's multivariate model sees one fixed search space.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna

from core.config import RunConfig, load_config
from core.errors import BenchError

KINDS = ("figure5", "table5", "tune")
FIGURE5_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FIGURE5_CURVES = {"ubteacher": "t", "ubteacher_lsm": "alpha"}  # spec row -> the threshold it moves
FIGURE5_PROBE_COLUMN = "thr_0.5"  # a figure5 column both rows have; its threshold param is replaced

# tune: (low, high, log) per parameter; alpha's range ends where t's begins (alpha <= t).
TUNE_T_ALONE = (0.3, 0.95, False)
TUNE_RANGES = {"t": (0.6, 0.95, False), "alpha": (0.3, 0.6, False),
               "pim_weight": (0.1, 2.0, True), "sd_weight": (0.05, 1.0, True)}
PIM_LEVEL_CHOICES = ("p2,p3", "p2,p4", "p3,p4", "p2,p3,p4")
STUDY_RATIOS = (1, 2, 5, 10, 20, 50)  # the paper's ablations use 1%; larger ones for small presets (<100: unlabeled left)


@dataclass(frozen=True)
class StudyDef:
    kind: str
    name: str
    preset: str = "demo"
    overrides: tuple[str, ...] = ()
    seeds: int = 1  # grid studies: seeds 1..seeds (seed i = fold i)
    seed: int = 1  # tune: the training seed (and fold) of every trial
    curve: str = ""  # figure5: ubteacher | ubteacher_lsm
    grid: tuple[float, ...] = ()  # figure5 thresholds
    rows: tuple[str, ...] = ()  # table5 rows
    method: str = "ubteacher"  # tune
    lsm: bool = False  # tune
    trials: int = 0  # tune: trials to settle (complete, pruned or failed)
    sampler_seed: int = 0
    ratio: float | None = None  # figure5 / table5: labeled % instead of the spec's 1% (None: the spec's)
    extra: dict = field(default_factory=dict, compare=False)

    # -- identity ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return json.loads(json.dumps(d))  # tuples -> lists, as the storage keeps them

    @classmethod
    def from_dict(cls, d: dict) -> "StudyDef":
        d = dict(d)
        for k in ("overrides", "grid", "rows"):
            d[k] = tuple(d.get(k, ()))
        return cls(**d)

    def identity(self) -> str:
        """What must not change when a study is continued (trials/seeds may grow)."""
        d = self.to_dict()
        for k in ("trials", "seeds", "grid", "rows"):  # a grid may grow: its done cells are cached
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def is_grid(self) -> bool:
        return self.kind in ("figure5", "table5")

    @property
    def prunes(self) -> bool:
        return self.kind == "tune"

    # -- sampler / pruner -------------------------------------------------------------------------
    def search_space(self) -> dict[str, list]:
        seeds = list(range(1, self.seeds + 1))
        if self.kind == "figure5":
            return {FIGURE5_CURVES[self.curve]: list(self.grid), "seed": seeds}
        if self.kind == "table5":
            return {"row": list(self.rows), "seed": seeds}
        raise ValueError("tune has no grid")

    def sampler(self, worker_index: int = 0) -> optuna.samplers.BaseSampler:
        """Explicit arguments: a changed Optuna default must not change a study."""
        if self.is_grid:
            # One seed for every worker: the grid's shuffled order must agree across processes.
            return optuna.samplers.GridSampler(self.search_space(), seed=self.sampler_seed)
        return optuna.samplers.TPESampler(n_startup_trials=10, n_ei_candidates=24, seed=self.sampler_seed + worker_index,
                                          multivariate=True, group=False, constant_liar=True)

    def pruner(self) -> optuna.pruners.BasePruner:
        if not self.prunes:
            return optuna.pruners.NopPruner()
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0, interval_steps=1, n_min_trials=1)

    # -- trial -> configuration -------------------------------------------------------------------
    def config_for(self, trial: optuna.Trial) -> RunConfig:
        """Suggest the trial's parameters and return the cell configuration they give."""
        if self.kind == "figure5":
            param = FIGURE5_CURVES[self.curve]
            value = trial.suggest_float(param, min(self.grid), max(self.grid))
            seed = trial.suggest_int("seed", 1, self.seeds)
            return figure5_config(self.preset, list(self.overrides), self.curve, value, seed, self.ratio)
        if self.kind == "table5":
            row = trial.suggest_categorical("row", list(self.rows))
            seed = trial.suggest_int("seed", 1, self.seeds)
            return table5_config(self.preset, list(self.overrides), row, seed, self.ratio)
        args = list(self.overrides)
        if self.lsm:
            args += ["lsm.enabled=true",
                     f"semi.t={_suggest(trial, 't', TUNE_RANGES['t'])}",
                     f"lsm.alpha={_suggest(trial, 'alpha', TUNE_RANGES['alpha'])}",
                     f"lsm.pim_levels=[{trial.suggest_categorical('pim_levels', list(PIM_LEVEL_CHOICES))}]",
                     f"lsm.pim_weight={_suggest(trial, 'pim_weight', TUNE_RANGES['pim_weight'])}",
                     f"lsm.sd_weight={_suggest(trial, 'sd_weight', TUNE_RANGES['sd_weight'])}"]
        else:
            args += ["lsm.enabled=false", f"semi.t={_suggest(trial, 't', TUNE_T_ALONE)}"]
        return load_config(self.preset, args + [f"data.fold={self.seed}"], method=self.method, seed=self.seed)


def _suggest(trial: optuna.Trial, name: str, rng: tuple[float, float, bool]) -> float:
    low, high, log = rng
    return trial.suggest_float(name, low, high, log=log)


def figure5_config(preset: str, overrides: list[str], curve: str, threshold: float, seed: int,
                   ratio: float | None = None) -> RunConfig:
    """The figure5 spec's cell at any threshold (the spec's grid is 0.3-0.9; ours may differ)."""
    from bench.specs import load_spec

    spec = load_spec("figure5")
    column = spec.column(FIGURE5_PROBE_COLUMN).model_copy(update={"params": {"threshold": threshold}})
    args = overrides + spec.cell_override_args(spec.row(curve), column) + _cell_args(seed, ratio)
    return load_config(preset, args)


def table5_config(preset: str, overrides: list[str], row: str, seed: int, ratio: float | None = None) -> RunConfig:
    from bench.specs import load_spec

    spec = load_spec("table5")
    column = spec.columns[0]
    args = overrides + spec.cell_override_args(spec.row(row), column) + _cell_args(seed, ratio)
    return load_config(preset, args)


def _cell_args(seed: int, ratio: float | None) -> list[str]:
    return [f"data.fold={seed}", f"seed={seed}"] + ([f"data.ratio={ratio:g}"] if ratio is not None else [])


def study_ratio(preset: str, overrides: list[str], home: Path, ratio: float | None) -> tuple[float | None, list[str]]:
    """The labeled ratio of the ablation studies: the paper's 1% (None), `ratio` when given, else on a
    preset whose 1% split has too few labels to compare anything (bench/plan.py's rule: 1% of a small
    synthetic set) the smallest of STUDY_RATIOS that has enough, with a note saying so."""
    from core.data.sources import prepare_data
    from bench.plan import MIN_LABELED_PER_CLASS, too_few_labels

    if ratio is not None:
        if not 0 < ratio <= 100:
            raise BenchError(f"--ratio is a percentage of the training images in (0, 100], got {ratio:g}")
        return ratio, []
    first = None
    for r in STUDY_RATIOS:
        data = prepare_data(load_config(preset, list(overrides) + [f"data.ratio={r:g}"]).data, home)
        first = first or (len(data.labeled.records), data.num_classes)
        if not too_few_labels(data):
            if r == STUDY_RATIOS[0]:
                return None, []
            return r, [f"1% labels is {first[0]} images for {first[1]} classes on preset {preset} (fewer than "
                       f"{MIN_LABELED_PER_CLASS} per class): the study trains on {r:g}% instead; --ratio sets it"]
    raise BenchError(f"preset {preset} has too few images for a study: {STUDY_RATIOS[-1]}% gives fewer than "
                     f"{MIN_LABELED_PER_CLASS} labeled images per class; use a larger data set or pass --ratio")


# -- constructors used by the CLI ------------------------------------------------------------------
def figure5_defs(preset: str, overrides: list[str], seeds: int, grid: list[float] | None = None,
                 name: str | None = None, ratio: float | None = None) -> tuple[list[StudyDef], list[str]]:
    """One grid study per curve; (definitions, notes on grid points left out)."""
    grid = sorted(set(grid or FIGURE5_GRID))
    if not grid or any(not 0 <= g <= 1 for g in grid):
        raise BenchError(f"--grid values must lie in [0, 1], got {grid}")
    _check_seeds(seeds)
    base = name or f"figure5-{preset}"
    notes, defs = [], []
    for curve in FIGURE5_CURVES:
        values = list(grid)
        if curve == "ubteacher_lsm":
            t = figure5_config(preset, list(overrides), curve, min(grid), 1, ratio).semi.t
            dropped = [g for g in values if g > t]
            values = [g for g in values if g <= t]
            if dropped:
                notes.append(f"{curve}: alpha {', '.join(f'{g:g}' for g in dropped)} left out (alpha must not exceed t = {t:g})")
            if not values:
                continue
        else:  # fail early on a bad override rather than in the first trial
            figure5_config(preset, list(overrides), curve, values[0], 1, ratio)
        defs.append(StudyDef("figure5", f"{base}-{curve}", preset, tuple(overrides), seeds, curve=curve,
                             grid=tuple(values), ratio=ratio))
    return defs, notes


def table5_def(preset: str, overrides: list[str], seeds: int, rows: list[str] | None = None,
               name: str | None = None, ratio: float | None = None) -> StudyDef:
    from bench.specs import load_spec

    spec = load_spec("table5")
    rows = rows or [r.id for r in spec.rows if spec.row_status(r) == "implemented"]
    for r in rows:
        spec.row(r)  # BenchError naming the known rows
    _check_seeds(seeds)
    table5_config(preset, list(overrides), rows[0], 1, ratio)
    return StudyDef("table5", name or f"table5-{preset}", preset, tuple(overrides), seeds, rows=tuple(rows),
                    ratio=ratio)


def tune_def(preset: str, overrides: list[str], method: str, lsm: bool, trials: int, seed: int = 1,
             sampler_seed: int = 0, name: str | None = None) -> StudyDef:
    if trials < 1:
        raise BenchError(f"--trials must be at least 1, got {trials}")
    probe = load_config(preset, list(overrides), method=method, seed=seed)
    overrides = list(overrides)
    if probe.solver.eval_period == 0 or probe.solver.eval_period >= probe.solver.max_iter:
        # Median pruning compares trials at the same evaluation steps: four per run.
        overrides.append(f"solver.eval_period={max(1, probe.solver.max_iter // 4)}")
    default = f"tune-{method}{'-lsm' if lsm else ''}-{preset}"
    d = StudyDef("tune", name or default, preset, tuple(overrides), seed=seed, method=method, lsm=lsm,
                 trials=trials, sampler_seed=sampler_seed)
    d.config_for(optuna.trial.FixedTrial(_midpoints(lsm)))  # a bad override fails here, not in trial 0
    return d


def _midpoints(lsm: bool) -> dict:
    if not lsm:
        return {"t": sum(TUNE_T_ALONE[:2]) / 2}
    mids = {k: (lo + hi) / 2 for k, (lo, hi, _) in TUNE_RANGES.items()}
    return {**mids, "pim_levels": PIM_LEVEL_CHOICES[-1]}


def _check_seeds(seeds: int) -> None:
    if seeds < 1:
        raise BenchError(f"--seeds must be at least 1, got {seeds}")
