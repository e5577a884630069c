"""A MobileNetV3-style net: inverted residuals, squeeze-excitation, in-place hard-swish.

The habits kept from ``torchvision.models.mobilenetv3``: blocks described by an
``InvertedResidualConfig`` table; ``Conv2dNormActivation`` with in-place activations
(``nn.Hardswish(inplace=True)``); a depthwise conv; squeeze-excitation with its own
pooling, 1x1 convs and a hard-sigmoid gate; ``result += input`` on the projection BN's
output; a classifier with ``nn.Hardswish(inplace=True)`` and ``nn.Dropout(inplace=True)``.
Where torchvision uses ``nn.ReLU`` ("RE" blocks) this net uses ``nn.ReLU6(inplace=True)``,
MobileNetV2's activation, so that both in-place activations appear.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sample_models import example_input
from sample_models.zoo.layers import Conv2dNormActivation, SqueezeExcitation, make_divisible

# Activation of a block, by its name in the MobileNetV3 paper's tables.
ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {"RE": nn.ReLU6, "HS": nn.Hardswish}


class InvertedResidualConfig(NamedTuple):
    """One row of the block table: channels in/expanded/out, kernel, SE, activation, stride."""

    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    activation: str
    stride: int


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (kxk), optional SE, project (1x1, no activation); ``+= input``.

    Example:
        >>> block = InvertedResidual(InvertedResidualConfig(8, 3, 16, 8, True, "HS", 1))
        >>> block(torch.randn(2, 8, 4, 4)).shape, block.use_res_connect
        (torch.Size([2, 8, 4, 4]), True)
    """

    def __init__(self, cnf: InvertedResidualConfig) -> None:
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        activation_layer = ACTIVATIONS[cnf.activation]
        layers: list[nn.Module] = []
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(
                Conv2dNormActivation(cnf.input_channels, cnf.expanded_channels, 1, activation_layer=activation_layer)
            )
        layers.append(
            Conv2dNormActivation(
                cnf.expanded_channels,
                cnf.expanded_channels,
                cnf.kernel,
                cnf.stride,
                groups=cnf.expanded_channels,
                activation_layer=activation_layer,
            )
        )
        if cnf.use_se:
            squeeze_channels = make_divisible(cnf.expanded_channels // 4, 8)
            layers.append(SqueezeExcitation(cnf.expanded_channels, squeeze_channels, scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(cnf.expanded_channels, cnf.out_channels, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    """Stem, inverted residual blocks, 1x1 head conv, pooled two-layer classifier.

    Args:
        inverted_residual_setting: the block table.
        last_channel: width of the classifier's hidden layer.
        num_classes: outputs.
        dropout: the classifier's dropout (torchvision: 0.2; 0 here so runs compare exactly).

    Example:
        >>> setting = [InvertedResidualConfig(8, 3, 8, 8, True, "RE", 1)]
        >>> MobileNetV3(setting, last_channel=16)(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        inverted_residual_setting: list[InvertedResidualConfig],
        last_channel: int,
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        first = inverted_residual_setting[0].input_channels
        layers: list[nn.Module] = [Conv2dNormActivation(3, first, 3, stride=2, activation_layer=nn.Hardswish)]
        layers += [InvertedResidual(cnf) for cnf in inverted_residual_setting]
        last_in = inverted_residual_setting[-1].out_channels
        layers.append(Conv2dNormActivation(last_in, 6 * last_in, 1, activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@example_input(3, 16, 16)
def mobilenet_v3(num_classes: int = 10) -> MobileNetV3:
    """A MobileNetV3-Small-style net: 3 inverted residual blocks (2 with SE), 10 BatchNorm2d layers.

    Habits: in-place ``nn.Hardswish`` and ``nn.ReLU6`` on BN outputs, a depthwise conv,
    squeeze-excitation (own pooling, 1x1 convs, in-place hard-sigmoid gate),
    ``result += input`` on a BN output, in-place dropout (p=0) in the classifier.

    Example:
        >>> import torch
        >>> mobilenet_v3()(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """
    setting = [
        InvertedResidualConfig(8, 3, 8, 8, True, "RE", 1),
        InvertedResidualConfig(8, 3, 24, 12, False, "RE", 2),
        InvertedResidualConfig(12, 5, 36, 12, True, "HS", 1),
    ]
    return MobileNetV3(setting, last_channel=32, num_classes=num_classes)
