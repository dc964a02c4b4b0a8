"""The batched detector code against the per-image implementation it replaced, on fixed inputs.

Each reference below is the previous code (torchvision's RPN, RoIAlign and NMS, the per-image
RoI sampling and post-processing loops), run with the same random state: proposals, sampled RoIs,
targets, losses, detections and pooled features must agree to float rounding, and the random
draws must be the same ones.
"""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

from adapters.models.faster_rcnn import (
    RoISamples, build_faster_rcnn, nms_per_image, nms_top, pool_by_level, roi_levels,
)
from tests.adapters.test_faster_rcnn import tiny_cfg


# ---------------------------------------------------------------- references (the previous code)
def reference_pool_by_level(features, proposals, canonical_scale, output_size=7, sampling_ratio=2, aligned=True):
    boxes = torch.cat(proposals)
    batch_idx = torch.cat([torch.full((len(p), 1), i, dtype=boxes.dtype) for i, p in enumerate(proposals)])
    rois = torch.cat([batch_idx, boxes], dim=1)
    levels = roi_levels(boxes, canonical_scale)
    some = next(iter(features.values()))
    pooled = some.new_zeros((len(boxes), some.shape[1], output_size, output_size))
    has_source = torch.zeros(len(boxes), dtype=torch.bool)
    for level, feat in features.items():
        idx = torch.where(levels == level)[0]
        if len(idx):
            pooled[idx] = roi_align(feat, rois[idx], output_size, spatial_scale=1.0 / 2**level,
                                    sampling_ratio=sampling_ratio, aligned=aligned)
            has_source[idx] = True
    return pooled, has_source


def reference_sample(heads, proposals, targets):
    """torchvision's per-image matching and sampling, as the detector did before it was batched."""
    per_image = []  # (proposals, labels, scores, matched gt index, regression targets) of the kept RoIs
    matcher = det_utils.Matcher(0.5, 0.5, allow_low_quality_matches=False)
    sampler = det_utils.BalancedPositiveNegativeSampler(heads.sampler.batch_size_per_image,
                                                        heads.sampler.positive_fraction)
    for p, t in zip(proposals, targets):
        gt_boxes = t["boxes"].to(p.dtype)
        gt_labels = t["labels"]
        gt_scores = t.get("scores", torch.ones(len(gt_boxes)))
        p = torch.cat([p, gt_boxes])
        if len(gt_boxes) == 0:
            idx = torch.zeros(len(p), dtype=torch.int64)
            lab = torch.full((len(p),), heads.num_classes, dtype=torch.int64)
            sc = torch.zeros(len(p))
            matched_boxes = torch.zeros_like(p)
        else:
            match = matcher(box_ops.box_iou(gt_boxes, p))
            idx = match.clamp(min=0)
            lab = gt_labels[idx].clone()
            sc = gt_scores[idx].clone()
            lab[match < 0] = heads.num_classes
            matched_boxes = gt_boxes[idx]
        pos_mask, neg_mask = sampler([torch.where(lab == heads.num_classes, 0, lab + 1)])
        keep = torch.where(pos_mask[0] | neg_mask[0])[0]
        per_image.append((p[keep], lab[keep], sc[keep], idx[keep],
                          heads.box_coder.encode_single(matched_boxes[keep], p[keep])))
    props, labels, scores, matched, reg_targets = (list(x) for x in zip(*per_image))
    return RoISamples(props, torch.cat(labels), torch.cat(reg_targets), torch.cat(scores), matched)


def reference_postprocess(heads, logits, deltas, proposals, image_sizes):
    boxes_per_image = [len(p) for p in proposals]
    pred_boxes = heads.box_coder.decode(deltas, proposals).reshape(len(deltas), heads.num_classes, 4)
    scores = F.softmax(logits, -1)[:, :-1]
    out = []
    for boxes, sc, size in zip(pred_boxes.split(boxes_per_image), scores.split(boxes_per_image), image_sizes):
        boxes = box_ops.clip_boxes_to_image(boxes, size)
        labels = torch.arange(heads.num_classes).expand_as(sc)
        boxes, sc, labels = boxes.reshape(-1, 4), sc.reshape(-1), labels.reshape(-1)
        keep = torch.where(sc > heads.score_thresh)[0]
        boxes, sc, labels = boxes[keep], sc[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, 1e-2)
        boxes, sc, labels = boxes[keep], sc[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, sc, labels, heads.nms_thresh)[: heads.detections_per_img]
        out.append({"boxes": boxes[keep], "scores": sc[keep], "labels": labels[keep]})
    return out


