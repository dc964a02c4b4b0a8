"""The samples figure: a finished cell's teacher on a few unlabeled images, boxes by score band
(`bench figure samples`; drawing in bench/report/figures.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from core.errors import BenchError
from core.paths import find_run_dir


def find_teacher_cell(home: Path, preset: str) -> Path:
    """A finished ubteacher cell of `preset`: without LSM first, then the lowest ratio, seed, key."""
    found = []
    for path in sorted((home / "runs").glob("*/*/result.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (r.get("method") == "ubteacher" and r.get("stage", "full") == "full" and r.get("preset") == preset
                and (path.parent / "model_final.pth").exists()):
            found.append(((bool(r.get("lsm")), float(r.get("ratio", 0)), int(r.get("seed", 0)), path.parent.name),
                          path.parent))
    if not found:
        how = (f"`bench run {preset} --seeds 1`" if preset == "forest"
               else f"`bench train --method ubteacher --preset {preset}`")
        raise BenchError(f"no finished ubteacher cell of preset {preset} under {home / 'runs'}; run {how} first, "
                         "or pass --run DIR")
    return min(found)[1]


def samples_figure(home: Path, preset: str, run: Optional[str], images: int, min_score: float, out: Path,
                   command: str) -> tuple[Path, Path]:
    """The samples figure of a finished cell (--run, or `find_teacher_cell`): its first evaluated
    model (the teacher of a mean-teacher method) on `images` unlabeled images of its own split that
    have ground truth, evenly spread over the id order."""
    rdir = find_run_dir(run, home) if run else find_teacher_cell(home, preset)  # before the heavy imports

    import numpy as np
    import torch
    import yaml

    from adapters.base import get_adapter
    from adapters.engine.inference import run_inference
    from core.config import RunConfig
    from core.data.coco import load_image
    from core.data.sources import prepare_data
    from bench.report.figures import plot_samples, samples_frame, save
    from core.data.transforms import view_settings
    from bench.worker import resolve_device

    cfg = RunConfig.model_validate(yaml.safe_load((rdir / "config.yaml").read_text()))
    data = prepare_data(cfg.data, home)
    pool = [r for r in data.unlabeled.records if len(r.boxes)] or data.unlabeled.records
    if not pool:
        raise BenchError(f"cell {rdir.name[:12]} has no unlabeled images (data.ratio {cfg.data.ratio:g}); "
                         "pass --run with a cell below 100% labels")
    picks = [pool[i] for i in sorted({int(i) for i in np.linspace(0, len(pool) - 1, min(images, len(pool)))})]
    device = resolve_device(cfg.device)
    adapter = get_adapter(cfg.method)(cfg, data.num_classes, device)
    state = torch.load(rdir / "model_final.pth", map_location="cpu", weights_only=True)
    model_name, model = next(iter(adapter.eval_models().items()))
    model.load_state_dict(state[model_name])
    subset = data.unlabeled.subset([r.id for r in picks])
    dets = {d["image_id"]: d for d in run_inference(model, subset, view_settings(cfg.data.aug, False), device)}
    samples = []
    for r in subset.records:
        d = dets[r.id]
        keep = d["scores"] >= min_score
        samples.append({"image_id": r.id, "file": r.file, "image": np.asarray(load_image(r.file)), "gt": r.boxes,
                        "boxes": d["boxes"][keep].numpy(), "scores": d["scores"][keep].numpy()})
    alpha, t = cfg.lsm.alpha, cfg.semi.t
    label = cfg.method + (" + LSM" if cfg.lsm.enabled else "")
    title = (f"{model_name} of {label}, {cfg.data.ratio:g}% labels, seed {cfg.seed}, preset {cfg.preset} "
             f"(cell {rdir.name[:12]})\ndetections with score ≥ {min_score:g} on unlabeled images")
    fig = plot_samples(samples, alpha, t, title)
    data_frame = samples_frame(samples, alpha, t).assign(cell=rdir.name, model=model_name, alpha=alpha, t=t)
    out = Path(out)
    png = out if out.suffix.lower() == ".png" else out / f"samples_{cfg.preset}.png"
    return save(fig, data_frame, png, command, header={"preset": cfg.preset})
