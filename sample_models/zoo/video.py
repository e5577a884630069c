"""A 3-D video ResNet in torchvision's ``r3d_18`` manner: Conv3d + BatchNorm3d, in-place ReLU.

The habits kept from ``torchvision.models.video.resnet``: a ``BasicStem`` with a
(3, 7, 7) kernel striding only in space; blocks whose ``conv1``/``conv2`` are
``nn.Sequential(Conv3d, BatchNorm3d[, ReLU(inplace=True)])``; a 1x1x1 conv + BatchNorm3d
``downsample``; ``out += residual`` then an in-place ReLU; a pooled linear classifier.
"""

from __future__ import annotations

from torch import Tensor, nn

from sample_models import example_input


class Conv3DSimple(nn.Conv3d):
    """A full 3x3x3 convolution, no bias (a BatchNorm3d follows)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """(Conv3d - BN3d - ReLU(inplace)), (Conv3d - BN3d), ``out += residual``, ReLU(inplace).

    Example:
        >>> import torch
        >>> BasicBlock(4, 4)(torch.randn(2, 4, 2, 4, 4)).shape
        torch.Size([2, 4, 2, 4, 4])
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            Conv3DSimple(inplanes, planes, stride), nn.BatchNorm3d(planes), nn.ReLU(inplace=True)
        )
        self.conv2 = nn.Sequential(Conv3DSimple(planes, planes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        out = self.conv2(self.conv1(x))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class VideoResNet(nn.Module):
    """Stem, two stages of BasicBlocks (the second strides in time and space), pool, classifier.

    Args:
        width: channels of the stem and the first stage (doubled in the second).
        num_classes: outputs.

    Example:
        >>> import torch
        >>> VideoResNet()(torch.randn(2, 3, 4, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        downsample = nn.Sequential(nn.Conv3d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm3d(2 * width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2, downsample=downsample))
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(2 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(self.avgpool(x).flatten(1))


@example_input(3, 4, 16, 16)
def video_resnet3d(num_classes: int = 10) -> VideoResNet:
    """An R3D-18-style video net on 4-frame 16x16 clips: 6 BatchNorm3d layers.

    Habits: Conv3d + BatchNorm3d, ``nn.ReLU(inplace=True)``, ``out += residual`` on a
    BatchNorm3d output, a downsample branch striding in time and space.

    Example:
        >>> import torch
        >>> video_resnet3d()(torch.randn(2, 3, 4, 16, 16)).shape
        torch.Size([2, 10])
    """
    return VideoResNet(num_classes=num_classes)
