"""MLC: multi-view label-level consistency, the label-level half of PseCo's MSL (Li et al., ECCV 2022,
section 3.3), as a toggle any Faster R-CNN adapter can add.

The student also learns from a 0.5x copy of its unlabeled view, with the same pseudo-boxes scaled by
0.5: a detector whose predictions are consistent across scales predicts the scaled boxes there.
Unlike PseCo's feature-level half (the shifted pyramid of adapters/pseco.py, which reuses the full
view's anchors and RoIs), the copy goes through the ordinary detector (its own pyramid, RPN
proposals and RoI sampling), so it needs nothing from the host adapter but its images and
pseudo-labels. The LSM paper's Table 4 adds it to Unbiased Teacher and STAC ("UBT + MLC"); one line
in the host's `training_step` does it (UBT keeps only objectness and classification on pseudo-boxes):

    losses.update(mlc.weighted_terms(self.student, images_us, pseudo_main, self.cfg.mlc,
                                     semi.lambda_u, terms=("loss_rpn_cls", "loss_cls")))
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import boxes as box_ops

from core.config import MLCConfig

# The four losses of the shared detector's `train_forward`.
DETECTOR_TERMS = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg")


def scaled_view(images: list[Tensor], targets: list[dict], scale: float,
                mode: str = "nearest") -> tuple[list[Tensor], list[dict]]:
    """Each image resized by `scale` (size floor(side * scale)); boxes times `scale`, clipped to the
    new size; boxes that collapse are dropped with their other fields (labels, scores, ...)."""
    out_images, out_targets = [], []
    for img, t in zip(images, targets):
        small = F.interpolate(img[None], scale_factor=scale, mode=mode,
                              **({} if mode == "nearest" else {"align_corners": False}))[0]
        boxes = box_ops.clip_boxes_to_image(t["boxes"] * scale, tuple(small.shape[-2:]))
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        out_images.append(small)
        out_targets.append({k: (boxes if k == "boxes" else v)[ok] for k, v in t.items()})
    return out_images, out_targets


def weighted_terms(model, images: list[Tensor], pseudo: list[dict], cfg: MLCConfig, lambda_u: float = 1.0,
                   terms: tuple[str, ...] = DETECTOR_TERMS) -> dict[str, Tensor]:
    """lambda_u * weight * L_k on the scaled view, for each detector loss k in `terms` (the ones the
    host trains on pseudo-labels), named `<k>_mlc`; {} when MLC is disabled.

    `images` are the student's unlabeled views (the ones the host's pseudo-labels refer to),
    `pseudo` their pseudo-labels ({boxes, labels[, scores]}, already thresholded by the host).
    """
    if not cfg.enabled:
        return {}
    small, targets = scaled_view(images, pseudo, cfg.scale, cfg.mode)
    losses = model.train_forward(small, targets).losses
    return {f"{k}_mlc": lambda_u * cfg.weight * losses[k] for k in terms}

