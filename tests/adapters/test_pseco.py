"""PseCo (+ LSM, + MLC): PLA, PCV, the MSL level shift and the sigmoid focal head on hand-checkable
cases, then the training step on the tiny configuration.
"""

import math

import pytest
import torch

from adapters import pseco as pc
from adapters.engine.checkpoint import rng_state, set_rng_state
from core.config import MLCConfig
from adapters.models.faster_rcnn import RoISamples, SigmoidFocal, build_faster_rcnn
from core.config import PsecoConfig, load_config
from core.data.sources import prepare_data
from bench.worker import batch_stream, seed_everything
from tests.adapters.test_faster_rcnn import tiny_cfg
from tests.conftest import TINY
from tests.adapters.teacher_proposals import count_teacher_proposals, with_teacher_proposals


# ----------------------------------------------------------------------------- PLA
def _pla_case():
    """Two pseudo-boxes; the IoUs come from the teacher's refined boxes (proposals equal them)."""
    gts = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    labels = torch.tensor([1, 2])
    refined = torch.tensor([
        [0.0, 0, 10, 10],  # 0: IoU 1.0 with gt 0, but the teacher scores class 1 low
        [0, 0, 10, 8],  # 1: IoU 0.8 with gt 0
        [0, 0, 10, 5],  # 2: IoU 0.5 with gt 0
        [0, 0, 10, 3],  # 3: IoU 0.3 < 0.4: not in any bag
        [20, 20, 30, 30],  # 4: IoU 1.0 with gt 1
        [20, 20, 30, 26],  # 5: IoU 0.6 with gt 1
        [50, 50, 60, 60],  # 6: no overlap
    ])
    scores = torch.zeros(7, 3)
    scores[:4, 1] = torch.tensor([0.1, 0.9, 0.8, 0.9])  # class of gt 0
    scores[4:6, 2] = torch.tensor([0.2, 0.9])  # class of gt 1
    return refined.clone(), refined, scores, gts, labels


def test_pla_picks_the_dynamic_top_k_by_prediction_cost():
    proposals, refined, scores, gts, labels = _pla_case()
    # gt 0: bag {0, 1, 2}, IoUs 1, .8, .5 -> k = floor(2.3) = 2; cost sqrt(IoU x score) = .32, .85, .63
    #       -> proposals 1 and 2; proposal 0 (the best IoU) becomes background.
    # gt 1: bag {4, 5}, IoUs 1, .6 -> k = floor(1.6) = 1; cost .45, .73 -> proposal 5.
    assigned = pc.pla_assign(proposals, refined, scores, gts, labels, iou_thr=0.4, candidate_topk=12)
    assert assigned.tolist() == [-1, 0, 0, -1, -1, 1, -1]
    # only the top-1 IoU counts towards k with candidate_topk 1: k = 1 for gt 0
    assert pc.pla_assign(proposals, refined, scores, gts, labels, 0.4, 1).tolist() == [-1, 0, -1, -1, -1, 1, -1]
    # a lower IoU threshold lets proposal 3 into gt 0's bag: IoUs 1, .8, .5, .3 -> k = 2 still; its
    # cost sqrt(.27) = .52 is below .85 and .63
    assert pc.pla_assign(proposals, refined, scores, gts, labels, 0.3, 12).tolist() == [-1, 0, 0, -1, -1, 1, -1]
    # a chosen proposal of zero area (in the student view) is dropped, not replaced by the next one
    proposals[5] = torch.tensor([25.0, 25, 25, 30])
    assert pc.pla_assign(proposals, refined, scores, gts, labels).tolist() == [-1, 0, 0, -1, -1, -1, -1]
    # no pseudo-boxes: everything is background
    assert pc.pla_assign(proposals, refined, scores, gts[:0], labels[:0]).tolist() == [-1] * 7


