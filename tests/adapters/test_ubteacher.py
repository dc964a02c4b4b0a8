"""Unbiased Teacher + LSM on the tiny configuration: the step's loss terms and the toggles."""


import pytest
import torch

from adapters.base import get_adapter
from adapters.engine.checkpoint import rng_state, set_rng_state
from core.config import load_config
from core.data.sources import prepare_data
from core.errors import BenchError
from bench.worker import batch_stream, seed_everything
from tests.adapters.teacher_proposals import count_teacher_proposals, with_teacher_proposals


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
    cfg, adapter = _adapter(with_teacher_proposals(cfg, mode), data)
    counts = count_teacher_proposals(adapter)
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


def test_an_unknown_method_is_named_with_the_known_ones():
    with pytest.raises(BenchError, match="unknown method 'ubteacherr'; known methods: supervised, ubteacher, "
                                         "softteacher, pseco, stac, ddetr"):
        get_adapter("ubteacherr")


# ------------------------------------------------------------------ the protocol, step by step
def test_burn_in_step_trains_on_both_labeled_views(setting):
    """UBT's burn-in forwards the labeled strong and weak views together (2 x the labeled batch)."""
    cfg, data = setting
    cfg, adapter = _adapter(cfg, data)
    batch = next(batch_stream(cfg, adapter, data, 0))
    seen = []
    forward = adapter.student.train_forward
    adapter.student.train_forward = lambda images, targets: seen.append((images, targets)) or forward(images, targets)
    adapter.training_step(0, batch)
    (images, targets), = seen
    n = cfg.solver.ims_per_batch_labeled
    assert len(images) == 2 * n
    for i, item in enumerate(batch["labeled"]):
        assert torch.equal(images[i], item["views"]["strong"].image)
        assert torch.equal(images[n + i], item["views"]["weak"].image)
        assert torch.equal(targets[n + i]["boxes"], item["views"]["weak"].boxes)
    # the two views differ in pixels (photometric strong view), not in boxes
    assert not torch.equal(images[0], images[n])


def _hook_at(adapter, iteration: int):
    from types import SimpleNamespace

    hook, = adapter.hooks()
    hook.trainer = SimpleNamespace(iter=iteration)
    return hook


def test_teacher_is_an_exact_copy_at_burn_in_end_and_f_aux_starts_as_f_main(setting):
    cfg, data = setting
    cfg, adapter = _adapter(cfg, data, enabled=True)
    with torch.no_grad():  # a student that has trained: every parameter and buffer moved
        for p in adapter.student.parameters():
            p.add_(torch.randn_like(p))
    heads = adapter.student.roi_heads
    assert not torch.equal(heads.aux_cls_score.weight, heads.box_predictor.cls_score.weight)
    _hook_at(adapter, cfg.semi.burn_in - 1).before_step()  # still burn-in: nothing happens
    assert not torch.equal(adapter.teacher.roi_heads.box_head.fc6.weight, heads.box_head.fc6.weight)
    _hook_at(adapter, cfg.semi.burn_in).before_step()
    student, teacher = adapter.student.state_dict(), adapter.teacher.state_dict()
    assert student.keys() == teacher.keys()
    for k in student:
        assert torch.equal(student[k], teacher[k]), k
    assert torch.equal(heads.aux_cls_score.weight, heads.box_predictor.cls_score.weight)
    assert torch.equal(heads.aux_cls_score.bias, heads.box_predictor.cls_score.bias)
    # afterwards: an EMA with keep rate semi.ema_keep_rate over parameters and buffers
    before = teacher["roi_heads.box_head.fc6.weight"].clone()
    with torch.no_grad():
        heads.box_head.fc6.weight.add_(1.0)
    _hook_at(adapter, cfg.semi.burn_in + 1).before_step()
    keep = cfg.semi.ema_keep_rate
    torch.testing.assert_close(adapter.teacher.roi_heads.box_head.fc6.weight,
                               keep * before + (1 - keep) * (before + 1.0))


def _small_canonical_scale(cfg):
    """64 px images: RoIs of 8-16 px sides on P3 and up, so PIM has RoIs with a shifted source."""
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"canonical_scale": 16})})


def test_lambda_u_scales_the_unsupervised_and_pim_terms_only(setting):
    """Eq. 3: lambda_u multiplies UBT's unsupervised terms and LSM's unlabeled PIM / SD terms; the
    supervised terms and PIM on the labeled batch do not move (same batch, same random draws)."""
    cfg, data = setting
    cfg = _small_canonical_scale(cfg)
    outs = {}
    for lam in (1.0, 3.0):
        cfg_l = cfg.model_copy(update={"semi": cfg.semi.model_copy(update={"lambda_u": lam})})
        cfg_l, adapter = _adapter(cfg_l, data, enabled=True, alpha=0.05)  # the untrained teacher's ~1/K
        batch = _first_batch(cfg_l, adapter, data)
        torch.manual_seed(11)
        outs[lam] = {k: v.item() for k, v in adapter.training_step(cfg.semi.burn_in, batch).losses.items()}
    one, three = outs[1.0], outs[3.0]
    scaled = {"loss_rpn_cls_unsup", "loss_cls_unsup", "loss_pim_cls_unsup", "loss_pim_reg_unsup", "loss_sd"}
    assert scaled <= set(one) and set(one) == set(three)
    for k in one:
        factor = 3.0 if k in scaled else 1.0
        assert three[k] == pytest.approx(factor * one[k], rel=1e-5, abs=1e-8), k
    assert one["loss_cls_unsup"] > 0 and one["loss_pim_cls_unsup"] > 0


def test_pim_leaves_out_p2_rois_inside_a_real_step(setting, monkeypatch):
    """In a UBT + LSM step, PIM pools every sampled RoI from the half-size pyramid, and the ones the
    FPN rule puts on P2 (no shifted source) never reach F_aux."""
    import adapters.lsm as lsm_module
    from adapters.models.faster_rcnn import roi_levels

    cfg, data = setting
    cfg, adapter = _adapter(_small_canonical_scale(cfg), data, enabled=True, sd=False, alpha=0.05)
    calls = []
    pool = lsm_module.pool_by_level

    def recording(features, proposals, canonical_scale, *args):
        out = pool(features, proposals, canonical_scale, *args)
        calls.append((sorted(features), roi_levels(torch.cat(proposals), canonical_scale), out[1]))
        return out

    monkeypatch.setattr(lsm_module, "pool_by_level", recording)
    aux_rows = []
    adapter.student.roi_heads.aux_cls_score.register_forward_hook(lambda m, i, o: aux_rows.append(len(o)))
    adapter.training_step(cfg.semi.burn_in, _first_batch(cfg, adapter, data))
    assert calls, "PIM pooled nothing"
    levels = torch.cat([lv for _, lv, _ in calls])
    has_source = torch.cat([h for _, _, h in calls])
    assert all(f == [3, 4, 5] for f, _, _ in calls)  # P2^d -> P3, P3^d -> P4, P4^d -> P5
    assert (levels == 2).any() and (levels > 2).any()  # the step has RoIs of both kinds
    assert torch.equal(has_source, levels > 2)
    assert sum(aux_rows) == int(has_source.sum())  # F_aux sees exactly the RoIs with a source
