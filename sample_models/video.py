"""A tiny video / 3-D model: Conv3d-BN3d blocks on (N, C, T, H, W) clips."""

from __future__ import annotations

from torch import nn

from sample_models import example_input


@example_input(3, 4, 16, 16)
def video_tiny() -> nn.Module:
    """Two Conv3d-BN3d-ReLU blocks and a pooled classifier; input ``(N, 3, 4, 16, 16)``.

    Example:
        >>> import torch
        >>> video_tiny()(torch.randn(2, 3, 4, 16, 16)).shape
        torch.Size([2, 5])
    """
    return nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm3d(8),
        nn.ReLU(),
        nn.Conv3d(8, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm3d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