def reference_rpn(rpn) -> RegionProposalNetwork:
    """torchvision's own RPN with the same head, anchors and settings."""
    gen = rpn.anchor_generator
    ref = RegionProposalNetwork(AnchorGenerator(gen.sizes, gen.aspect_ratios), rpn.head, 0.7, 0.3,
                                rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction,
                                rpn._pre_nms_top_n, rpn._post_nms_top_n, rpn.nms_thresh)
    ref.train(rpn.training)
    return ref


# ---------------------------------------------------------------- fixtures
def random_boxes(n, size, gen, min_side=1.0, max_side=40.0):
    xy = torch.rand(n, 2, generator=gen) * (size - min_side)
    wh = torch.rand(n, 2, generator=gen) * (max_side - min_side) + min_side
    return torch.cat([xy, (xy + wh).clamp(max=size)], 1)


def model_and_batch(seed=0, num_classes=3):
    torch.manual_seed(seed)
    model = build_faster_rcnn(tiny_cfg(rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=120,
                                       rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100),
                              num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed)
    # train a little so that objectness and boxes are not all alike (scores with ties would make
    # the order of equal-score boxes, which no code promises, matter)
    with torch.no_grad():
        for p in model.rpn.head.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        for p in model.roi_heads.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    images = [torch.rand(3, 90, 120, generator=gen), torch.rand(3, 128, 96, generator=gen),
              torch.rand(3, 100, 100, generator=gen)]
    targets = [
        {"boxes": random_boxes(5, 90, gen), "labels": torch.randint(0, num_classes, (5,), generator=gen),
         "scores": torch.rand(5, generator=gen)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)},
        {"boxes": random_boxes(2, 96, gen), "labels": torch.randint(0, num_classes, (2,), generator=gen),
         "scores": torch.rand(2, generator=gen)},
    ]
    return model, images, targets


def assert_close_lists(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- tests
def test_rpn_matches_torchvision_in_training_and_inference():
    model, images, targets = model_and_batch()
    image_list, features = model.extract(images)
    features = {k: v.detach() for k, v in features.items()}
    for training in (True, False):
        model.rpn.train(training)
        ref = reference_rpn(model.rpn)
        state = torch.get_rng_state()
        boxes, losses = model.rpn(image_list, features, targets if training else None)
        after_new = torch.get_rng_state()
        torch.set_rng_state(state)
        ref_boxes, ref_losses = ref(image_list, features, targets if training else None)
        assert torch.equal(after_new, torch.get_rng_state())  # the same random draws
        assert_close_lists(boxes, ref_boxes)
        assert losses.keys() == ref_losses.keys()
        for k in losses:
            torch.testing.assert_close(losses[k], ref_losses[k], atol=1e-6, rtol=1e-5)


def test_rpn_assign_and_loss_keep_torchvision_list_api():
    """PseCo calls these on its own maps with list inputs."""
    model, images, targets = model_and_batch(seed=1)
    image_list, features = model.extract(images)
    maps = [f.detach() for f in features.values()]
    ref = reference_rpn(model.rpn)
    anchors = model.rpn.anchor_generator(image_list, maps)
    ref_anchors = ref.anchor_generator(image_list, maps)
    assert_close_lists(anchors, ref_anchors, atol=0)
    labels, matched = model.rpn.assign_targets_to_anchors(anchors, targets)
    ref_labels, ref_matched = ref.assign_targets_to_anchors(ref_anchors, targets)
    assert_close_lists(labels, ref_labels, atol=0)
    assert_close_lists(matched, ref_matched, atol=0)
    objectness, deltas = model.rpn.head(maps)
    from torchvision.models.detection.rpn import concat_box_prediction_layers
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    reg = model.rpn.box_coder.encode(matched, anchors)
    state = torch.get_rng_state()
    new = model.rpn.compute_loss(objectness, deltas, labels, reg)
    torch.set_rng_state(state)
    old = ref.compute_loss(objectness, deltas, ref_labels, reg)
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b)


