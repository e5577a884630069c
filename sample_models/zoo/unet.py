"""A small U-Net: encoder, decoder that upsamples and concatenates the encoder's skips.

The habits kept from the common PyTorch U-Net (milesial/Pytorch-UNet): ``DoubleConv``
blocks of (conv3x3 - BN - ReLU(inplace=True)) x 2; ``Down`` = max pool + DoubleConv;
``Up`` = bilinear upsampling (or a transposed conv), padding to the skip's size,
``torch.cat([skip, x], dim=1)``, DoubleConv; a 1x1 conv to per-pixel logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sample_models import example_input


class DoubleConv(nn.Sequential):
    """(conv3x3 - BN - ReLU(inplace)) x 2."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        mid_channels = mid_channels or out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Max pool /2, then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Upsample x2, pad to the skip's size, concatenate ``[skip, x]``, DoubleConv.

    Example:
        >>> up = Up(8, 4)
        >>> up(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 7, 7)).shape
        torch.Size([2, 4, 7, 7])
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = True) -> None:
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        x1 = self.up(x1)
        # Odd sizes: the upsampled map may be a pixel short of the skip.
        diff_y, diff_x = x2.size(2) - x1.size(2), x2.size(3) - x1.size(3)
        x1 = F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class UNet(nn.Module):
    """Two-level U-Net with a configurable base width; output: per-pixel class logits.

    Args:
        n_channels: input channels.
        n_classes: output channels (logits per pixel).
        width: channels of the first level (doubling per level).
        bilinear: upsample by interpolation (True) or by a learned transposed conv.

    Example:
        >>> UNet(bilinear=False)(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 2, 8, 8])
    """

    def __init__(self, n_channels: int = 3, n_classes: int = 2, width: int = 4, bilinear: bool = True) -> None:
        super().__init__()
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(n_channels, width)
        self.down1 = Down(width, 2 * width)
        self.down2 = Down(2 * width, 4 * width // factor)
        self.up1 = Up(4 * width, 2 * width // factor, bilinear)
        self.up2 = Up(2 * width, width, bilinear)
        self.outc = nn.Conv2d(width, n_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x = self.up1(self.down2(x2), x2)
        return self.outc(self.up2(x, x1))


@example_input(3, 16, 16)
def unet(n_classes: int = 2) -> UNet:
    """A U-Net with widths 4/8/16, bilinear upsampling and 10 BatchNorm2d layers.

    Habits: ``ReLU(inplace=True)`` after every BN, skip connections concatenated with the
    upsampled decoder features (so a BN normalizes encoder and decoder channels together),
    per-pixel output.

    Example:
        >>> import torch
        >>> unet()(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 2, 16, 16])
    """
    return UNet(n_classes=n_classes)
