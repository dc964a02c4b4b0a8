"""Folding FrozenBN into the conv before it changes neither outputs, gradients nor state-dict keys."""

import copy

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from adapters.models.faster_rcnn import build_backbone
from adapters.models.frozen_bn import ConvWithFrozenBN, FoldedFrozenBatchNorm2d


def _unfold(model):
    """The same model with plain Conv2d + FrozenBatchNorm2d again (the reference)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, ConvWithFrozenBN):
            m.__class__ = torch.nn.Conv2d
            del m.bn
        elif isinstance(m, FoldedFrozenBatchNorm2d):
            m.__class__ = FrozenBatchNorm2d
    return ref


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            for buf in (m.weight, m.bias, m.running_mean):
                buf.copy_(torch.randn(buf.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("arch,trainable,n_bn", [("mobilenet_v2_fpn", 2, 51), ("r50_fpn", 1, 53)])
def test_folded_trunk_matches_conv_then_frozen_bn(arch, trainable, n_bn):
    torch.manual_seed(0)
    model = build_backbone(arch, "none", trainable_layers=trainable, fpn_channels=8)
    _randomise_bn(model)
    assert sum(isinstance(m, ConvWithFrozenBN) for m in model.modules()) == n_bn
    assert not any(type(m) is FrozenBatchNorm2d for m in model.modules())  # every one folded
    ref = _unfold(model)
    assert list(model.state_dict()) == list(ref.state_dict())

    x = torch.randn(2, 3, 64, 64)
    out, want = model(x), ref(x)
    for name in want:  # float rounding relative to the map's scale (random BNs make large values)
        assert (out[name] - want[name]).abs().max() <= 1e-5 * want[name].abs().max()
    sum(o.square().sum() for o in out.values()).backward()
    sum(o.square().sum() for o in want.values()).backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and any("body" in n for n, _ in trained)  # a trainable trunk conv is checked too
    ref_params = dict(ref.named_parameters())
    for name, p in trained:
        want_grad = ref_params[name].grad
        assert (p.grad - want_grad).abs().max() <= 1e-4 * want_grad.abs().max(), name


def test_loaded_bn_statistics_are_used_after_folding():
    """The conv reads the BN buffers at forward time, so a later load_state_dict takes effect."""
    model = build_backbone("mobilenet_v2_fpn", "none", trainable_layers=0, fpn_channels=8)
    x = torch.randn(1, 3, 64, 64)
    before = model(x)["p2"].detach()
    state = model.state_dict()
    key = next(k for k in state if k.endswith("running_var"))
    state[key] = state[key] * 4
    model.load_state_dict(state)
    assert not torch.allclose(model(x)["p2"], before)
