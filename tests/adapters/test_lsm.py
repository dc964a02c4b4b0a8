import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import MultiScaleRoIAlign

from adapters.engine.ema import ema_update
from adapters.engine.mean_teacher import filter_pseudo_labels
from adapters.lsm import (attach_aux_classifier, downsample, kl_aux_to_main, main_cls_loss, sd_mask, shifted_features,
                         uncertain_marks, uncertain_rois)
from adapters.models.faster_rcnn import RoIHeads, build_faster_rcnn, pool_by_level, roi_levels
from core.config import ModelConfig
from tests.adapters.test_faster_rcnn import tiny_cfg


def test_shift_alignment_pools_the_same_features():
    """A RoI of level k pooled from P_(k-1)^d equals the RoI pooled from P_k when the maps match."""
    torch.manual_seed(0)
    image_size = (128, 128)
    main = {f"p{k}": torch.randn(1, 4, 128 // 2**k, 128 // 2**k) for k in (2, 3, 4, 5)}
    # the downsampled image's pyramid, constructed so that P_(k-1)^d == P_k
    down = {f"p{k - 1}": main[f"p{k}"].clone() for k in (3, 4, 5)}
    boxes = torch.tensor([[10.0, 12, 60, 70], [0, 0, 100, 100], [30, 30, 58, 62], [0, 0, 127, 127]])
    levels = roi_levels(boxes, canonical_scale=56)
    assert levels.tolist() == [3, 4, 3, 5]
    # reference: torchvision's own multi-scale pooler on the main pyramid (its RoIAlign is the legacy one)
    pooler = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2, canonical_scale=56)
    legacy = pooler(main, [boxes], [image_size])
    main_legacy, _ = pool_by_level({k: main[f"p{k}"] for k in (2, 3, 4, 5)}, [boxes], canonical_scale=56,
                                   aligned=False)
    assert torch.allclose(main_legacy, legacy, atol=1e-6)
    expected, _ = pool_by_level({k: main[f"p{k}"] for k in (2, 3, 4, 5)}, [boxes], canonical_scale=56)
    pooled, has_source = pool_by_level(shifted_features(down, ["p2", "p3", "p4"]), [boxes], canonical_scale=56)
    assert has_source.all()
    assert torch.allclose(pooled, expected, atol=1e-6)


def test_downsampled_pyramid_has_the_shifted_sizes():
    model = build_faster_rcnn(tiny_cfg(), num_classes=2)
    batch = model.preprocess([torch.rand(3, 90, 70)]).tensors
    full = model.backbone(batch)
    half = model.backbone(downsample(batch))
    for src, dst in (("p2", "p3"), ("p3", "p4"), ("p4", "p5")):
        assert half[src].shape == full[dst].shape


def test_rois_without_shifted_source_are_excluded():
    feats = {3: torch.randn(1, 2, 16, 16), 4: torch.randn(1, 2, 8, 8), 5: torch.randn(1, 2, 4, 4)}
    boxes = torch.tensor([[0.0, 0, 10, 10],  # level 2: no shifted source -> excluded
                          [0, 0, 40, 40],  # level 3 (source P2^d)
                          [0, 0, 80, 80]])  # level 4 (source P3^d)
    assert roi_levels(boxes, 56).tolist() == [2, 3, 4]
    pooled, has_source = pool_by_level(feats, [boxes], canonical_scale=56)
    assert has_source.tolist() == [False, True, True]
    assert pooled[0].abs().sum() == 0
    # Table 5 row "P3^d, P4^d": the P2^d source is off, so level-3 RoIs are excluded too
    _, has_source = pool_by_level({k: v for k, v in feats.items() if k != 3}, [boxes], canonical_scale=56)
    assert has_source.tolist() == [False, False, True]


def test_score_masks_for_t_alpha_and_the_sd_interval():
    det = {"boxes": torch.tensor([[0.0, 0, 10, 10]] * 5), "labels": torch.tensor([0, 1, 0, 1, 0]),
           "scores": torch.tensor([0.95, 0.7, 0.6, 0.5, 0.3])}
    assert filter_pseudo_labels([det], 0.7)[0]["scores"].tolist() == pytest.approx([0.95])  # strictly above t
    assert filter_pseudo_labels([det], 0.5)[0]["scores"].tolist() == pytest.approx([0.95, 0.7, 0.6])
    # SD: foreground RoIs with matched score in the open interval (alpha, t)
    labels = torch.tensor([0, 1, 0, 1, 2])  # 2 = background for K=2
    scores = torch.tensor([0.95, 0.7, 0.6, 0.55, 0.6])
    assert sd_mask(scores, labels, 2, alpha=0.5, t=0.7).tolist() == [False, False, True, True, False]


def test_naive_large_area_keeps_large_low_score_boxes():
    det = {"boxes": torch.tensor([[0.0, 0, 30, 30], [0, 0, 5, 5], [0, 0, 40, 40]]),
           "labels": torch.tensor([0, 0, 1]), "scores": torch.tensor([0.6, 0.6, 0.9])}
    out = filter_pseudo_labels([det], 0.5, min_area=400.0, high=0.7)[0]
    assert out["boxes"][:, 2].tolist() == [30.0, 40.0]


def test_naive_large_area_compares_original_image_pixels():
    """A 30x30 box in a 0.5x view is 60x60 = 3600 px in the original image: large for a 2500 px
    threshold although its view area (900) is not; a 10x10 view box (400 px original) stays out."""
    det = {"boxes": torch.tensor([[0.0, 0, 30, 30], [0, 0, 10, 10]]), "labels": torch.tensor([0, 0]),
           "scores": torch.tensor([0.6, 0.6])}
    scale = [1 / 0.5**2]  # view area -> original area
    kept = filter_pseudo_labels([det], 0.5, min_area=2500.0, high=0.7, pixel_scale=scale)[0]
    assert kept["boxes"].tolist() == [[0.0, 0, 30, 30]]
    assert len(filter_pseudo_labels([det], 0.5, min_area=2500.0, high=0.7)[0]["boxes"]) == 0  # view pixels


def _ignore_example():
    """One image; pseudo-boxes above alpha 0.5 with t 0.7: A (0.9, certain), B and C (0.6, uncertain)."""
    pseudo_alpha = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 12]]),
                     "labels": torch.tensor([0, 1, 0]), "scores": torch.tensor([0.9, 0.6, 0.6])}]
    rois = [torch.tensor([
        [0.0, 0, 10, 10],  # r0: IoU 1 with A (and 0.83 with C): certain, foreground of A
        [20, 20, 30, 31],  # r1: IoU 0.91 with B: ignored
        [50, 50, 60, 60],  # r2: no overlap: background
        [20, 20, 30, 40],  # r3: IoU 0.5 with B (the matcher's threshold is inclusive): ignored
        [20, 20, 30, 41],  # r4: IoU 0.476 with B: background
        [0, 0, 10, 12],  # r5: IoU 0.83 with A but 1 with C: its best match is uncertain, ignored
    ])]
    # the main branch's labels (matched to A, the only box above t); K = 2, background = 2
    labels = torch.tensor([0, 2, 2, 2, 2, 0])
    ln2, ln6 = math.log(2), math.log(6)
    logits = torch.tensor([[ln2, 0, 0], [ln6, 0, 0], [0, 0, 0], [ln6, 0, 0], [ln2, 0, 0], [ln2, 0, 0]])
    return pseudo_alpha, rois, labels, logits


