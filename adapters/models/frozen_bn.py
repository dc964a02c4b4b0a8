"""Frozen BatchNorm folded into the convolution before it, at forward time.

A FrozenBatchNorm2d is an affine map per channel, y = x * scale + shift, applied to a whole
activation map: two passes over memory that cost a quarter of a frozen MobileNetV2 trunk's forward
on a CPU. Folding it into the preceding convolution (weight * scale, bias = shift) does the same
work on the weights instead. The fold is recomputed at every forward, so it stays exact while the
convolution trains, and the BN buffers keep their names: state dicts, checkpoints, ImageNet
weights and the mean teacher's EMA see the same keys as before.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """Keeps the buffers; its affine map is applied by the convolution before it."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale


class ConvWithFrozenBN(nn.Conv2d):
    """A Conv2d whose output is that of the folded BN after it."""

    bn: tuple[FoldedFrozenBatchNorm2d]  # a tuple, so the BN is not registered twice

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.bn[0].scale_shift()
        weight = self.weight * scale.view(-1, 1, 1, 1)
        bias = shift if self.bias is None else shift + self.bias * scale
        return self._conv_forward(x, weight, bias)


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Fold every FrozenBatchNorm2d registered right after a Conv2d of the same parent; returns the count.

    Pairing by registration order is how torchvision's ResNet (conv1/bn1, downsample's conv/bn) and
    MobileNetV2 (Conv2dNormActivation, the projection conv/bn) apply them: bn(conv(x)) with nothing
    in between. Only use it on such trunks; the equality test in tests/adapters checks both.
    """
    folded = 0
    for parent in module.modules():
        previous = None
        for child in parent.children():
            if (type(child) is FrozenBatchNorm2d and type(previous) is nn.Conv2d
                    and previous.out_channels == child.weight.numel()):
                child.__class__ = FoldedFrozenBatchNorm2d
                previous.__class__ = ConvWithFrozenBN
                previous.bn = (child,)
                folded += 1
            previous = child
    return folded
