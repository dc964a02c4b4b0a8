"""Deformable DETR (Zhu et al., ICLR 2021): Hugging Face `transformers` for the network, our criterion.

The encoder-decoder is `transformers.DeformableDetrModel` built from a config (random init, no hub
access: nothing is downloaded, `HF_HUB_OFFLINE=1` is safe). Its convolutional trunk is swapped for
a torchvision one (R50 FrozenBN as the official repo, MobileNetV2 or the tiny CPU trunk of
adapters/models/faster_rcnn.py), so the ImageNet weights the Faster R-CNN presets use load the same
way. The heads (class_embed, bbox_embed) and the loss are ours, following the official recipe, not
HF's defaults, which differ from it:
- Hungarian matching per image (scipy) with cost 2 * focal-class + 5 * L1 + 2 * (-GIoU);
- sigmoid focal classification (alpha 0.25, gamma 2) weight 2, L1 weight 5, GIoU weight 2, all
  summed over matched pairs (focal over every query x class) and divided by the number of boxes;
- the same three losses on every decoder layer, each layer matched on its own;
- evaluation post-processing: top-100 over (query, class) pairs; pseudo-labels: per-query argmax
  first, then the score threshold (a query yields at most one box).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou

from core.errors import BenchError

PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
SIZE_DIVISIBILITY = 32  # padded batches halve exactly for LSM's 0.5x stack


# ----------------------------------------------------------------------------- boxes
def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def xyxy_to_cxcywh(b: Tensor) -> Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def normalize_targets(targets: list[dict], sizes: list[tuple[int, int]]) -> list[dict]:
    """Pixel xyxy boxes -> cxcywh in [0, 1] of each image's own (unpadded) size, as DETR predicts."""
    out = []
    for t, (h, w) in zip(targets, sizes):
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=t["boxes"].device)
        n = {**t, "boxes": xyxy_to_cxcywh(t["boxes"].float() / scale)}
        out.append(n)
    return out


# ----------------------------------------------------------------------------- criterion
def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss (RetinaNet), not reduced."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


@dataclass
class LossWeights:
    """Official Deformable DETR coefficients (main.py): matcher and loss."""

    class_cost: float = 2.0
    bbox_cost: float = 5.0
    giou_cost: float = 2.0
    cls: float = 2.0
    bbox: float = 5.0
    giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


Indices = list[tuple[Tensor, Tensor]]  # per image: (query indices, target indices)


class SetCriterion:
    """Hungarian matching + the DETR set loss on per-layer outputs.

    `match` is the only place `linear_sum_assignment` is called, so a caller that reuses indices
    (LSM's PIM branch) provably runs no second matching.
    """

    def __init__(self, weights: LossWeights | None = None):
        self.w = weights or LossWeights()

    @torch.no_grad()
    def match(self, logits: Tensor, boxes: Tensor, targets: list[dict]) -> Indices:
        """logits (B, Q, K), boxes (B, Q, 4) normalised cxcywh; targets: labels, boxes (normalised cxcywh)."""
        w = self.w
        out = []
        for b, t in enumerate(targets):
            n = len(t["labels"])
            if n == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            p = logits[b].sigmoid().float()
            a, g = w.focal_alpha, w.focal_gamma
            neg = (1 - a) * p ** g * -(1 - p + 1e-8).log()
            pos = a * (1 - p) ** g * -(p + 1e-8).log()
            cost_class = (pos - neg)[:, t["labels"]]
            cost_bbox = torch.cdist(boxes[b].float(), t["boxes"].float(), p=1)
            cost_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes[b].float()), cxcywh_to_xyxy(t["boxes"].float()))
            c = w.bbox_cost * cost_bbox + w.class_cost * cost_class + w.giou_cost * cost_giou
            qi, ti = linear_sum_assignment(c.cpu().numpy())
            out.append((torch.as_tensor(qi, dtype=torch.int64), torch.as_tensor(ti, dtype=torch.int64)))
        return out

    def match_layers(self, logits: Tensor, boxes: Tensor, targets: list[dict]) -> list[Indices]:
        """One matching per decoder layer (auxiliary losses are re-matched per layer)."""
        return [self.match(logits[l], boxes[l], targets) for l in range(logits.shape[0])]

    def layer_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict], indices: Indices,
                     positive: list[Tensor] | None = None) -> dict[str, Tensor]:
        """Unweighted focal / L1 / GIoU of one layer, each summed and divided by the number of
        positive boxes (>= 1).

        `positive[b]` (bool per target) marks the targets this branch learns from; a query matched
        to a non-positive target is ignored by the classification loss (neither object nor
        background) and has no box loss. None: every target is positive (plain DETR)."""
        B, Q, _ = logits.shape
        onehot = torch.zeros_like(logits)
        weight = torch.ones(B, Q, 1, dtype=logits.dtype, device=logits.device)
        src_boxes, tgt_boxes = [], []
        num = 0
        for b, (qi, ti) in enumerate(indices):
            qi, ti = qi.to(logits.device), ti.to(logits.device)
            pos = torch.ones(len(ti), dtype=torch.bool, device=logits.device) if positive is None \
                else positive[b].to(logits.device)[ti]
            onehot[b, qi[pos], targets[b]["labels"][ti[pos]]] = 1.0
            weight[b, qi[~pos]] = 0.0
            src_boxes.append(boxes[b, qi[pos]])
            tgt_boxes.append(targets[b]["boxes"][ti[pos]].to(boxes))
            num += int(pos.sum())
        n = max(num, 1)
        loss_cls = (sigmoid_focal_loss(logits, onehot, self.w.focal_alpha, self.w.focal_gamma) * weight).sum() / n
        src, tgt = torch.cat(src_boxes), torch.cat(tgt_boxes)
        if len(src):
            loss_bbox = F.l1_loss(src, tgt, reduction="sum") / n
            loss_giou = (1 - torch.diag(generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)))).sum() / n
        else:
            loss_bbox = loss_giou = boxes.sum() * 0
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def losses(self, logits: Tensor, boxes: Tensor, targets: list[dict], indices: list[Indices],
               positive: list[Tensor] | None = None) -> dict[str, Tensor]:
        """Weighted loss summed over decoder layers (logits (L, B, Q, K), boxes (L, B, Q, 4)):
        loss_cls = 2 * focal, loss_bbox = 5 * L1, loss_giou = 2 * (1 - GIoU)."""
        total = {"loss_cls": 0.0, "loss_bbox": 0.0, "loss_giou": 0.0}
        for l in range(logits.shape[0]):
            part = self.layer_losses(logits[l], boxes[l], targets, indices[l], positive)
            total["loss_cls"] = total["loss_cls"] + self.w.cls * part["loss_cls"]
            total["loss_bbox"] = total["loss_bbox"] + self.w.bbox * part["loss_bbox"]
            total["loss_giou"] = total["loss_giou"] + self.w.giou * part["loss_giou"]
        return total