def test_ignore_region_leaves_uncertain_rois_out_of_the_main_classification():
    pseudo_alpha, rois, labels, logits = _ignore_example()
    ignore = uncertain_rois(rois, uncertain_marks(pseudo_alpha, t=0.7))
    assert ignore.tolist() == [False, True, False, True, False, True]
    heads = RoIHeads(2, 1, ModelConfig(representation_size=8))  # cross-entropy, mean over RoIs
    # the main branch's own matching (targets: A only) makes the uncertain RoIs background (r1, r3)
    # or foreground of A (r5); A itself is appended as a proposal and stays certain
    samples = heads.sample(rois, [{"boxes": pseudo_alpha[0]["boxes"][:1], "labels": torch.tensor([0])}])
    assert samples.labels.tolist() == labels.tolist() + [0]
    assert uncertain_rois(samples.proposals, uncertain_marks(pseudo_alpha, t=0.7)).tolist() == ignore.tolist() + [False]
    # CE of logits [a, 0, 0]: label 0 -> log(e^a + 2) - a, background -> log(e^a + 2)
    # on: r0 ln2, r2 ln3, r4 ln4 -> mean ln(24) / 3; the ignored RoIs add nothing, not even to the count
    on = main_cls_loss(heads, logits, labels, ignore)
    assert on.item() == pytest.approx(math.log(24) / 3, rel=1e-6)
    # off (the old behaviour): r1 and r3 are background (ln 8 each), r5 foreground of A (ln 2)
    off = main_cls_loss(heads, logits, labels, torch.zeros(6, dtype=torch.bool))
    assert off.item() == pytest.approx(math.log(2 * 8 * 3 * 8 * 4 * 2) / 6, rel=1e-6)
    # the ignored RoIs get no gradient from the main branch's classification
    x = logits.clone().requires_grad_(True)
    main_cls_loss(heads, x, labels, ignore).backward()
    assert x.grad[ignore].abs().sum() == 0 and x.grad[~ignore].abs().sum() > 0
    # with t = 0.5 every box above alpha is certain: nothing is ignored
    assert not uncertain_rois(rois, uncertain_marks(pseudo_alpha, t=0.5)).any()
    # an image without pseudo-boxes ignores nothing
    empty = [{"boxes": torch.zeros(0, 4), "certain": torch.zeros(0, dtype=torch.bool)}]
    assert uncertain_rois(rois, empty).tolist() == [False] * 6


