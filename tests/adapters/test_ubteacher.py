"""Unbiased Teacher + LSM on the tiny configuration: the step's loss terms and the toggles."""


import pytest
import torch

from adapters.base import get_adapter
from adapters.engine.checkpoint import rng_state, set_rng_state
from bench.config import load_config
from bench.data.sources import prepare_data
from bench.errors import BenchError
from bench.worker import batch_stream, seed_everything


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from tests.conftest import TINY

    home = tmp_path_factory.mktemp("ubt")
    cfg = load_config("demo", TINY, method="ubteacher")
    data = prepare_data(cfg.data, home)
    return cfg, data


def _adapter(cfg, data, **lsm):
    cfg = cfg.model_copy(update={"lsm": cfg.lsm.model_copy(update=lsm)})
    seed_everything(cfg.seed)
    adapter = get_adapter("ubteacher")(cfg, data.num_classes, torch.device("cpu"))
    adapter.teacher.load_state_dict(adapter.student.state_dict())
    adapter.teacher.roi_heads.score_thresh = 0.0  # an untrained teacher: let it emit pseudo-labels
    return cfg, adapter


def _first_batch(cfg, adapter, data):
    """The batch of the first semi-supervised iteration (it has unlabeled images)."""
    return next(batch_stream(cfg, adapter, data, cfg.semi.burn_in))


def test_burn_in_step_is_supervised_on_both_views(setting):
    cfg, data = setting
    cfg, adapter = _adapter(cfg, data)
    out = adapter.training_step(0, _first_batch(cfg, adapter, data))
    assert set(out.losses) == {"loss_rpn_cls_sup", "loss_rpn_loc_sup", "loss_cls_sup", "loss_box_reg_sup"}


@pytest.mark.parametrize("mode,expected", [("train", 37), ("test", 11)])
def test_teacher_proposals_follow_the_train_time_rpn_settings(setting, mode, expected):
    """The original's teacher proposes with the RPN's train-time top-n (its RPN stays in training
    mode) while its RoI head runs inference; `semi.teacher_proposals=test` is a plain detection pass."""
    cfg, data = setting
    model = cfg.model.model_copy(update={"rpn_pre_nms_top_n_train": 400, "rpn_post_nms_top_n_train": 37,
                                         "rpn_pre_nms_top_n_test": 400, "rpn_post_nms_top_n_test": 11})
    cfg = cfg.model_copy(update={"model": model, "semi": cfg.semi.model_copy(update={"teacher_proposals": mode})})
    cfg, adapter = _adapter(cfg, data)
    counts = []
    rpn_forward = adapter.teacher.rpn.forward

    def counting(*args, **kwargs):
        boxes, losses = rpn_forward(*args, **kwargs)
        counts.extend(len(b) for b in boxes)
        return boxes, losses

    adapter.teacher.rpn.forward = counting
    batch = _first_batch(cfg, adapter, data)
    out = adapter.training_step(cfg.semi.burn_in, batch)
    assert counts == [expected] * cfg.solver.ims_per_batch_unlabeled  # the untrained RPN keeps > 37 after NMS
    assert not adapter.teacher.training and "loss_cls_unsup" in out.losses  # inference-mode RoI head


def test_lsm_off_gives_the_plain_unbiased_teacher_losses(setting):
    cfg, data = setting
    cfg_off, plain = _adapter(cfg, data, enabled=False)
    cfg_on, with_lsm = _adapter(cfg, data, enabled=True)
    batch = _first_batch(cfg_off, plain, data)
    state = rng_state()
    out_off = plain.training_step(cfg.semi.burn_in, batch)
    set_rng_state(state)
    out_on = with_lsm.training_step(cfg.semi.burn_in, batch)
    main_keys = {"loss_rpn_cls_sup", "loss_rpn_loc_sup", "loss_cls_sup", "loss_box_reg_sup",
                 "loss_rpn_cls_unsup", "loss_cls_unsup"}
    assert set(out_off.losses) == main_keys  # UBT: no box losses on pseudo-labels
    for k in main_keys:  # the main branch is untouched by LSM
        assert torch.equal(out_off.losses[k], out_on.losses[k]), k
    assert {"loss_pim_cls_unsup", "loss_pim_reg_unsup", "loss_sd", "loss_pim_cls_sup"} <= set(out_on.losses)
    assert out_on.metrics["pl_alpha_count_per_img"] >= out_on.metrics["pl_count_per_img"]
    total = sum(out_on.losses.values())
    total.backward()
    aux = with_lsm.student.roi_heads.aux_cls_score.weight.grad
    assert aux is not None and aux.abs().sum() > 0