# ----------------------------------------------------------------------------- trunk
class _Trunk(nn.Module):
    """A torchvision trunk returning its stride 8 / 16 / 32 maps as a list (what HF's conv encoder
    passes to `input_proj`)."""

    def __init__(self, body: nn.Module, return_layers: list[str], channels: list[int]):
        super().__init__()
        self.body = body
        self.return_layers = return_layers
        self.channels = channels

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for name, module in self.body.named_children():
            x = module(x)
            if name in self.return_layers:
                out.append(x)
                if len(out) == len(self.return_layers):
                    break
        return out


def build_trunk(arch: str, weights: str, trainable_layers: int) -> _Trunk:
    """R50 (FrozenBN; official: stem + layer1 frozen), MobileNetV2 (FrozenBN) or the tiny trunk."""
    from torchvision.models import mobilenet_v2, resnet50
    from torchvision.ops import misc as misc_nn_ops

    from adapters.models.faster_rcnn import (
        TinyTrunk,
        _load_backbone_weights,
        resolve_weights,
    )

    weights = resolve_weights({"mobilenet_v2": "mobilenet_v2_fpn"}.get(arch, arch), weights)
    if arch == "r50":
        net = resnet50(weights="IMAGENET1K_V1" if weights == "imagenet" else None,
                       norm_layer=misc_nn_ops.FrozenBatchNorm2d)
        if weights not in ("none", "imagenet"):
            _load_backbone_weights(net, weights)
        body = nn.Sequential(*[(getattr(net, n)) for n in ("conv1", "bn1", "relu", "maxpool",
                                                           "layer1", "layer2", "layer3", "layer4")])
        stages = [body[4], body[5], body[6], body[7]]
        frozen = [body[0], body[1]] + stages[: 4 - trainable_layers] if trainable_layers < 5 else []
        for m in frozen:
            m.requires_grad_(False)
        return _Trunk(body, ["5", "6", "7"], [512, 1024, 2048])
    if arch == "mobilenet_v2":
        net = mobilenet_v2(weights="IMAGENET1K_V1" if weights == "imagenet" else None,
                           norm_layer=misc_nn_ops.FrozenBatchNorm2d)
        if weights not in ("none", "imagenet"):
            _load_backbone_weights(net, weights)
        trunk = net.features[:18]
        n_frozen = {5: 0, 4: 2, 3: 4, 2: 7, 1: 14, 0: 18}[trainable_layers]
        trunk[:n_frozen].requires_grad_(False)
        return _Trunk(trunk, ["6", "13", "17"], [32, 96, 320])
    if arch == "tiny":
        if weights == "imagenet":
            raise BenchError("ddetr.backbone_weights=imagenet is only available for r50 and mobilenet_v2; use none "
                             "or a .pth file")
        trunk = TinyTrunk()
        if weights != "none":
            _load_backbone_weights(trunk, weights)
        body = nn.Sequential(trunk.stem, trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
        return _Trunk(body, ["2", "3", "4"], list(trunk.widths[1:]))
    raise BenchError(f"unknown ddetr.backbone '{arch}'; known: r50, mobilenet_v2, tiny")


# ----------------------------------------------------------------------------- the detector
@dataclass
class DetrOutputs:
    """Per decoder layer (L first): class logits (L, B, Q, K), boxes (L, B, Q, 4) normalised cxcywh,
    decoder states (L, B, Q, D). The last layer is the prediction."""

    logits: Tensor
    boxes: Tensor
    hidden: Tensor


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, n: int):
        super().__init__()
        dims = [d_in] + [d_hidden] * (n - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [d_out]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def _inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DeformableDETR(nn.Module):
    """HF DeformableDetrModel + our class / box heads (shared across decoder layers, no box
    refinement: the plain Deformable DETR of Table 3's Omega row). `forward` in eval mode returns
    detections like the Faster R-CNN, so `run_inference` evaluates either."""

    def __init__(self, cfg, num_classes: int):
        super().__init__()
        from transformers import DeformableDetrConfig, DeformableDetrModel, ResNetConfig

        self.num_classes = num_classes
        self.detections_per_img = cfg.detections_per_img
        trunk = build_trunk(cfg.backbone, cfg.backbone_weights, cfg.trainable_layers)
        # HF builds its conv encoder from `backbone_config`; a minimal ResNet whose stage widths
        # equal the trunk's gives `input_proj` the right in-channels, then the trunk replaces it.
        placeholder = ResNetConfig(embedding_size=8, hidden_sizes=[8] + trunk.channels, depths=[1, 1, 1, 1],
                                   layer_type="basic", out_features=["stage2", "stage3", "stage4"])
        hf_cfg = DeformableDetrConfig(
            backbone_config=placeholder, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
            decoder_layers=cfg.decoder_layers, encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim,
            encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
            encoder_n_points=cfg.n_points, decoder_n_points=cfg.n_points, num_queries=cfg.num_queries,
            num_feature_levels=4, dropout=cfg.dropout, with_box_refine=False, two_stage=False,
            disable_custom_kernels=True,  # the pure-PyTorch deformable attention (CPU and GPU)
        )
        self.transformer = DeformableDetrModel(hf_cfg)
        self.transformer.backbone.model = trunk
        self.transformer.backbone.intermediate_channel_sizes = trunk.channels
        d = cfg.d_model
        self.class_embed = nn.Linear(d, num_classes)
        self.bbox_embed = MLP(d, d, 4, 3)
        prior = 0.01  # official init: every query starts as background with p = 0.01
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior) / prior))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        # official init: w and h start at sigmoid(-2) ~ 0.12 of the image, not 0.5 (large boxes that
        # match nothing well in the first iterations)
        nn.init.constant_(self.bbox_embed.layers[-1].bias[2:], -2.0)
        self.aux_class_embed: nn.Linear | None = None  # LSM's F_aux (attach_aux_classifier)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)
        if cfg.weights != "none":
            load_detector_weights(self, cfg.weights)

    # -- pieces -----------------------------------------------------------------------------------
    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
        """Normalised, zero-padded batch (sides divisible by 32), its pixel mask (1 = image), sizes."""
        sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        d = SIZE_DIVISIBILITY
        h = int(math.ceil(max(s[0] for s in sizes) / d) * d)
        w = int(math.ceil(max(s[1] for s in sizes) / d) * d)
        batch = images[0].new_zeros((len(images), 3, h, w))
        mask = torch.zeros((len(images), h, w), dtype=torch.long, device=images[0].device)
        for i, img in enumerate(images):
            batch[i, :, : img.shape[-2], : img.shape[-1]] = (img - self.pixel_mean) / self.pixel_std
            mask[i, : img.shape[-2], : img.shape[-1]] = 1
        return batch, mask, sizes

    def decode(self, pixel_values: Tensor, pixel_mask: Tensor) -> DetrOutputs:
        """Trunk -> encoder -> decoder (HF), then the shared heads on every decoder layer."""
        out = self.transformer(pixel_values=pixel_values, pixel_mask=pixel_mask)
        hidden = out.intermediate_hidden_states.transpose(0, 1)  # (L, B, Q, D)
        ref = _inverse_sigmoid(out.init_reference_points)  # (B, Q, 2): no refinement, same every layer
        delta = self.bbox_embed(hidden)
        boxes = torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1).sigmoid()
        return DetrOutputs(self.class_embed(hidden), boxes, hidden)

    def forward_train(self, images: list[Tensor]) -> tuple[DetrOutputs, Tensor, Tensor, list[tuple[int, int]]]:
        pixel_values, pixel_mask, sizes = self.preprocess(images)
        return self.decode(pixel_values, pixel_mask), pixel_values, pixel_mask, sizes

    # -- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, images: list[Tensor]) -> list[dict]:
        """Evaluation post-processing: top-`detections_per_img` over all (query, class) pairs of the
        last layer (a query may appear with several classes, as the official PostProcess)."""
        outs, _, _, sizes = self.forward_train(images)
        prob = outs.logits[-1].sigmoid()
        _, Q, K = prob.shape
        k = min(self.detections_per_img, Q * K)
        scores, idx = prob.flatten(1).topk(k, dim=1)
        query, labels = idx // K, idx % K
        res = []
        for b, (h, w) in enumerate(sizes):
            boxes = cxcywh_to_xyxy(outs.boxes[-1, b, query[b]]) * torch.tensor([w, h, w, h], device=prob.device)
            res.append({"boxes": boxes, "scores": scores[b], "labels": labels[b]})
        return res

    @torch.no_grad()
    def pseudo_label(self, images: list[Tensor], threshold: float) -> list[dict]:
        """Pseudo-labels from DETR outputs: each query's argmax class first, then score >= threshold,
        so a query gives at most one box (top-k over (query, class) pairs would duplicate it)."""
        outs, _, _, sizes = self.forward_train(images)
        return per_query_detections(outs.logits[-1], outs.boxes[-1], sizes, threshold)

    def forward(self, images: list[Tensor]):
        if self.training:
            raise ValueError("DeformableDETR trains through forward_train + SetCriterion (adapters/ddetr.py)")
        return self.detect(images)


