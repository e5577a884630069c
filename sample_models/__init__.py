"""Small models for trying syncbn: every kind of BatchNorm a real model zoo ships.

Each factory carries ``input_shape`` (one sample, without the batch dimension) so that
``syncbn verify --factory sample_models.resnet:resnet_tiny`` needs no other flags.

- ``sample_models.mixed:mixed_net`` (the default of ``syncbn verify``): BN2d, a BN subclass
  with a fused activation, a BN layer called twice, momentum=None, affine=False,
  bias=False, and a BN1d head.
- ``sample_models.resnet:resnet_tiny``: conv-BN-ReLU residual blocks (BN2d).
- ``sample_models.mlp:mlp_bn1d``: Linear-BN1d on 2-D input.
- ``sample_models.mlp:temporal_bn1d``: Conv1d-BN1d on 3-D input.
- ``sample_models.video:video_tiny``: Conv3d-BN3d.
- ``sample_models.fused:bn_act_net``: a ``BatchNormAct2d``-style subclass whose forward
  adds an activation.

``ZOO`` names ``sample_models.zoo``: small models of the families users bring, with their
habits (in-place activations and ``out += identity`` on BatchNorm outputs, fused BN
subclasses, BatchNorm on pooled 1x1 maps, frozen BatchNorm): ResNet (BasicBlock and
Bottleneck), MobileNetV3, EfficientNet, DenseNet, DeepLabV3's ASPP, U-Net, a 3-D video
ResNet, a detection backbone with frozen BN, and a BatchNorm1d MLP head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

SAMPLES = {
    "mixed_net": "sample_models.mixed:mixed_net",
    "resnet_tiny": "sample_models.resnet:resnet_tiny",
    "mlp_bn1d": "sample_models.mlp:mlp_bn1d",
    "temporal_bn1d": "sample_models.mlp:temporal_bn1d",
    "video_tiny": "sample_models.video:video_tiny",
    "bn_act_net": "sample_models.fused:bn_act_net",
}
DEFAULT_SAMPLE = SAMPLES["mixed_net"]
ZOO = {
    name: f"sample_models.zoo:{name}"
    for name in (
        "resnet_basic",
        "resnet_bottleneck",
        "mobilenet_v3",
        "efficientnet",
        "densenet",
        "deeplab_aspp",
        "unet",
        "video_resnet3d",
        "detection_backbone",
        "mlp_head",
    )
}


def example_input(*shape: int) -> Callable[[F], F]:
    """Declare the input shape of one sample (without batch dimension) on a model factory.

    Example:
        >>> @example_input(3, 8, 8)
        ... def build():
        ...     ...
        >>> build.input_shape
        (3, 8, 8)
    """

    def mark(factory: F) -> F:
        factory.input_shape = tuple(shape)  # type: ignore[attr-defined]
        return factory

    return mark
