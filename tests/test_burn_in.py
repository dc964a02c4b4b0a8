"""Shared burn-in: which cells share one, and a cell started from it equals the cell trained alone."""

import json

import pytest
import torch

from adapters.base import get_adapter
from adapters.engine.checkpoint import load_named_training_state, named_training_state
from adapters.engine.solver import build_optimizer, build_scheduler
from adapters.lsm import attach_aux_classifier
from bench.burn_in import burn_in_config
from core.config import load_config
from core.data.sources import prepare_data
from core.paths import run_dir
from bench.keys import cell_key
from bench.worker import run_cell


def _cfg(tiny, *extra, method="ubteacher"):
    return load_config("demo", tiny + list(extra), method=method)


def test_semi_settings_share_a_burn_in_and_training_settings_do_not(tiny):
    base = burn_in_config(_cfg(tiny))
    for variant in (["lsm.enabled=true"], ["semi.t=0.6", "lsm.enabled=true", "lsm.alpha=0.4"],
                    ["semi.lambda_u=2"], ["semi.ema_keep_rate=0.5"], ["solver.eval_period=2"]):
        assert burn_in_config(_cfg(tiny, *variant)) == base, variant
    # eval.area_scale: the size bins of the burn-in's own evaluation (a property of the data)
    for variant in (["seed=2"], ["data.ratio=10"], ["data.fold=2"], ["semi.burn_in=3"], ["solver.base_lr=0.03"],
                    ["model.roi_batch_size_per_image=8"], ["eval.area_scale=2"]):
        assert burn_in_config(_cfg(tiny, *variant)) != base, variant
    assert base.stage == "burn_in" and not base.lsm.enabled
    assert burn_in_config(_cfg(tiny, method="supervised")) is None  # no burn-in to share
    assert burn_in_config(_cfg(tiny, "semi.burn_in=0")) is None


@pytest.mark.parametrize("method", ["softteacher", "pseco"])
def test_a_teacher_averaged_from_the_start_keeps_its_ema_settings_in_the_burn_in(tiny, method):
    """With `ema_from_start` the burn-in trains the teacher too: its EMA rate and warm-up are part of the
    burn-in; without it they are not, and the cells keep the keys they had before the setting existed."""
    copy_at_burn_in = _cfg(tiny, f"{method}.ema_from_start=false", method=method)
    assert "ema_from_start" not in copy_at_burn_in.key_dict()[method]
    # its burn-in is the copy's too (the key it had before the setting existed), not the default's
    assert getattr(burn_in_config(copy_at_burn_in), method).ema_from_start is False
    assert "ema_from_start" not in burn_in_config(copy_at_burn_in).key_dict()[method]
    assert burn_in_config(_cfg(tiny, f"{method}.ema_from_start=false", "semi.ema_keep_rate=0.5", method=method)) \
        == burn_in_config(copy_at_burn_in)
    averaged = burn_in_config(_cfg(tiny, f"{method}.ema_from_start=true", method=method))
    assert averaged != burn_in_config(copy_at_burn_in)
    for variant in (["semi.ema_keep_rate=0.5"], [f"{method}.ema_warm_up=100"]):
        assert burn_in_config(_cfg(tiny, f"{method}.ema_from_start=true", *variant, method=method)) != averaged
    assert burn_in_config(_cfg(tiny, f"{method}.ema_from_start=true", "semi.t=0.6", "lsm.enabled=true",
                               method=method)) == averaged  # still shared by the semi-supervised settings