def test_sampling_keeps_plas_labels_and_adds_no_pseudo_boxes():
    proposals, refined, scores, gts, labels = _pla_case()
    heads = build_faster_rcnn(tiny_cfg(roi_batch_size_per_image=32), num_classes=3).roi_heads
    assigned = pc.pla_assign(proposals, refined, scores, gts, labels)
    s = pc.sample_assigned(heads, [proposals], [assigned], [{"boxes": gts, "labels": labels,
                                                             "scores": torch.tensor([0.9, 0.7])}])
    assert len(s.proposals[0]) == 7  # 32 RoIs allowed: all 7 proposals, no pseudo-box appended
    order = [proposals.tolist().index(p) for p in s.proposals[0].tolist()]
    assert [s.labels[order.index(i)].item() for i in range(7)] == [3, 1, 1, 3, 3, 2, 3]
    assert s.matched_scores[order.index(5)].item() == pytest.approx(0.7)
    assert s.regression_targets[order.index(1)].tolist() == pytest.approx(
        heads.box_coder.encode_single(gts[:1], proposals[1:2])[0].tolist())


# ----------------------------------------------------------------------------- PCV
def test_pcv_weights_and_regression_loss_by_hand():
    heads = build_faster_rcnn(tiny_cfg(), num_classes=2).roi_heads  # background = 2
    gts = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([[0.0, 0, 4, 2]])]
    samples = RoISamples(
        proposals=[torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 28], [40, 40, 50, 50]]),
                   torch.tensor([[0.0, 0, 4, 4]])],
        labels=torch.tensor([0, 0, 1, 2, 1]),
        regression_targets=torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0.5], [9, 9, 9, 9], [0, 0, 1, 0]]),
        matched_scores=torch.ones(5),
        matched_idxs=[torch.tensor([0, 0, 1, 0]), torch.tensor([0])])
    deltas = torch.zeros(5, 2 * 4)  # the student decodes every RoI onto itself
    w = pc.pcv_weights(heads, deltas, samples, gts)
    # image 0: gt 0 <- RoIs with IoU 1 and .5 -> both .75; gt 1 <- IoU .8; background 0
    # image 1: its own gt 0 <- IoU .5
    assert w.tolist() == pytest.approx([0.75, 0.75, 0.8, 0.0, 0.5])

    one = slice(0, 4)  # image 0 alone: L1 of the positives = 1, 2, .5 (the background's 36 is ignored)
    loss = pc.pcv_regression_loss(deltas[one], samples.labels[one], samples.regression_targets[one], w[one], 2)
    factor = (0.75 + 0.75 + 0.8) / (0.75**2 + 0.75**2 + 0.8**2)
    assert loss.item() == pytest.approx(factor * (0.75**2 * 1 + 0.75**2 * 2 + 0.8**2 * 0.5) / 4, rel=1e-6)
    # equal weights w: the factor 1 / w undoes the square once, leaving w x the plain L1 sum over N
    assert pc.pcv_regression_loss(deltas[one], samples.labels[one], samples.regression_targets[one],
                                  torch.full((4,), 0.3), 2).item() == pytest.approx(0.3 * 3.5 / 4, rel=1e-6)
    # no positives (or all weights 0): exactly 0
    bg = torch.tensor([2, 2, 2, 2])
    assert pc.pcv_regression_loss(deltas[one], bg, samples.regression_targets[one], w[one], 2).item() == 0.0
    assert pc.pcv_regression_loss(deltas[one], samples.labels[one], samples.regression_targets[one],
                                  torch.zeros(4), 2).item() == 0.0


# ----------------------------------------------------------------------------- MSL and the detector
def test_msl_pairs_each_half_scale_level_with_the_next_full_level():
    assert pc.MSL_SHIFT == {"p2": "p3", "p3": "p4", "p4": "p5", "p5": "p6"}
    torch.manual_seed(0)
    model = build_faster_rcnn(tiny_cfg(), num_classes=3)
    image_list, feats = model.extract([torch.rand(3, 64, 96), torch.rand(3, 50, 80)])
    small = pc.downsample(image_list.tensors)
    assert torch.equal(small, image_list.tensors[:, :, ::2, ::2])  # nearest: every other pixel
    shifted = pc.shifted_maps(model.backbone(small))
    assert list(shifted) == ["p3", "p4", "p5", "p6"]  # the full view's P2 has no source
    for name, m in shifted.items():
        assert m.shape == feats[name].shape, name  # same stride in full-view coordinates
    # so the view-2 RPN reuses the full view's anchors of P3..P6 (boxes stay in full-view coordinates)
    main = model.rpn.anchor_generator(image_list, list(feats.values()))
    v2 = pc.shifted_anchor_generator(model.rpn.anchor_generator)(image_list, list(shifted.values()))
    n_p2 = 3 * feats["p2"].shape[-2] * feats["p2"].shape[-1]
    assert all(torch.equal(a2, a[n_p2:]) for a, a2 in zip(main, v2))


