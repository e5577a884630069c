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
