"""The default model of ``syncbn verify``: one of every BatchNorm situation, small and fast."""

from __future__ import annotations

from torch import Tensor, nn

from sample_models import example_input
from sample_models.fused import BatchNormAct2d


class MixedNet(nn.Module):
    """BN2d, a fused-activation BN subclass, a BN called twice, odd configurations, a BN1d head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_act = BatchNormAct2d(8, act_layer=nn.ReLU)
        self.shared_conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.shared_bn = nn.BatchNorm2d(8)  # called twice per forward
        self.cumulative_bn = nn.BatchNorm2d(8, momentum=None)
        self.plain_bn = nn.BatchNorm2d(8, affine=False)
        self.no_bias_bn = nn.BatchNorm2d(8, bias=False)
        self.fc = nn.Linear(8, 16)
        self.head_bn = nn.BatchNorm1d(16)
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_bn(self.stem(x)).relu()
        x = self.bn_act(self.conv(x))
        x = self.shared_bn(self.shared_conv(x)).relu()
        x = self.shared_bn(self.shared_conv(x)).relu()
        x = self.cumulative_bn(x)
        x = self.no_bias_bn(self.plain_bn(x))
        x = self.head_bn(self.fc(x.mean((2, 3)))).relu()
        return self.classifier(x)


@example_input(3, 16, 16)
def mixed_net() -> nn.Module:
    """The embedded default of ``syncbn verify``; input ``(N, 3, 16, 16)``.

    Example:
        >>> import torch
        >>> mixed_net()(torch.randn(4, 3, 16, 16)).shape
        torch.Size([4, 10])
    """
    return MixedNet()
