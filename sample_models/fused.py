"""A BatchNorm subclass with a fused activation, in the style of timm's ``BatchNormAct2d``.

Its forward calls ``F.batch_norm`` itself and then an activation: converting it to a
plain SyncBN would drop the activation, which is exactly what syncbn must not do.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sample_models import example_input


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by an activation, keeping nn.BatchNorm2d's state-dict keys."""

    def __init__(self, num_features: int, act_layer: type[nn.Module] = nn.ReLU, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        x = F.batch_norm(
            x,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
        )
        return self.act(x)


@example_input(3, 16, 16)
def bn_act_net() -> nn.Module:
    """Conv followed by BatchNormAct2d (SiLU), twice, and a pooled classifier.

    Example:
        >>> import torch
        >>> bn_act_net()(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 4])
    """
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        BatchNormAct2d(8, act_layer=nn.SiLU),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        BatchNormAct2d(8, act_layer=nn.SiLU),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
