"""A DeepLabV3-style segmentation net: ASPP with an image-pooling branch that has a BatchNorm.

The habits kept from ``torchvision.models.segmentation.deeplabv3``: parallel atrous
branches (1x1, dilated 3x3) and an ``ASPPPooling`` branch (global average pool, 1x1 conv,
**BatchNorm on a 1x1 map**, ReLU, bilinear upsampling) concatenated and projected; a
``DeepLabHead``; logits upsampled to the input size; the result as a dict (``"out"``).

The pooling branch's BatchNorm sees one value per channel per image. With one image per
replica, plain per-replica BatchNorm cannot train at all (torch raises "Expected more
than 1 value per channel"); SyncBN can, because it reduces over every replica's image.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sample_models import example_input


class ASPPConv(nn.Sequential):
    """Dilated 3x3 conv - BN - ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class ASPPPooling(nn.Sequential):
    """Image pooling: global average pool - 1x1 conv - BN (one value per image) - ReLU - upsample.

    Example:
        >>> ASPPPooling(8, 4)(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 4, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, dilated 3x3 per rate, image pooling; concat; project.

    Args:
        in_channels: channels of the backbone's feature map.
        atrous_rates: the dilations of the 3x3 branches.
        out_channels: channels of every branch and of the projection.
        dropout: after the projection (torchvision: 0.5; 0 here so runs compare exactly).
    """

    def __init__(self, in_channels: int, atrous_rates: tuple[int, ...], out_channels: int, dropout: float = 0.0):
        super().__init__()
        modules: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())
        ]
        modules += [ASPPConv(in_channels, out_channels, rate) for rate in atrous_rates]
        modules.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(modules)
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """ASPP, 3x3 conv - BN - ReLU, 1x1 conv to class logits."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: tuple[int, ...] = (2, 3)) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates, 8),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, num_classes, 1),
        )


class DeepLabV3(nn.Module):
    """A small conv-BN-ReLU(inplace) backbone at stride 4, the DeepLab head, upsampled logits.

    Returns ``OrderedDict(out=logits)`` with logits of the input's spatial size, as
    torchvision's segmentation models do.

    Example:
        >>> DeepLabV3()(torch.randn(2, 3, 16, 16))["out"].shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        self.classifier = DeepLabHead(16, num_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        input_shape = x.shape[-2:]
        x = self.classifier(self.backbone(x))
        return OrderedDict(out=F.interpolate(x, size=input_shape, mode="bilinear", align_corners=False))


@example_input(3, 16, 16)
def deeplab_aspp(num_classes: int = 3) -> DeepLabV3:
    """A DeepLabV3-style net: ASPP with rates (2, 3) and image pooling, 8 BatchNorm2d layers.

    Habits: a BatchNorm after global average pooling (one value per channel per image),
    bilinear upsampling, a dict output. Verify it with one image per replica, which only
    SyncBN can train: ``syncbn verify --factory sample_models.zoo:deeplab_aspp
    --replicas 4 --batch-size 4``.

    Example:
        >>> import torch
        >>> deeplab_aspp()(torch.randn(2, 3, 16, 16))["out"].shape
        torch.Size([2, 3, 16, 16])
    """
    return DeepLabV3(num_classes)