def test_roi_sampling_matches_per_image_loop_and_draws():
    model, images, targets = model_and_batch(seed=2)
    gen = torch.Generator().manual_seed(5)
    proposals = [random_boxes(n, 90, gen) for n in (60, 0, 45)]
    state = torch.get_rng_state()
    new = model.roi_heads.sample(proposals, targets)
    after_new = torch.get_rng_state()
    torch.set_rng_state(state)
    old = reference_sample(model.roi_heads, proposals, targets)
    assert torch.equal(after_new, torch.get_rng_state())
    assert_close_lists(new.proposals, old.proposals, atol=0)
    assert torch.equal(new.labels, old.labels)
    assert torch.equal(new.matched_scores, old.matched_scores)
    assert_close_lists(new.matched_idxs, old.matched_idxs, atol=0)
    torch.testing.assert_close(new.regression_targets, old.regression_targets)
    # targets without scores (ground truth) and a batch where no image has a box
    plain = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 3
    for tg in (plain, empty):
        torch.manual_seed(3)
        new = model.roi_heads.sample(proposals, tg)
        torch.manual_seed(3)
        old = reference_sample(model.roi_heads, proposals, tg)
        assert torch.equal(new.labels, old.labels) and torch.equal(new.matched_scores, old.matched_scores)
        assert_close_lists(new.proposals, old.proposals, atol=0)


def test_postprocess_matches_per_image_loop():
    model, _, _ = model_and_batch(seed=3, num_classes=4)
    heads = model.roi_heads
    gen = torch.Generator().manual_seed(7)
    proposals = [random_boxes(n, 100, gen, max_side=60) for n in (80, 0, 150)]
    r = sum(len(p) for p in proposals)
    logits = torch.randn(r, 5, generator=gen) * 2
    deltas = torch.randn(r, 16, generator=gen) * 0.3
    sizes = [(90, 100), (64, 64), (100, 80)]
    new = heads.postprocess(logits, deltas, proposals, sizes)
    old = reference_postprocess(heads, logits, deltas, proposals, sizes)
    for a, b in zip(new, old):
        for k in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[k], b[k])


def test_nms_top_matches_torchvision_batched_nms():
    gen = torch.Generator().manual_seed(11)
    for n, groups, max_keep in ((1500, 5, 300), (700, 3, 100), (40, 2, 100), (0, 1, 10)):
        boxes = random_boxes(n, 200, gen, max_side=50)
        scores = torch.rand(n, generator=gen)
        idx = torch.randint(0, groups, (n,), generator=gen)
        want = box_ops.batched_nms(boxes, scores, idx, 0.6)[:max_keep]
        assert torch.equal(nms_top(boxes, scores, idx, 0.6, max_keep), want)
    # per image: indices into the flat candidates, each image's own top-k
    image_idx = torch.tensor([0] * 300 + [2] * 200)
    boxes, scores = random_boxes(500, 150, gen), torch.rand(500, generator=gen)
    groups = torch.randint(0, 3, (500,), generator=gen)
    for one_call in (False, True):  # per image (CPU) and one call for the batch (GPU)
        keeps = nms_per_image(boxes, scores, groups, image_idx, 3, 3, 0.5, 50, one_call=one_call)
        assert len(keeps) == 3 and len(keeps[1]) == 0
        assert torch.equal(keeps[0], box_ops.batched_nms(boxes[:300], scores[:300], groups[:300], 0.5)[:50])
        assert torch.equal(keeps[2], 300 + box_ops.batched_nms(boxes[300:], scores[300:], groups[300:], 0.5)[:50])


