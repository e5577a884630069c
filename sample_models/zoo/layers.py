"""Building blocks of the zoo, written the way torchvision.ops.misc and timm.layers write them.

- ``Conv2dNormActivation``, ``SqueezeExcitation``, ``FrozenBatchNorm2d``: torchvision's.
- ``BatchNormAct2d``, ``DropPath``, ``SqueezeExcite``: timm's.
- ``make_divisible``: the channel rounding both use.

They keep the habits that matter to a SyncBN tool: in-place activations, a BatchNorm
subclass whose forward adds an activation, a normalization that is *not* a ``_BatchNorm``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor``, going down by no more than 10%.

    Example:
        >>> make_divisible(18), make_divisible(4), make_divisible(37, 4)
        (24, 8, 36)
    """
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class Conv2dNormActivation(nn.Sequential):
    """Conv2d (no bias) - BatchNorm2d - activation(inplace=True), as torchvision.ops.misc builds it.

    Args:
        in_channels, out_channels, kernel_size, stride, groups: the convolution's; the
            padding keeps the spatial size at stride 1.
        activation_layer: an activation class taking ``inplace``, or None for none.

    Example:
        >>> block = Conv2dNormActivation(3, 8, 3, stride=2, activation_layer=nn.Hardswish)
        >>> block(torch.randn(2, 3, 8, 8)).shape, block[2].inplace
        (torch.Size([2, 8, 4, 4]), True)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation_layer: Callable[..., nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """torchvision's squeeze-excitation: its own pooling, two 1x1 convs, ``scale * input``.

    Args:
        input_channels: channels of the gated feature map.
        squeeze_channels: channels of the bottleneck between the two 1x1 convs.
        activation: the bottleneck's activation class.
        scale_activation: the gate's activation class (MobileNetV3: hard sigmoid).

    Example:
        >>> se = SqueezeExcitation(8, 4, scale_activation=nn.Hardsigmoid)
        >>> se(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        activation: Callable[..., nn.Module] = nn.ReLU,
        scale_activation: Callable[..., nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation(inplace=True)
        # The gate acts on fc2's fresh output, so it may work in place (timm's hard_sigmoid does).
        self.scale_activation = scale_activation(inplace=True)

    def _scale(self, input: Tensor) -> Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(input))))
        return self.scale_activation(scale)

    def forward(self, input: Tensor) -> Tensor:
        return self._scale(input) * input


class FrozenBatchNorm2d(nn.Module):
    """torchvision's frozen BatchNorm: fixed statistics and affine, all four held as buffers.

    A plain ``nn.Module``, not a ``_BatchNorm``: nothing trains it, ``train()`` does not
    change it, and ``syncbn.convert_model`` leaves it alone. Detection backbones use it
    because their per-GPU batches (1-2 images) are too small for batch statistics.

    Args:
        num_features: channels C of the ``(N, C, H, W)`` input.
        eps: added to the variance.

    Example:
        >>> frozen = FrozenBatchNorm2d(4)
        >>> sorted(frozen.state_dict()), frozen(torch.ones(1, 4, 2, 2)).shape
        (['bias', 'running_mean', 'running_var', 'weight'], torch.Size([1, 4, 2, 2]))
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Checkpoints of nn.BatchNorm2d carry a counter this layer does not keep.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        # One multiply-add: the affine transform the frozen statistics amount to.
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + bias

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNorm2d with a fused activation: ``F.batch_norm``, then the activation in place.

    A subclass of ``nn.BatchNorm2d``, so its state-dict keys are nn.BatchNorm2d's; its
    forward does the work of BatchNorm itself, so a converter that swapped it for a plain
    SyncBN would silently drop the activation.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d``.
        apply_act: False for a BN without activation (the last BN of a block).
        act_layer: the activation class; it gets ``inplace``.
        inplace: run the activation in place on the normalized output (timm's default).

    Example:
        >>> bn = BatchNormAct2d(4, act_layer=nn.SiLU)
        >>> bn(torch.randn(2, 4, 3, 3)).shape, bn.act.inplace
        (torch.Size([2, 4, 3, 3]), True)
        >>> list(bn.state_dict()) == list(nn.BatchNorm2d(4).state_dict())
        True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        inplace: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # nn.BatchNorm2d.forward's bookkeeping, as timm copies it.
        if x.ndim != 4:
            raise ValueError(f"expected 4D input (got {x.ndim}D input)")
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        return self.act(self.drop(x))


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Stochastic depth per sample: zero a whole residual branch for a random subset of the batch.

    The identity unless ``training`` and ``drop_prob > 0``; kept samples are scaled by
    ``1 / (1 - drop_prob)`` so the expectation is unchanged.

    Example:
        >>> x = torch.ones(4, 2)
        >>> drop_path(x, 0.5, training=False) is x, drop_path(x, 0.0, training=True) is x
        (True, True)
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """timm's ``DropPath``: ``drop_path`` as a module, active in training mode only.

    Args:
        drop_prob: the probability of dropping a sample's branch. At 0 (the zoo's
            default) it is the identity, so runs compare exactly.

    Example:
        >>> DropPath(0.0).train()(torch.ones(2, 3)).sum().item()
        6.0
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class SqueezeExcite(nn.Module):
    """timm-style squeeze-excitation whose gate multiplies the feature map in place (``mul_``).

    Args:
        channels: channels of the gated feature map.
        rd_channels: channels of the bottleneck.
        act_layer: the bottleneck's activation class (takes ``inplace``).

    Example:
        >>> SqueezeExcite(8, 2)(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, channels: int, rd_channels: int, act_layer: Callable[..., nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, rd_channels, 1)
        self.act1 = act_layer(inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        x_se = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x.mul_(self.gate(x_se))
