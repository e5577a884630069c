"""A detectron2-style NaiveSyncBatchNorm: what a CPU user would otherwise pick, to compare with.

Per channel, the mean and the mean of squares are all-reduced (averaged over ranks) and
autograd differentiates through the collective; normalization is two broadcast ops.
Mirrors ``detectron2.layers.batch_norm.NaiveSyncBatchNorm`` (stats_mode ""), equal
per-rank batches assumed, as there. Not part of the package: benchmarks only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class _AllReduce(torch.autograd.Function):
    """Sum over ranks; backward: the all-reduced gradient (detectron2's ``AllReduce``)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, input: Tensor) -> Tensor:
        gathered = [torch.zeros_like(input) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, input)
        return torch.stack(gathered).sum(0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> Tensor:
        grad_output = grad_output.clone()
        dist.all_reduce(grad_output)
        return grad_output


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm over (N, C, *) whose statistics are E[x] and E[x^2] averaged over ranks.

    Example:
        >>> NaiveSyncBatchNorm(3)(torch.randn(4, 3, 5, 5)).shape  # no process group: plain BN
        torch.Size([4, 3, 5, 5])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not self.training:
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        mean = input.mean(dims)
        meansqr = (input * input).mean(dims)
        vec = _AllReduce.apply(torch.cat([mean, meansqr])) * (1.0 / dist.get_world_size())
        mean, meansqr = vec.split(channels)
        var = meansqr - mean * mean
        with torch.no_grad():
            self.running_mean += self.momentum * (mean - self.running_mean)
            self.running_var += self.momentum * (var - self.running_var)
        invstd = torch.rsqrt(var + self.eps)
        scale = self.weight * invstd
        bias = self.bias - mean * scale
        view = (1, -1, *([1] * (input.dim() - 2)))
        return input * scale.view(view) + bias.view(view)


def naive_from(bn: nn.Module) -> NaiveSyncBatchNorm:
    """A NaiveSyncBatchNorm with ``bn``'s configuration, parameters and buffers."""
    naive = NaiveSyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    naive.load_state_dict(bn.state_dict())
    return naive
