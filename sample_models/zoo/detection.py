"""A detection backbone with frozen BatchNorm, as torchvision, detectron2 and mmdet build them.

Detection trains with 1-2 images per GPU, too few for batch statistics, so its backbones
freeze the early BatchNorms and keep training the later ones. Three kinds side by side:

- the stem and ``layer1`` use ``FrozenBatchNorm2d`` (torchvision's
  ``resnet_fpn_backbone(norm_layer=FrozenBatchNorm2d)``, detectron2's ``FrozenBN``): a
  plain module with buffers, not a ``_BatchNorm``, so ``convert_model`` leaves it alone;
  their convolutions are frozen too (torchvision's ``trainable_layers``);
- ``layer2`` keeps ``nn.BatchNorm2d`` frozen in place: ``requires_grad=False`` and eval
  mode, kept there by overriding ``train()`` (mmdet's ``norm_eval``/``frozen_stages``);
- ``layer3`` trains its BatchNorm normally: the layers SyncBN must synchronize.

The forward returns a dict of multi-scale features, as ``IntermediateLayerGetter`` does.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sample_models import example_input
from sample_models.zoo.layers import FrozenBatchNorm2d
from sample_models.zoo.resnet import BasicBlock, make_stage


class FrozenBNBackbone(nn.Module):
    """A three-stage ResNet backbone: frozen stem and layer1, eval-mode layer2 BN, trainable layer3.

    Args:
        width: channels of the stem and layer1 (doubled per stage).

    Example:
        >>> import torch
        >>> features = FrozenBNBackbone()(torch.randn(2, 3, 32, 32))
        >>> {name: tuple(f.shape) for name, f in features.items()}
        {'layer2': (2, 8, 4, 4), 'layer3': (2, 16, 2, 2)}
    """

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_stage(BasicBlock, width, width, 1, norm_layer=FrozenBatchNorm2d)
        self.layer2 = make_stage(BasicBlock, width, 2 * width, 1, stride=2)
        self.layer3 = make_stage(BasicBlock, 2 * width, 4 * width, 1, stride=2)
        for module in (self.conv1, self.layer1):
            module.requires_grad_(False)
        for norm in self.frozen_norms():
            norm.requires_grad_(False)
        self.train()

    def frozen_norms(self) -> list[nn.Module]:
        """The BatchNorm layers kept in eval mode with frozen affine parameters (layer2's)."""
        return [m for m in self.layer2.modules() if isinstance(m, _BatchNorm)]

    def train(self, mode: bool = True) -> FrozenBNBackbone:
        """Set the training mode, but keep the frozen BatchNorm layers in eval mode."""
        super().train(mode)
        for norm in self.frozen_norms():
            norm.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c3 = self.layer2(x)
        return OrderedDict(layer2=c3, layer3=self.layer3(c3))


@example_input(3, 32, 32)
def detection_backbone() -> FrozenBNBackbone:
    """A detection backbone: 3 FrozenBatchNorm2d, 3 frozen eval-mode and 3 trainable BatchNorm2d.

    Habits: ``FrozenBatchNorm2d`` (not a ``_BatchNorm``) in the stem and first stage,
    ``requires_grad=False`` BatchNorm2d kept in eval mode by an overridden ``train()``,
    trainable BatchNorm2d above, ``ReLU(inplace=True)`` and ``out += identity``,
    multi-scale dict output.

    Example:
        >>> import torch
        >>> net = detection_backbone().train()
        >>> net.layer2[0].bn1.training, net.layer3[0].bn1.training
        (False, True)
        >>> net(torch.randn(2, 3, 32, 32))["layer3"].shape
        torch.Size([2, 16, 2, 2])
    """
    return FrozenBNBackbone()
