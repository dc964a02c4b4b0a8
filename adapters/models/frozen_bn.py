"""Frozen BatchNorm folded into the convolution before it, at forward time.

A FrozenBatchNorm2d is an affine map per channel, y = x * scale + shift, applied to a whole
activation map: two passes over memory that cost a quarter of a frozen MobileNetV2 trunk's forward
on a CPU. Folding it into the preceding convolution (weight * scale, bias = shift) does the same
work on the weights instead. The fold is recomputed at every forward, so it stays exact while the
convolution trains, and the BN buffers keep their names: state dicts, checkpoints, ImageNet
weights and the mean teacher's EMA see the same keys as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d


def is_pointwise(conv: nn.Conv2d) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped convolution: a matrix product over the channels."""
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid")
            and conv.dilation == (1, 1) and conv.groups == 1)


def pointwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """A 1x1 convolution of a channels-last map as one matrix product, or None for another layout.

    With one thread and a batch under 16, PyTorch runs 1x1 convolutions through its unfold-and-
    multiply fallback, which copies the bias and the output around the product; as a linear
    layer over the (N, H, W, C) view it is the product alone (the same values: the same GEMM)."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last) or x.shape[1] == 1:
        return None
    return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 Conv2d that runs as a linear layer on channels-last inputs (same parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        out = pointwise_conv(x, self.weight, self.bias)
        return self._conv_forward(x, self.weight, self.bias) if out is None else out


def use_pointwise_convs(module: nn.Module) -> int:
    """Make every plain 1x1 Conv2d in `module` a PointwiseConv2d; returns the count."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Conv2d and m.padding_mode == "zeros" and is_pointwise(m):
            m.__class__ = PointwiseConv2d
            n += 1
    return n


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

    def fold(self) -> tuple[Tensor, Tensor]:
        scale, shift = self.bn[0].scale_shift()
        weight = self.weight * scale.view(-1, 1, 1, 1)
        bias = shift if self.bias is None else shift + self.bias * scale
        return weight, bias

    def folded(self) -> tuple[Tensor, Tensor]:
        """The folded weight and bias; computed once while nothing they depend on changes.

        A frozen trunk's fold costs ~5 small ops per convolution and forward (a few ms per backbone
        pass of the demo). It is kept, keyed by the storage and version counter of the weight, the
        bias and the BN buffers: any in-place change (load_state_dict, the EMA, an optimizer)
        moves a version counter and the fold is recomputed. A convolution that trains is folded
        in the autograd graph at every forward, as before."""
        if self.weight.requires_grad and torch.is_grad_enabled():
            return self.fold()
        bn = self.bn[0]
        parts = (self.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var) + (
            () if self.bias is None else (self.bias,))
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in parts)
        cache = self.__dict__.get("_fold_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, *self.fold())
            self.__dict__["_fold_cache"] = cache  # a plain attribute: not a buffer, not in state dicts
        return cache[1], cache[2]

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.folded()
        if is_pointwise(self) and (out := pointwise_conv(x, weight, bias)) is not None:
            return out
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