def test_aux_classifier_leaves_the_global_rng_alone(tiny):
    cfg = _cfg(tiny)
    model = get_adapter("supervised")(cfg, 10, torch.device("cpu")).student
    torch.manual_seed(5)
    attach_aux_classifier(model)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_named_state_loads_into_a_model_with_extra_parameters(tiny):
    """Momentum buffers follow their parameters by name, whatever their position."""
    cfg = _cfg(tiny)
    src = get_adapter("supervised")(cfg, 10, torch.device("cpu")).student
    opt = build_optimizer(src.parameters(), cfg.solver)
    for p in src.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    sched = build_scheduler(opt, cfg.solver)
    sched.step()
    state = named_training_state(src, opt, sched, torch.amp.GradScaler("cuda", enabled=False))

    dst = get_adapter("supervised")(cfg, 10, torch.device("cpu")).student
    attach_aux_classifier(dst)
    opt2 = build_optimizer(dst.parameters(), cfg.solver)
    sched2 = build_scheduler(opt2, cfg.solver)
    load_named_training_state(state, dst, opt2, sched2, torch.amp.GradScaler("cuda", enabled=False),
                              new_prefixes=("roi_heads.aux_cls_score.",))
    src_params, dst_params = dict(src.named_parameters()), dict(dst.named_parameters())
    for name, p in src_params.items():
        assert torch.equal(p, dst_params[name])
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[dst_params[name]]["momentum_buffer"]), name
    assert dst_params["roi_heads.aux_cls_score.weight"] not in opt2.state
    assert sched2.last_epoch == sched.last_epoch

    with pytest.raises(KeyError, match="does not match"):  # a parameter missing elsewhere is refused
        load_named_training_state(state, dst, opt2, sched2, torch.amp.GradScaler("cuda", enabled=False))


@pytest.mark.parametrize("lsm, extra", [(False, []), (True, []), (True, ["solver.eval_period=1"])])
def test_cell_started_from_shared_burn_in_equals_cell_trained_alone(tmp_path, tiny, lsm, extra):
    """(with periodic evaluation, the cell trained alone also evaluates during its burn-in)"""
    cfg = _cfg(tiny, f"lsm.enabled={str(lsm).lower()}", *extra)
    alone = run_cell(cfg, tmp_path / "a", track=False, progress=False)
    assert alone["burn_in_from"] is None

    shared_home = tmp_path / "b"
    bcfg = burn_in_config(cfg)
    burn = run_cell(bcfg, shared_home, track=False, progress=False)
    assert burn["stage"] == "burn_in" and burn["iterations"] == cfg.semi.burn_in
    # the student it hands over is evaluated as a teacher (and that changes nothing downstream)
    assert {"AP", "cover_0.7", "precision_0.9", "cover_0.5_small"} <= set(burn["burn_in_teacher"])
    assert "metrics" not in burn
    shared = run_cell(cfg, shared_home, start_from=run_dir(shared_home, burn["key"]), track=False, progress=False)
    assert shared["burn_in_from"] == burn["key"]
    assert shared["key"] == alone["key"]

    def final(home, key):
        return torch.load(run_dir(home, key) / "model_final.pth", weights_only=True)

    a, b = final(tmp_path / "a", alone["key"]), final(shared_home, shared["key"])
    for model in a:
        for k in a[model]:
            assert torch.equal(a[model][k], b[model][k]), (model, k)
    assert json.dumps(shared["metrics"], sort_keys=True) == json.dumps(alone["metrics"], sort_keys=True)
    # the done cells keep their outputs, not their resume checkpoints
    assert not (run_dir(shared_home, shared["key"]) / "checkpoints").exists()
    assert (run_dir(shared_home, burn["key"]) / "burn_in.pth").exists()


def test_burn_in_key_differs_from_the_full_cells(tmp_path, tiny):
    cfg = _cfg(tiny)
    data = prepare_data(cfg.data, tmp_path)
    assert cell_key(burn_in_config(cfg), data) != cell_key(cfg, data)


def test_planning_a_table_does_not_import_torch():
    """`bench plan` and a fully cached `bench run` stay fast: keys, burn-in configs and specs come
    from plain data (core/methods.py, bench/keys.py), not from the adapters' modules."""
    import subprocess
    import sys

    code = ("import sys, bench.plan, bench.runner, bench.burn_in, bench.specs, bench.report.tables; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_burn_in_without_its_weights_is_trained_through(tmp_path, tiny):
    """A burn-in cell imported from an archive (bench/archive.py) has its result but no checkpoint:
    its dependants train from iteration 0 and reach the result they reach alone."""
    import shutil

    cfg = _cfg(tiny)
    alone = run_cell(cfg, tmp_path / "a", track=False, progress=False)
    home = tmp_path / "b"
    burn = run_cell(burn_in_config(cfg), home, track=False, progress=False)
    (run_dir(home, burn["key"]) / "burn_in.pth").unlink()
    shutil.rmtree(tmp_path / "a")
    again = run_cell(cfg, home, start_from=run_dir(home, burn["key"]), track=False, progress=False)
    assert again["burn_in_from"] is None
    assert json.dumps(again["metrics"], sort_keys=True) == json.dumps(alone["metrics"], sort_keys=True)