def test_pool_by_level_matches_roi_align_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(2, 8, 96 // 2**k, 80 // 2**k, generator=gen)
             .contiguous(memory_format=torch.channels_last).requires_grad_() for k in (2, 3, 4, 5)}
    proposals = [random_boxes(70, 80, gen, max_side=80), random_boxes(50, 80, gen, max_side=80)]
    # boxes partly or wholly outside the map, degenerate, and at its far edge
    proposals[0][:4] = torch.tensor([[-5.0, -5, 90, 100], [-40, -40, -20, -20], [10, 10, 10, 10], [70, 90, 80, 96]])
    for subset, aligned in (((2, 3, 4, 5), True), ((3, 4, 5), True), ((2, 3, 4, 5), False)):
        fs = {k: feats[k] for k in subset}  # (3, 4, 5): LSM's shifted pyramid has no P2 source
        new, has = pool_by_level(fs, proposals, canonical_scale=20, aligned=aligned)
        old, ref_has = reference_pool_by_level(fs, proposals, canonical_scale=20, aligned=aligned)
        assert torch.equal(has, ref_has)
        torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
        g = torch.randn(old.shape, generator=gen)
        grads = torch.autograd.grad((new * g).sum(), list(fs.values()))
        ref_grads = torch.autograd.grad((old * g).sum(), list(fs.values()))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_detect_and_train_forward_match_the_reference_pipeline():
    """The whole detector: torchvision's RPN + the per-image RoI code give the same losses and detections."""
    model, images, targets = model_and_batch(seed=4)
    image_list, features = model.extract(images)
    ref_rpn = reference_rpn(model.rpn)
    heads = model.roi_heads
    torch.manual_seed(9)
    fwd = model.train_forward(images, targets)
    torch.manual_seed(9)
    props, rpn_losses = ref_rpn(image_list, features, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    samples = reference_sample(heads, props, targets)
    pooled, _ = reference_pool_by_level({k: features[f"p{k}"] for k in (2, 3, 4, 5)}, samples.proposals,
                                        heads.canonical_scale)
    logits, deltas = heads.box_predictor(heads.box_head(pooled))
    ref_losses = {"loss_rpn_cls": rpn_losses["loss_objectness"], "loss_rpn_loc": rpn_losses["loss_rpn_box_reg"],
                  **heads.losses(logits, deltas, samples)}
    for k in ref_losses:
        torch.testing.assert_close(fwd.losses[k], ref_losses[k], atol=1e-5, rtol=1e-4)
    model.eval()  # the tiny trunk's BatchNorm: eval-mode features for detection
    ref_rpn.eval()
    dets = model.detect(images)
    with torch.no_grad():
        image_list, features = model.extract(images)
        props, _ = ref_rpn(image_list, features)
        pooled, _ = reference_pool_by_level({k: features[f"p{k}"] for k in (2, 3, 4, 5)}, props, heads.canonical_scale)
        logits, deltas = heads.box_predictor(heads.box_head(pooled))
        ref_dets = reference_postprocess(heads, logits, deltas, props, image_list.image_sizes)
    for a, b in zip(dets, ref_dets):
        for k in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


def test_ema_update_matches_per_tensor_update():
    from adapters.engine.ema import ema_update

    torch.manual_seed(0)
    student, teacher = build_faster_rcnn(tiny_cfg(), 3), build_faster_rcnn(tiny_cfg(), 3)
    student.train()(*model_and_batch()[1:])  # train-mode BatchNorm: running statistics and counters move
    for include_buffers in (True, False):
        want = {k: v.clone() for k, v in teacher.state_dict().items()}
        s_state = student.state_dict()
        names = want if include_buffers else dict(teacher.named_parameters())
        for name in names:
            if want[name].dtype.is_floating_point:
                want[name].mul_(0.9).add_(s_state[name], alpha=1 - 0.9)
            else:
                want[name].copy_(s_state[name])
        ema_update(teacher, student, 0.9, include_buffers)
        for k, v in teacher.state_dict().items():
            assert torch.equal(v, want[k]), k


def test_folded_frozen_bn_cache_follows_every_change_of_its_inputs():
    from adapters.models.faster_rcnn import build_backbone
    from adapters.models.frozen_bn import ConvWithFrozenBN

    torch.manual_seed(0)
    backbone = build_backbone("mobilenet_v2_fpn", "none", trainable_layers=0, fpn_channels=8).eval()
    convs = [m for m in backbone.modules() if isinstance(m, ConvWithFrozenBN)]
    x = torch.rand(1, 3, 64, 64)

    def fresh():  # the fold recomputed for every convolution (no cache)
        for m in convs:
            m.__dict__.pop("_fold_cache", None)
        return backbone(x)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    out = backbone(x)
    assert same(backbone(x), out) and same(fresh(), out)  # cached == recomputed, bit for bit
    with torch.no_grad():
        convs[3].bn[0].running_var.mul_(1.5)  # in place (as the EMA)
        convs[5].weight.add_(0.01)
    assert not same(backbone(x), out)
    assert same(backbone(x), fresh())
    state = {k: v + 0.001 if v.is_floating_point() else v for k, v in backbone.state_dict().items()}
    backbone.load_state_dict(state)
    assert same(backbone(x), fresh())
    # a convolution that trains is folded in the graph: its weight gets a gradient
    convs[2].weight.requires_grad_(True)
    backbone(x)["p2"].sum().backward()
    assert convs[2].weight.grad is not None


def test_a_replaced_sampler_is_still_called_per_image(monkeypatch):
    """A deterministic stand-in for torchvision's sampler (the DDP test's) keeps working."""
    calls = []

    def first(self, matched_idxs):
        calls.append(len(matched_idxs))
        pos = [torch.zeros_like(m, dtype=torch.uint8).index_fill_(0, torch.where(m >= 1)[0][:2], 1) for m in matched_idxs]
        neg = [torch.zeros_like(m, dtype=torch.uint8).index_fill_(0, torch.where(m == 0)[0][:3], 1) for m in matched_idxs]
        return pos, neg

    model, images, targets = model_and_batch(seed=5)
    monkeypatch.setattr(det_utils.BalancedPositiveNegativeSampler, "__call__", first)
    fwd = model.train_forward(images, targets)
    assert calls and all(torch.isfinite(v) for v in fwd.losses.values())
    assert [len(p) for p in fwd.samples.proposals] == [5, 3, 5]  # 2 positives (if any) + 3 negatives per image


def test_nms_top_with_few_survivors_matches_torchvision():
    """Clustered boxes (a trained RPN's): most are suppressed, the prefix must grow."""
    gen = torch.Generator().manual_seed(3)
    centers = torch.rand(40, 2, generator=gen) * 150
    base = torch.cat([centers, centers + 30], 1)
    boxes = (base.repeat(40, 1) + torch.randn(1600, 4, generator=gen)).clamp(min=0)
    scores = torch.rand(1600, generator=gen)
    groups = torch.randint(0, 4, (1600,), generator=gen)
    for max_keep in (30, 100, 300):
        want = box_ops.batched_nms(boxes, scores, groups, 0.7)[:max_keep]
        assert torch.equal(nms_top(boxes, scores, groups, 0.7, max_keep), want)


def _random_detections(gen, n_images):
    out = []
    for i in range(n_images):
        n = int(torch.randint(0, 6, (1,), generator=gen)) if i else 0  # the first image has none
        xy = torch.rand(n, 2, generator=gen) * 50
        wh = torch.rand(n, 2, generator=gen) * 30 + 1
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 3, (n,), generator=gen),
                    "scores": torch.rand(n, generator=gen)})
    return out