def test_ignore_region_changes_only_the_unsupervised_classification(setting):
    """t 0.5 and alpha 0.05 put the untrained teacher's scores (~1/11) in (alpha, t]: no main
    pseudo-box, every RoI background for the main branch, and those on the alpha boxes ignored."""
    cfg, data = setting
    cfg = cfg.model_copy(update={"semi": cfg.semi.model_copy(update={"t": 0.5})})
    outs = {}
    for name, lsm in {"plain": {"enabled": False}, "off": {"enabled": True, "ignore_uncertain": False},
                      "on": {"enabled": True}}.items():
        cfg_x, adapter = _adapter(cfg, data, alpha=0.05, **lsm)
        batch = _first_batch(cfg_x, adapter, data)
        torch.manual_seed(7)
        outs[name] = adapter.training_step(cfg.semi.burn_in, batch)
    plain, off, on = (outs[k] for k in ("plain", "off", "on"))
    assert on.metrics["pl_count_per_img"] == 0 and on.metrics["pl_alpha_count_per_img"] > 0
    assert plain.metrics["pl_alpha_count_per_img"] == on.metrics["pl_alpha_count_per_img"]  # logged without LSM
    assert on.metrics["lsm_ignored_rois_per_img"] > 0 and "lsm_ignored_rois_per_img" not in off.metrics
    for k in plain.losses:
        assert torch.equal(plain.losses[k], off.losses[k]), k  # switch off: the old behaviour
        if k != "loss_cls_unsup":
            assert torch.equal(plain.losses[k], on.losses[k]), k
    assert not torch.equal(plain.losses["loss_cls_unsup"], on.losses["loss_cls_unsup"])


def test_naive_variant_is_refused_with_lsm():
    with pytest.raises(BenchError, match="set lsm.enabled=false"):
        load_config("demo", ["method=ubteacher", "lsm.enabled=true", "lsm.naive_large_area=true"])


def test_pim_only_and_weights(setting):
    cfg, data = setting
    cfg_on, adapter = _adapter(cfg, data, enabled=True, sd=False, pim_weight=0.0, pim_on_labeled=False)
    out = adapter.training_step(cfg.semi.burn_in, _first_batch(cfg_on, adapter, data))
    assert "loss_sd" not in out.losses and "loss_pim_cls_sup" not in out.losses
    assert out.losses["loss_pim_cls_unsup"].item() == 0.0  # pim_weight 0 switches the term off


def test_burn_in_beyond_training_is_refused(setting):
    cfg, data = setting
    bad = cfg.model_copy(update={"semi": cfg.semi.model_copy(update={"burn_in": 50})})
    with pytest.raises(BenchError, match="burn_in"):
        get_adapter("ubteacher")(bad, data.num_classes, torch.device("cpu"))


def test_unknown_and_planned_methods_are_named(monkeypatch):
    from adapters import base

    with pytest.raises(BenchError, match="known methods: supervised, ubteacher, softteacher, pseco, stac, ddetr"):
        get_adapter("ubteacherr")
    monkeypatch.setattr(base, "PLANNED_METHODS", ("mixpl",))  # a method of a later issue
    with pytest.raises(BenchError, match="method 'mixpl' is not implemented yet"):
        get_adapter("mixpl")
