"""A torchvision-style ResNet: BasicBlock and Bottleneck, downsample branch, in-place ReLU.

The habits kept from ``torchvision.models.resnet``: one ``nn.ReLU(inplace=True)`` per
block, reused; ``out += identity`` on the last BatchNorm's output; a ``downsample``
branch (1x1 conv + BN) when the shape changes; a ``norm_layer`` argument; the
kaiming-normal initialization.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sample_models import example_input

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; ``out += identity``; one in-place ReLU used twice.

    Example:
        >>> BasicBlock(8, 8)(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as ResNet v1.5), 1x1 expand by 4; ``out += identity``.

    Example:
        >>> Bottleneck(16, 4)(torch.randn(2, 16, 4, 4)).shape
        torch.Size([2, 16, 4, 4])
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


Block = type[BasicBlock] | type[Bottleneck]


def make_stage(
    block: Block, inplanes: int, planes: int, blocks: int, stride: int = 1, norm_layer: NormLayer | None = None
) -> nn.Sequential:
    """``blocks`` blocks; the first gets a conv1x1 + BN ``downsample`` when the shape changes.

    Example:
        >>> stage = make_stage(BasicBlock, 8, 16, 2, stride=2)
        >>> stage(torch.randn(2, 8, 4, 4)).shape, type(stage[0].downsample[1]).__name__
        (torch.Size([2, 16, 2, 2]), 'BatchNorm2d')
    """
    norm_layer = norm_layer or nn.BatchNorm2d
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            conv1x1(inplanes, planes * block.expansion, stride), norm_layer(planes * block.expansion)
        )
    layers = [block(inplanes, planes, stride, downsample, norm_layer)]
    layers += [block(planes * block.expansion, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """torchvision's ResNet, two stages deep: 7x7/2 stem, max pool, stages, pooled classifier.

    Args:
        block: ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50 and up).
        layers: blocks per stage (two stages; the second at stride 2).
        num_classes: outputs of the classifier.
        width: channels of the stem and of the first stage's ``planes``.
        zero_init_residual: start each block's last BN at weight 0, as torchvision offers.

    Example:
        >>> ResNet(BasicBlock, [1, 1])(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int = 10,
        width: int = 8,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_stage(block, width, width, layers[0])
        self.layer2 = make_stage(block, width * block.expansion, 2 * width, layers[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                last_bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last_bn is not None:
                    nn.init.constant_(last_bn.weight, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@example_input(3, 16, 16)
def resnet_basic(num_classes: int = 10) -> ResNet:
    """A ResNet-18-style net: BasicBlocks [2, 1], widths 8/16, 8 BatchNorm2d layers.

    Habits: ``nn.ReLU(inplace=True)`` after BN, ``out += identity`` on a BN output, a
    downsample branch (conv1x1 + BN) at the stride-2 stage.

    Example:
        >>> import torch
        >>> resnet_basic()(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """
    return ResNet(BasicBlock, [2, 1], num_classes=num_classes)


@example_input(3, 16, 16)
def resnet_bottleneck(num_classes: int = 10) -> ResNet:
    """A ResNet-50-style net: Bottlenecks [2, 1], expansion 4, 12 BatchNorm2d layers.

    Habits: ``nn.ReLU(inplace=True)`` after BN, ``out += identity`` on a BN output, a
    downsample branch in both stages (channels grow by the expansion, then the stride).

    Example:
        >>> import torch
        >>> resnet_bottleneck()(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """
    return ResNet(Bottleneck, [2, 1], num_classes=num_classes, width=4)
