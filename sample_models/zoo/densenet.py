"""A DenseNet-style net: pre-activation BN-ReLU(inplace)-Conv layers whose features concatenate.

The habits kept from ``torchvision.models.densenet``: ``_DenseLayer`` normalizes the
concatenation of every earlier feature map (``norm1`` sees the block input and all new
features), in pre-activation order ``BN -> ReLU(inplace=True) -> conv``; ``_DenseBlock``
is an ``nn.ModuleDict`` that ``torch.cat``s; transitions are BN-ReLU-conv1x1-avgpool;
the final ``norm5`` is followed by ``F.relu(features, inplace=True)``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sample_models import example_input


class _DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bottleneck) on the concatenated inputs, then BN-ReLU-conv3x3 -> growth_rate."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))

    def forward(self, prev_features: list[Tensor]) -> Tensor:
        return self.conv2(self.relu2(self.norm2(self.bn_function(prev_features))))


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; each sees all earlier outputs; returns their concatenation."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN - ReLU(inplace) - conv1x1 - avgpool/2: halves the channels and the resolution."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """torchvision's DenseNet: 7x7/2 stem + max pool, dense blocks with transitions, norm5, classifier.

    Args:
        growth_rate: channels each dense layer adds.
        block_config: dense layers per block.
        num_init_features: channels of the stem.
        bn_size: the bottleneck is ``bn_size * growth_rate`` channels wide.
        num_classes: outputs.

    Example:
        >>> DenseNet(block_config=(1,))(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        growth_rate: int = 4,
        block_config: tuple[int, ...] = (2, 2),
        num_init_features: int = 8,
        bn_size: int = 2,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(num_layers, num_features, bn_size, growth_rate))
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


@example_input(3, 16, 16)
def densenet(num_classes: int = 10) -> DenseNet:
    """A DenseNet-121-style net: blocks of 2 and 2 layers, growth 4, 11 BatchNorm2d layers.

    Habits: pre-activation ``BN -> ReLU(inplace=True) -> conv`` where the BN normalizes a
    ``torch.cat`` of earlier features, transitions, ``F.relu(..., inplace=True)`` after
    the last BN.

    Example:
        >>> import torch
        >>> densenet()(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """
    return DenseNet(num_classes=num_classes)
