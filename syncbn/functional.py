"""``sync_batch_norm``: batch normalization whose batch statistics span every replica.

Same arguments as ``torch.nn.functional.batch_norm`` plus where the replicas are: a
``replica`` context (the threads way) or a ``process_group`` (the processes way).
Without either, or when running statistics are used instead of batch statistics, it
*is* ``F.batch_norm`` — native speed, bit-identical results.

The two ways differ in how gradients cross replicas. Threads share one autograd graph,
so the threads way is built of differentiable ops and autograd does the rest.
Processes each have their own graph, so ``_SyncBatchNormFunction`` makes one collective
in forward (statistics) and one in backward (two per-channel gradient sums).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from syncbn.comm.distributed import all_gather_statistics, all_reduce_sum
from syncbn.comm.threads import ReplicaContext
from syncbn.stats import BatchStatistics, channel_view, compute_dtype, local_statistics, reduced_dims

# Kept at import: syncbn.subclass may later route F.batch_norm through syncbn, and the
# unsynchronized path must still reach torch's own kernel.
torch_batch_norm = F.batch_norm


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    replica: ReplicaContext | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Batch normalization with statistics reduced over all replicas (threads or processes).

    Args:
        input: ``(N, C, *)`` tensor; float16/bfloat16 statistics are computed in float32.
        running_mean, running_var: ``(C,)`` buffers, updated in place when ``training``.
        weight, bias: optional ``(C,)`` affine parameters.
        training: use batch statistics (and update running ones) instead of running ones.
        momentum: the exponential-average factor (``nn.BatchNorm`` resolves ``None`` first).
        eps: added to the variance for numerical stability.
        replica: this replica's rendezvous in a ``syncbn.DataParallel`` forward.
        process_group: a torch.distributed group to reduce over (every rank must call).
            With neither, no synchronization.

    Shape:
        Output has the shape, dtype and memory format of ``input``.

    Returns:
        The normalized tensor; gradients flow to every replica's input.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> y = sync_batch_norm(x, None, None, training=True)
        >>> torch.allclose(y, F.batch_norm(x, None, None, training=True))
        True
    """
    if training and replica is not None and replica.world_size > 1:
        stats = replica.all_reduce_statistics(local_statistics(input))
        _check_count(stats.count, input, f"replica {replica.rank} of {replica.world_size}")
        var = stats.m2 / max(stats.count, 1)
        if running_mean is not None and running_var is not None and stats.count > 0:
            _update_running_statistics(running_mean, running_var, stats, momentum)
        return _normalize(input, stats.mean, var, weight, bias, eps)
    if training and process_group is not None:
        return _SyncBatchNormFunction.apply(
            input, weight, bias, running_mean, running_var, momentum, eps, process_group
        )
    return torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


class _SyncBatchNormFunction(torch.autograd.Function):
    """The processes way: one all_gather in forward, one all_reduce in backward.

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
        # An empty local batch still joins the all_gather (count 0): skipping it would
        # leave every other rank waiting.
        stats = all_gather_statistics(local_statistics(input), group)
        _check_count(stats.count, input, f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}")
        var = stats.m2 / max(stats.count, 1)
        if running_mean is not None and running_var is not None and stats.count > 0:
            _update_running_statistics(running_mean, running_var, stats, momentum)
        dtype = compute_dtype(input.dtype)
        ctx.save_for_backward(input, weight, stats.mean.to(dtype), torch.rsqrt(var + eps).to(dtype))
        ctx.count = stats.count
        ctx.group = group
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return _normalize(input, stats.mean, var, weight, bias, eps)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight, mean, invstd = ctx.saved_tensors
        dims = reduced_dims(input)
        dy = grad_output.to(mean.dtype)
        xhat = (input.to(mean.dtype) - channel_view(mean, input)) * channel_view(invstd, input)
        local_sums = torch.stack([dy.sum(dims), (dy * xhat).sum(dims)])
        # Every rank joins, an empty one too (its sums are zeros).
        global_sums = all_reduce_sum(local_sums.clone(), ctx.group) / max(ctx.count, 1)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            scale = invstd if weight is None else invstd * weight.to(mean.dtype)
            centered = dy - channel_view(global_sums[0], input) - xhat * channel_view(global_sums[1], input)
            grad_input = (centered * channel_view(scale, input)).to(input.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = local_sums[1].to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = local_sums[0].to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _check_count(count: int, input: Tensor, where: str) -> None:
    if count == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{input.size()} on {where}, and 1 value per channel over all of them"
        )


def _update_running_statistics(
    running_mean: Tensor, running_var: Tensor, stats: BatchStatistics, momentum: float
) -> None:
    # The running variance is the unbiased estimate n/(n-1) * var, as in torch.
    with torch.no_grad():
        unbiased_var = stats.m2 / (stats.count - 1)
        running_mean.mul_(1 - momentum).add_(stats.mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(unbiased_var.to(running_var.dtype), alpha=momentum)


def _normalize(
    input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    # (x - mean) * scale rather than x * scale + shift: the latter cancels
    # catastrophically when |mean| >> std. Statistics arrive in float64 and are
    # rounded once to the compute dtype.
    dtype = compute_dtype(input.dtype)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    output = (input.to(dtype) - channel_view(mean.to(dtype), input)) * channel_view(scale.to(dtype), input)
    if bias is not None:
        output = output + channel_view(bias.to(dtype), input)
    return output.to(input.dtype)