def test_sigmoid_focal_head_by_hand_and_unchanged_parameters():
    keys = list(build_faster_rcnn(tiny_cfg(), num_classes=2).state_dict())
    model = build_faster_rcnn(tiny_cfg(), num_classes=2, sigmoid_focal=SigmoidFocal(gamma=2.0, alpha=0.25, weight=10.0))
    assert list(model.state_dict()) == keys and model.roi_heads.sigmoid_focal is not None
    # every logit 0 -> p = .5: a positive class costs .25 x .5^2 x ln 2, a negative one .75 x .5^2 x ln 2
    pos, neg = 0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)
    logits = torch.zeros(2, 3)  # the third (background) column is ignored
    logits[:, 2] = 7.0
    loss = model.roi_heads.classification_loss(logits, torch.tensor([0, 2]))  # class 0, background
    assert loss.item() == pytest.approx(10 * ((pos + neg) + 2 * neg) / 2, rel=1e-5)
    assert pc.class_scores(model.roi_heads, torch.tensor([[0.0, math.log(3), 5.0]]))[0].tolist() == \
        pytest.approx([0.5, 0.75])
    plain = build_faster_rcnn(tiny_cfg(), num_classes=2).roi_heads  # the CE config: softmax over the K logits
    assert pc.class_scores(plain, torch.tensor([[0.0, math.log(3), 5.0]]))[0].tolist() == pytest.approx([0.25, 0.75])