def test_pseudo_label_filter_and_stats_match_the_per_image_code():
    """The batched filter (two syncs) and statistics (one sync) equal the per-image loops they replace."""
    import numpy as np
    from torchvision.ops import box_iou

    from adapters.engine.mean_teacher import _area, _size_bin, filter_pseudo_labels, pseudo_label_stats

    gen = torch.Generator().manual_seed(0)
    dets, gt = _random_detections(gen, 5), _random_detections(gen, 5)
    scale = [1.0, 0.5, 2.0, 1.5, 1.0]
    for kwargs in ({}, {"min_area": 200.0, "high": 0.8, "pixel_scale": scale}):
        got = filter_pseudo_labels(dets, 0.4, **kwargs)
        for d, g, s in zip(dets, got, scale):
            keep = d["scores"] > 0.4
            if kwargs:
                keep = (d["scores"] > 0.8) | (keep & (_area(d["boxes"]) * s > 200.0))
            for k in ("boxes", "labels", "scores"):
                assert torch.equal(g[k], d[k][keep])
    pseudo = filter_pseudo_labels(dets, 0.2)
    stats = pseudo_label_stats(pseudo, gt, scale, area_scale=0.2)
    tp, npred, hit, ngt = (np.zeros(3) for _ in range(4))
    for p, g, s in zip(pseudo, gt, scale):
        pb, gb = _size_bin(_area(p["boxes"]) * s, 0.2), _size_bin(_area(g["boxes"]) * s, 0.2)
        match = (box_iou(p["boxes"], g["boxes"]) >= 0.5) & (p["labels"][:, None] == g["labels"][None, :])
        for b in range(3):
            npred[b] += int((pb == b).sum())
            tp[b] += int((match.any(1) & (pb == b)).sum())
            ngt[b] += int((gb == b).sum())
            hit[b] += int((match.any(0) & (gb == b)).sum())
    assert stats["pl_recall"] == pytest.approx(hit.sum() / ngt.sum())
    assert stats["pl_precision"] == pytest.approx(tp.sum() / npred.sum())
    for b, name in enumerate(("small", "medium", "large")):
        if ngt[b]:
            assert stats[f"pl_recall_{name}"] == pytest.approx(hit[b] / ngt[b])


def test_lsm_proposal_selection_matches_per_image_masks():
    from adapters.lsm import _select

    proposals = [torch.arange(4.0).view(2, 2), torch.zeros(0, 2), torch.arange(10.0, 16.0).view(3, 2)]
    flat = torch.tensor([0, 2, 4])  # image 0's first, image 2's first and last
    got = _select(proposals, flat)
    assert [g.tolist() for g in got] == [[[0.0, 1.0]], [], [[10.0, 11.0], [14.0, 15.0]]]
