"""MLC (adapters/mlc.py): the 0.5x view, its scaled pseudo-boxes and the weighted terms."""

from types import SimpleNamespace

import pytest
import torch

from adapters import mlc
from adapters.models.faster_rcnn import build_faster_rcnn
from core.config import MLCConfig
from tests.adapters.test_faster_rcnn import tiny_cfg

ON = MLCConfig(enabled=True)


def test_scaled_view_halves_images_and_boxes_and_keeps_the_other_fields():
    img = torch.arange(3 * 8 * 6, dtype=torch.float32).reshape(3, 8, 6)
    target = {"boxes": torch.tensor([[2.0, 2, 6, 8], [5.5, 0, 6, 2]]), "labels": torch.tensor([4, 7]),
              "scores": torch.tensor([0.9, 0.6])}
    (small,), (t,) = mlc.scaled_view([img], [target], 0.5)
    assert small.shape == (3, 4, 3)
    assert torch.equal(small, img[:, ::2, ::2])  # nearest: pixel (i, j) of the 0.5x view is (2i, 2j)
    # [5.5, 0, 6, 2] -> [2.75, 0, 3, 1]: inside the 3 px wide view, kept
    assert t["boxes"].tolist() == [[1.0, 1.0, 3.0, 4.0], [2.75, 0.0, 3.0, 1.0]]
    assert t["labels"].tolist() == [4, 7] and t["scores"].tolist() == pytest.approx([0.9, 0.6])
    # an odd side: 7 px -> 3 px; a box beyond x = 6 collapses at the border and goes with its fields
    (small,), (t,) = mlc.scaled_view([torch.zeros(3, 7, 7)], [{"boxes": torch.tensor([[6.5, 0, 7, 2], [0, 0, 2, 2]]),
                                                                "labels": torch.tensor([1, 2])}], 0.5)
    assert small.shape == (3, 3, 3)
    assert t["boxes"].tolist() == [[0.0, 0.0, 1.0, 1.0]] and t["labels"].tolist() == [2]


class BoxEcho:
    """A stand-in detector that 'predicts' fixed boxes; its box loss is the L1 distance to the
    targets it is given, and it records its inputs."""

    def __init__(self, predicted):
        self.predicted = predicted

    def train_forward(self, images, targets):
        self.images, self.targets = images, targets
        l1 = sum((p - t["boxes"]).abs().sum() for p, t in zip(self.predicted, targets))
        return SimpleNamespace(losses={"loss_box_reg": l1, "loss_cls": torch.tensor(3.0)})


def test_loss_is_zero_when_the_small_view_predicts_the_scaled_pseudo_boxes():
    images = [torch.rand(3, 32, 48)]
    pseudo = [{"boxes": torch.tensor([[8.0, 8, 24, 24]]), "labels": torch.tensor([1])}]
    consistent = BoxEcho([torch.tensor([[4.0, 4, 12, 12]])])
    out = mlc.weighted_terms(consistent, images, pseudo, ON, lambda_u=2.0, terms=("loss_box_reg",))
    assert set(out) == {"loss_box_reg_mlc"} and out["loss_box_reg_mlc"].item() == 0.0
    assert consistent.images[0].shape == (3, 16, 24)
    # a detector that predicts the full-size boxes on the small view: |8-4|+|8-4|+|24-12|+|24-12| = 32,
    # times lambda_u 2 and weight 0.5
    unscaled = BoxEcho([torch.tensor([[8.0, 8, 24, 24]])])
    half = MLCConfig(enabled=True, weight=0.5)
    out = mlc.weighted_terms(unscaled, images, pseudo, half, lambda_u=2.0, terms=("loss_box_reg", "loss_cls"))
    assert out["loss_box_reg_mlc"].item() == pytest.approx(32.0)
    assert out["loss_cls_mlc"].item() == pytest.approx(3.0)  # 2 x 0.5 x 3


def test_disabled_by_default_and_part_of_the_cell_key_only_when_enabled():
    from core.config import load_config

    off, on = load_config("demo"), load_config("demo", ["mlc.enabled=true"])
    assert off.mlc == MLCConfig() and not off.mlc.enabled and off.mlc.scale == 0.5
    assert "mlc" not in off.key_dict() and on.key_dict()["mlc"]["enabled"] is True
    # a disabled MLC's other settings change nothing, so they leave the key alone
    assert load_config("demo", ["mlc.weight=3"]).key() == off.key()
    assert mlc.weighted_terms(None, [], [], MLCConfig()) == {}  # no forward at all when off
    with pytest.raises(ValueError):
        MLCConfig(scale=1.0)


def test_on_the_tiny_detector_the_terms_are_finite_and_train_the_student():
    torch.manual_seed(0)
    model = build_faster_rcnn(tiny_cfg(), num_classes=3)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 70)]
    pseudo = [{"boxes": torch.tensor([[4.0, 4, 40, 44]]), "labels": torch.tensor([2]), "scores": torch.tensor([0.9])},
              {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}]
    out = mlc.weighted_terms(model, images, pseudo, ON, lambda_u=4.0, terms=("loss_rpn_cls", "loss_cls"))
    assert set(out) == {"loss_rpn_cls_mlc", "loss_cls_mlc"}  # Unbiased Teacher's two unsupervised terms
    assert all(torch.isfinite(v) and v > 0 for v in out.values())
    sum(out.values()).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert model.rpn.head.cls_logits.weight.grad.abs().sum() > 0
    full = mlc.weighted_terms(model, images, pseudo, ON)
    assert set(full) == {f"{k}_mlc" for k in mlc.DETECTOR_TERMS}