def per_query_detections(logits: Tensor, boxes: Tensor, sizes: list[tuple[int, int]], threshold: float) -> list[dict]:
    """logits (B, Q, K), boxes (B, Q, 4) normalised cxcywh -> per image {boxes xyxy px, labels, scores}
    with one entry per query whose argmax score is >= threshold."""
    scores, labels = logits.sigmoid().max(-1)
    out = []
    for b, (h, w) in enumerate(sizes):
        keep = scores[b] >= threshold
        xyxy = cxcywh_to_xyxy(boxes[b, keep]) * torch.tensor([w, h, w, h], device=boxes.device, dtype=boxes.dtype)
        out.append({"boxes": xyxy, "labels": labels[b, keep], "scores": scores[b, keep]})
    return out


def load_detector_weights(model: DeformableDETR, path: str) -> None:
    """A full detector state_dict (ours; e.g. a converted checkpoint): every key must match, except
    LSM's F_aux which a checkpoint may lack."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"ddetr.weights '{path}' not found; use ddetr.weights=none or an existing .pth file")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    fix = "pass a checkpoint of the same ddetr.* configuration"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch
        first = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)
        raise BenchError(f"ddetr.weights '{path}' does not match this Deformable DETR ({first.strip()}); {fix}") from None
    missing = [k for k in missing if not k.startswith("aux_class_embed.")]
    if missing or unexpected:
        raise BenchError(f"ddetr.weights '{path}' does not match this Deformable DETR (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); {fix}")


def build_deformable_detr(cfg, num_classes: int) -> DeformableDETR:
    """From the `ddetr` config section."""
    if cfg.d_model % 32 or cfg.d_model % cfg.num_heads:
        raise BenchError(f"ddetr.d_model ({cfg.d_model}) must be a multiple of 32 (GroupNorm) and of ddetr.num_heads "
                         f"({cfg.num_heads}); use e.g. 64, 128 or 256")
    return DeformableDETR(cfg, num_classes)


def param_groups(model: DeformableDETR, base_lr: float, backbone_mult: float, linear_proj_mult: float) -> list[dict]:
    """Official lr groups: trunk x backbone_mult (2e-5 / 2e-4), sampling_offsets and reference_points
    x linear_proj_mult, everything else base_lr. Frozen parameters are left out."""
    groups = {"rest": [], "backbone": [], "linear_proj": []}  # first group's lr is the one the trainer logs
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("transformer.backbone."):
            groups["backbone"].append(p)
        elif "sampling_offsets" in name or "reference_points" in name:
            groups["linear_proj"].append(p)
        else:
            groups["rest"].append(p)
    lr = {"rest": base_lr, "backbone": base_lr * backbone_mult, "linear_proj": base_lr * linear_proj_mult}
    return [{"params": ps, "lr": lr[k], "name": k} for k, ps in groups.items() if ps]
