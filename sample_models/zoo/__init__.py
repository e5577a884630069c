"""A zoo of small models of the families users bring to a SyncBN tool, with their habits.

Each factory is tiny (a few thousand parameters, 16x16 or 32x32 inputs) and declares its
input shape, so ``syncbn verify --factory sample_models.zoo:NAME`` needs no other flag.
The models are hand-written in the style of torchvision and timm (neither is a
dependency) and keep what makes real models hard for SyncBN: in-place activations and
``out += identity`` on BatchNorm outputs, BatchNorm subclasses with fused activations,
BatchNorm on pooled 1x1 maps, concatenated features, frozen and eval-mode BatchNorm.

- ``resnet_basic``, ``resnet_bottleneck``: torchvision ResNet (BasicBlock, Bottleneck).
- ``mobilenet_v3``: inverted residuals, squeeze-excitation, in-place hard-swish.
- ``efficientnet``: timm's ``BatchNormAct2d`` (BN + in-place SiLU), drop-path, ``mul_`` SE.
- ``densenet``: pre-activation BN-ReLU-conv on concatenated features.
- ``deeplab_aspp``: ASPP whose image-pooling branch has a BatchNorm on a 1x1 map.
- ``unet``: encoder-decoder with upsampling and skip concatenations.
- ``video_resnet3d``: Conv3d + BatchNorm3d residual blocks.
- ``detection_backbone``: ``FrozenBatchNorm2d``, eval-mode frozen BN, trainable BN above.
- ``mlp_head``: Linear-BatchNorm1d-ReLU(inplace)-Dropout projector.

Example:
    >>> import torch
    >>> from sample_models import zoo
    >>> model = zoo.resnet_basic()
    >>> model(torch.randn(2, *zoo.resnet_basic.input_shape)).shape
    torch.Size([2, 10])
"""

from sample_models.zoo.deeplab import deeplab_aspp
from sample_models.zoo.densenet import densenet
from sample_models.zoo.detection import detection_backbone
from sample_models.zoo.efficientnet import efficientnet
from sample_models.zoo.mlp import mlp_head
from sample_models.zoo.mobilenet import mobilenet_v3
from sample_models.zoo.resnet import resnet_basic, resnet_bottleneck
from sample_models.zoo.unet import unet
from sample_models.zoo.video import video_resnet3d

__all__ = [
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
]