def test_unsupervised_ramp():
    assert [pc.unsup_ramp(i, 10, 4) for i in (10, 12, 14, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert pc.unsup_ramp(10, 10, 0) == 1.0


# ----------------------------------------------------------------------------- the adapter
# Thresholds the untrained tiny teacher (sigmoid scores ~0.5) passes, so every term is exercised;
# canonical_scale 8 lifts the tiny images' RoIs to P3+, where MSL (and PIM) have a shifted source.
LOW = PsecoConfig(initial_score_thr=0.3, rpn_thr=0.3, unsup_warmup=0)
MAIN = {f"{k}{v}_unsup" for k in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg") for v in ("", "_v2")}
SUP = {"loss_rpn_cls_sup", "loss_rpn_loc_sup", "loss_cls_sup", "loss_box_reg_sup"}


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    cfg = load_config("demo", TINY + ["model.canonical_scale=8", "semi.t=0.4"], method="pseco")
    return cfg, prepare_data(cfg.data, tmp_path_factory.mktemp("pseco"))


def _adapter(cfg, data, pcfg=LOW, **lsm):
    cfg = cfg.model_copy(update={"lsm": cfg.lsm.model_copy(update={"alpha": 0.35, **lsm})})
    seed_everything(cfg.seed)
    adapter = pc.PseCo(cfg, data.num_classes, torch.device("cpu"))
    adapter.teacher.load_state_dict(adapter.student.state_dict())
    adapter.teacher.roi_heads.score_thresh = 0.0
    adapter.pc = pcfg
    return cfg, adapter


@pytest.mark.parametrize("mode,expected", [("train", 37), ("test", 11)])
def test_teacher_proposals_follow_the_train_time_rpn_settings(setting, mode, expected):
    """The original's teacher proposes with its train-time `rpn_proposal` counts (`semi.teacher_proposals`)."""
    cfg, data = setting
    cfg, adapter = _adapter(with_teacher_proposals(cfg, mode), data)
    counts = count_teacher_proposals(adapter)
    adapter.pseudo_label([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    assert counts == [expected, expected]


def test_burn_in_is_supervised_with_the_sigmoid_focal_head(setting):
    cfg, data = setting
    cfg, adapter = _adapter(cfg, data)
    assert adapter.student.roi_heads.sigmoid_focal is not None
    assert adapter.teacher.roi_heads.sigmoid_focal is not None
    batch = next(batch_stream(cfg, adapter, data, 0))
    assert batch["unlabeled"] is None
    out = adapter.training_step(0, batch)
    assert set(out.losses) == SUP
    assert list(adapter.eval_models()) == ["teacher", "student"]  # the original evaluates the teacher


def test_step_losses_with_lsm_off_and_on(setting, monkeypatch):
    cfg, data = setting
    cfg_off, plain = _adapter(cfg, data, enabled=False)
    _, with_lsm = _adapter(cfg, data, enabled=True, ignore_uncertain=False)
    _, ignoring = _adapter(cfg, data, enabled=True)
    batch = next(batch_stream(cfg_off, plain, data, cfg.semi.burn_in))
    state = rng_state()
    out_off = plain.training_step(cfg.semi.burn_in, batch)
    set_rng_state(state)
    out_on = with_lsm.training_step(cfg.semi.burn_in, batch)
    # the untrained teacher's scores (~0.5) are all above t: mark every box above alpha uncertain
    monkeypatch.setattr(pc, "uncertain_marks", lambda pseudo, t: [
        {"boxes": p["boxes"], "certain": torch.zeros(len(p["boxes"]), dtype=torch.bool)} for p in pseudo])
    set_rng_state(state)
    out_ignore = ignoring.training_step(cfg.semi.burn_in, batch)
    for k in SUP | MAIN - {"loss_cls_unsup", "loss_cls_v2_unsup"}:  # the ignore region: classification only
        assert torch.equal(out_off.losses[k], out_ignore.losses[k]), k
    assert out_ignore.metrics["lsm_ignored_rois_per_img"] > 0
    assert not torch.equal(out_off.losses["loss_cls_unsup"], out_ignore.losses["loss_cls_unsup"])
    assert set(out_off.losses) == SUP | MAIN
    assert set(out_on.losses) == SUP | MAIN | {"loss_pim_cls_unsup", "loss_pim_reg_unsup", "loss_sd",
                                               "loss_pim_cls_sup", "loss_pim_reg_sup"}
    for k in SUP | MAIN:  # LSM without the ignore region leaves PseCo's own terms untouched
        assert torch.equal(out_off.losses[k], out_on.losses[k]), k
    assert all(torch.isfinite(v) for v in out_on.losses.values())
    for k in ("loss_cls_unsup", "loss_box_reg_unsup", "loss_cls_v2_unsup", "loss_box_reg_v2_unsup"):
        assert out_off.losses[k] > 0, k  # PLA found positives; view 2 pooled some RoIs
    assert out_off.metrics["pla_pos_per_img"] > 0 and 0 < out_off.metrics["pcv_weight_mean"] <= 1
    assert out_on.metrics["pl_alpha_count_per_img"] >= out_on.metrics["pl_count_per_img"]
    sum(out_on.losses.values()).backward()
    assert with_lsm.student.roi_heads.aux_cls_score.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in with_lsm.teacher.parameters())


def test_msl_off_drops_view_2_and_mlc_on_adds_the_scaled_view(setting):
    cfg, data = setting
    cfg, adapter = _adapter(cfg, data, pcfg=LOW.model_copy(update={"msl": False, "unsup_warmup": 4}))
    adapter.mlc = MLCConfig(enabled=True, weight=0.5)
    batch = next(batch_stream(cfg, adapter, data, cfg.semi.burn_in))
    out = adapter.training_step(cfg.semi.burn_in + 1, batch)
    mlc_keys = {f"{k}_mlc" for k in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg")}
    assert set(out.losses) == SUP | {k for k in MAIN if "_v2" not in k} | mlc_keys
    assert out.metrics["unsup_ramp"] == pytest.approx(0.25)  # one of 4 warm-up iterations after burn-in
    assert all(torch.isfinite(v) for v in out.losses.values()) and out.losses["loss_cls_mlc"] > 0
