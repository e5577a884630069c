"""An EfficientNet-style net in timm's manner: BatchNormAct2d, drop-path, in-place SE gating.

The habits kept from ``timm.models.efficientnet`` and its blocks: every BatchNorm is a
``BatchNormAct2d`` (a ``nn.BatchNorm2d`` subclass whose forward adds an in-place SiLU;
``apply_act=False`` after the projection); depthwise-separable and inverted-residual
(MBConv) blocks; squeeze-excitation that gates with ``x.mul_(...)``; the residual
``x = self.drop_path(x) + shortcut``, with drop-path rates growing linearly over the blocks.
"""

from __future__ import annotations

from torch import Tensor, nn

from sample_models import example_input
from sample_models.zoo.layers import BatchNormAct2d, DropPath, SqueezeExcite


class DepthwiseSeparableConv(nn.Module):
    """Depthwise conv - BN+SiLU - SE - pointwise conv - BN; skip when the shape stays.

    Example:
        >>> import torch
        >>> DepthwiseSeparableConv(8, 8)(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, se_ratio: float = 0.25, drop_path_rate: float = 0.0):
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 3, stride, 1, groups=in_chs, bias=False)
        self.bn1 = BatchNormAct2d(in_chs, act_layer=nn.SiLU)
        self.se = SqueezeExcite(in_chs, max(1, round(in_chs * se_ratio)))
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = BatchNormAct2d(out_chs, apply_act=False)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.se(self.bn1(self.conv_dw(x)))
        x = self.bn2(self.conv_pw(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class InvertedResidual(nn.Module):
    """MBConv: 1x1 expand - BN+SiLU - depthwise - BN+SiLU - SE - 1x1 project - BN; skip.

    Example:
        >>> import torch
        >>> InvertedResidual(8, 12, stride=2)(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 12, 2, 2])
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        exp_ratio: float = 4.0,
        se_ratio: float = 0.25,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        mid_chs = round(in_chs * exp_ratio)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid_chs, act_layer=nn.SiLU)
        self.conv_dw = nn.Conv2d(mid_chs, mid_chs, kernel_size, stride, kernel_size // 2, groups=mid_chs, bias=False)
        self.bn2 = BatchNormAct2d(mid_chs, act_layer=nn.SiLU)
        # timm sizes the SE bottleneck by the block's input channels, not the expanded ones.
        self.se = SqueezeExcite(mid_chs, max(1, round(in_chs * se_ratio)))
        self.conv_pwl = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = BatchNormAct2d(out_chs, apply_act=False)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.bn1(self.conv_pw(x))
        x = self.se(self.bn2(self.conv_dw(x)))
        x = self.bn3(self.conv_pwl(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class EfficientNet(nn.Module):
    """Stem conv + BN+SiLU, blocks, 1x1 head conv + BN+SiLU, global pool, classifier.

    Args:
        num_classes: outputs.
        drop_path_rate: the last block's drop-path probability; earlier blocks get
            proportionally less (timm's schedule). 0 by default, which makes training
            deterministic so that runs compare exactly.

    Example:
        >>> import torch
        >>> EfficientNet()(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.SiLU)
        # (in, out, kernel, stride) of each MBConv after the depthwise-separable first block.
        mbconv = [(8, 12, 3, 2), (12, 12, 5, 1)]
        rates = [drop_path_rate * i / len(mbconv) for i in range(len(mbconv) + 1)]
        self.blocks = nn.Sequential(
            DepthwiseSeparableConv(8, 8, drop_path_rate=rates[0]),
            *(
                InvertedResidual(i, o, k, s, exp_ratio=3.0, drop_path_rate=rate)
                for (i, o, k, s), rate in zip(mbconv, rates[1:], strict=True)
            ),
        )
        self.conv_head = nn.Conv2d(12, 32, 1, bias=False)
        self.bn2 = BatchNormAct2d(32, act_layer=nn.SiLU)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv_stem(x))
        return self.bn2(self.conv_head(self.blocks(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.global_pool(self.forward_features(x)).flatten(1))


@example_input(3, 16, 16)
def efficientnet(num_classes: int = 10, drop_path_rate: float = 0.0) -> EfficientNet:
    """An EfficientNet-B0-style net: 3 blocks, 10 ``BatchNormAct2d`` layers (a BatchNorm2d subclass).

    Habits: a fused BN + in-place SiLU subclass (``apply_act=False`` after projections),
    ``x.mul_(gate)`` squeeze-excitation on a BN+SiLU output, drop-path on the residual
    (rate 0 unless ``drop_path_rate`` is given: a random mask could not compare exactly).

    Example:
        >>> import torch
        >>> efficientnet()(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """
    return EfficientNet(num_classes, drop_path_rate)
