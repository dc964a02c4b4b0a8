"""Run a detector over a data set and return detections in original image coordinates."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from core.data.loader import ViewDataset
from core.data.transforms import transform_boxes
from core.data.types import DetectionDataset


@torch.no_grad()
def run_inference(model: nn.Module, dataset: DetectionDataset, aug_cfg, device: torch.device,
                  batch_size: int = 8) -> list[dict]:
    """Test view (fixed short side, no flip), detect, map boxes back through the view's matrix."""
    was_training = model.training
    model.eval()
    views = ViewDataset(dataset, aug_cfg, views=("test",))
    out = []
    try:
        for start in range(0, len(dataset.records), batch_size):
            items = [views[(i, 0)] for i in range(start, min(start + batch_size, len(dataset.records)))]
            images = [it["views"]["test"].image.to(device) for it in items]
            for item, det in zip(items, model(images)):
                inv = np.linalg.inv(item["views"]["test"].matrix)
                boxes = transform_boxes(det["boxes"].float().cpu(), inv)
                out.append({"image_id": item["image_id"], "boxes": boxes,
                            "scores": det["scores"].float().cpu(), "labels": det["labels"].cpu()})
    finally:
        model.train(was_training)
    return out