def test_kl_value_and_gradient_reach_both_classifiers():
    main = torch.tensor([[0.0, 0.0]], requires_grad=True)
    aux = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)  # p_aux = (0.75, 0.25)
    kl = kl_aux_to_main(main, aux)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    kl.backward()
    assert main.grad.abs().sum() > 0 and aux.grad.abs().sum() > 0


def test_ema_update_including_buffers():
    teacher, student = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
        teacher.running_mean.fill_(0.0)
        student.running_mean.fill_(4.0)
        student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, keep_rate=0.75)
    assert teacher.weight.tolist() == [1.5, 1.5]  # 0.75 * 1 + 0.25 * 3
    assert teacher.running_mean.tolist() == [1.0, 1.0]  # buffers averaged too (UBT)
    assert int(teacher.num_batches_tracked) == 7  # integer buffers copied
    ema_update(teacher, student, keep_rate=0.5, include_buffers=False)
    assert teacher.weight.tolist() == [2.25, 2.25] and teacher.running_mean.tolist() == [1.0, 1.0]


def test_inference_is_identical_with_lsm_on_and_off():
    torch.manual_seed(0)
    plain = build_faster_rcnn(tiny_cfg(score_thresh=0.0), num_classes=3)
    with_lsm = build_faster_rcnn(tiny_cfg(score_thresh=0.0), num_classes=3)
    attach_aux_classifier(with_lsm)
    missing, unexpected = with_lsm.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all("aux_cls_score" in k for k in missing)
    plain.eval(), with_lsm.eval()
    images = [torch.rand(3, 64, 64)]
    a, b = plain(images)[0], with_lsm(images)[0]
    assert len(a["boxes"]) > 0
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_pseudo_label_precision_and_recall_by_size():
    from adapters.engine.mean_teacher import pseudo_label_stats

    gt = {"boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 150, 150]]), "labels": torch.tensor([0, 1])}
    pseudo = {"boxes": torch.tensor([[0.0, 0, 10, 11],  # matches the small GT (IoU 0.91)
                                     [50, 50, 150, 150],  # right box, wrong class: a false positive
                                     [200, 200, 300, 300]]),  # nothing there
              "labels": torch.tensor([0, 0, 1]), "scores": torch.tensor([0.9, 0.8, 0.75])}
    s = pseudo_label_stats([pseudo], [gt], pixel_scale=[1.0])
    assert s["pl_count_per_img"] == 3 and s["pl_mean_score"] == pytest.approx(0.8167, abs=1e-4)
    assert s["pl_precision"] == pytest.approx(1 / 3) and s["pl_recall"] == pytest.approx(1 / 2)
    assert s["pl_precision_small"] == 1.0 and s["pl_precision_large"] == 0.0
    assert s["pl_recall_small"] == 1.0 and s["pl_recall_large"] == 0.0
    # areas are compared in original-image pixels: a 2x-upscaled view has 4x the area
    half = pseudo_label_stats([pseudo], [gt], pixel_scale=[0.25])
    assert half["pl_recall_small"] == 1.0 and "pl_recall_large" not in half and half["pl_recall_medium"] == 0.0


def test_pim_groups_share_one_pass_and_keep_their_own_losses():
    """The labeled and unlabeled groups share the head pass (and the half-size backbone pass when
    their batches have one size); each group's losses and their gradients equal those of the group
    computed alone."""
    from core.config import LSMConfig
    from adapters.lsm import PIM

    torch.manual_seed(0)
    model = build_faster_rcnn(tiny_cfg(), num_classes=2)
    attach_aux_classifier(model)
    model.train()
    box = {"boxes": torch.tensor([[8.0, 8, 60, 50], [20, 30, 90, 100]]), "labels": torch.tensor([0, 1])}
    pseudo = [{**box, "scores": torch.tensor([0.9, 0.6])}]  # 0.6 lies in (alpha, t): an SD RoI
    pim = PIM(LSMConfig(enabled=True, alpha=0.5), t=0.7, model_cfg=tiny_cfg())
    fwd_u = model.train_forward([torch.rand(3, 96, 128)], [box])
    for labeled_size in ((128, 100), (96, 120)):  # padded to another size than fwd_u's / the same
        fwd_l = model.train_forward([torch.rand(3, *labeled_size), torch.rand(3, 90, 90)], [box, box])
        groups = [(fwd_u, pseudo, True), (fwd_l, [box, box], False)]
        _check_groups(pim, model, groups, passes=2)  # the test trunk's BatchNorm uses batch statistics
        for m in model.backbone.modules():  # frozen statistics, as the real trunks': one pass if one size
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        _check_groups(pim, model, groups, passes=2 if labeled_size == (128, 100) else 1)
        model.train()


def _check_groups(pim, model, groups, passes: int):
    calls = []
    hook = model.backbone.register_forward_hook(lambda *_: calls.append(1))

    def run(together: bool):
        torch.manual_seed(1)  # the RoI sampler draws: same draws in the same order
        calls.clear()
        out = pim.losses(model, groups) if together else [pim.losses(model, [g])[0] for g in groups]
        if together:
            assert len(calls) == passes
        values = [{k: v.item() for k, v in o.items()} for o in out]
        grads = torch.autograd.grad(sum(v for o in out for v in o.values()),
                                    [model.roi_heads.aux_cls_score.weight], retain_graph=True)
        return values, grads[0]

    (joint, g_joint), (alone, g_alone) = run(True), run(False)
    assert set(joint[0]) == {"loss_pim_cls", "loss_pim_reg", "loss_sd"} and set(joint[1]) == {"loss_pim_cls", "loss_pim_reg"}
    assert joint[0]["loss_pim_cls"] > 0 and joint[1]["loss_pim_cls"] > 0
    for j, a in zip(joint, alone):
        assert j == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert torch.allclose(g_joint, g_alone, rtol=1e-4, atol=1e-6)
    hook.remove()


def test_pim_classification_loss_is_plain_cross_entropy_by_hand():
    """The authors' PIM branch uses softmax CE whatever the host's RoI loss (UBT: focal, gamma 1.5)."""
    from adapters.lsm import pim_cls_loss

    heads = RoIHeads(2, 1, ModelConfig(representation_size=8, cls_loss="focal"))
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    p0, p1 = math.exp(2) / (math.exp(2) + 2), 1 / (2 + math.e)
    ce = -math.log(p0) - math.log(p1)  # summed, then / 4 sampled RoIs of the group (two without a source)
    assert pim_cls_loss(heads, logits, labels, 4, "ce").item() == pytest.approx(ce / 4, rel=1e-6)
    focal = (1 - p0) ** 1.5 * -math.log(p0) + (1 - p1) ** 1.5 * -math.log(p1)
    assert pim_cls_loss(heads, logits, labels, 4, "host").item() == pytest.approx(focal / 4, rel=1e-6)
    assert pim_cls_loss(heads, logits[:0], labels[:0], 1, "ce").item() == 0


@pytest.mark.parametrize("kind", ["ce", "host"])
def test_pim_step_uses_the_configured_classification_loss(kind):
    """Inside PIM.losses on a focal host: loss_pim_cls = CE (or focal) of F_aux's logits over the RoIs
    that have a shifted source, / all RoIs sampled."""
    from adapters.lsm import PIM
    from adapters.models.faster_rcnn import focal_ce_loss
    from core.config import LSMConfig

    torch.manual_seed(0)
    cfg = tiny_cfg(cls_loss="focal")
    model = build_faster_rcnn(cfg, num_classes=2)
    attach_aux_classifier(model)
    model.train()
    box = {"boxes": torch.tensor([[8.0, 8, 60, 50], [20, 30, 90, 100]]), "labels": torch.tensor([0, 1])}
    pim = PIM(LSMConfig(enabled=True, alpha=0.5, pim_cls_loss=kind), t=0.7, model_cfg=cfg)
    fwd = model.train_forward([torch.rand(3, 96, 128)], [box])
    seen = {}
    heads, sample, pool = model.roi_heads, model.roi_heads.sample, pim._pool_shifted
    heads.sample = lambda *a: seen.setdefault("samples", sample(*a))
    pim._pool_shifted = lambda *a: seen.setdefault("pooled", pool(*a))
    heads.aux_cls_score.register_forward_hook(lambda m, i, out: seen.setdefault("aux", out))
    loss = pim.losses(model, [(fwd, [box], False)])[0]["loss_pim_cls"]
    labels = seen["samples"].labels[seen["pooled"][1]]
    n = len(seen["samples"].labels)
    assert 0 < len(labels) <= n
    ce = F.cross_entropy(seen["aux"], labels, reduction="sum") / n
    focal = focal_ce_loss(seen["aux"], labels, cfg.focal_gamma) / n
    assert loss.item() == pytest.approx((ce if kind == "ce" else focal).item(), rel=1e-5)
    assert ce.item() != pytest.approx(focal.item(), rel=1e-3)
