"""Supervised baseline: Faster R-CNN on the labeled split only (the paper's "Supervised" row)."""

from __future__ import annotations

from adapters.base import Adapter, StepOutput, batch_to_device, register


@register("supervised")
class Supervised(Adapter):
    labeled_views = ("weak",)

    def training_step(self, iteration: int, batch: dict) -> StepOutput:
        self.student.train()
        images, targets = batch_to_device(batch["labeled"], "weak", self.device)
        losses = self.student.train_forward(images, targets).losses
        return StepOutput({f"{k}_sup": v for k, v in losses.items()})
