"""The autograd Function of the processes way: one collective in forward, one in backward."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from syncbn import kernels
from syncbn.comm.distributed import all_gather_statistics, all_reduce_sum
from syncbn.stats import check_count, update_running_statistics


class _SyncBatchNormFunction(torch.autograd.Function):
    """The processes way: one collective in forward (statistics), one in backward.

    backward: dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), both means over
    every rank; dweight and dbias are this rank's sums (DDP's all-reduce adds the rest).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        group: dist.ProcessGroup,
    ) -> Tensor:
        stats = kernels.batch_statistics(input)
        # An empty local batch still joins the all_gather (count 0): skipping it would
        # leave every other rank waiting.
        stats = all_gather_statistics(stats, group)
        check_count(stats.count, input, f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}")
        invstd = torch.rsqrt(stats.m2 / max(stats.count, 1) + eps)
        if running_mean is not None and running_var is not None and stats.count > 0:
            update_running_statistics(running_mean, running_var, stats, momentum)
        ctx.save_for_backward(input, weight, bias, stats.mean, invstd)
        ctx.count = stats.count
        ctx.group = group
        ctx.eps = eps
        return kernels.normalize(input, stats.mean, invstd, weight, bias)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight, bias, mean, invstd = ctx.saved_tensors
        sum_dy, sum_dy_xhat = kernels.gradient_sums(grad_output, input, mean, invstd)
        sums = torch.stack([sum_dy, sum_dy_xhat])
        sums = all_reduce_sum(sums, ctx.group)  # every rank joins, an empty one too (its sums are zeros)
        global_means = sums / max(ctx.count, 1)
        grad_input = None
        if ctx.needs_input_grad[0]:
            mean_dy, mean_dy_xhat = global_means
            grad_input = kernels.input_gradient(grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xhat)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None
