"""``sync_batch_norm``: batch normalization whose batch statistics span every replica.

Same arguments as ``torch.nn.functional.batch_norm`` plus where the replicas are: a
``replica`` context (the threads way) or a ``process_group`` (the processes way).
With running statistics (eval mode), or with no replicas, it *is* ``F.batch_norm``:
bit-identical results.

The two ways differ in how gradients cross replicas. Threads share one autograd graph,
so the threads way is built of differentiable ops and autograd does the rest: when the
replicas share a device (virtual CPU replicas), the last to arrive normalizes every
shard at once with torch's own BatchNorm; across devices, each replica's statistics
are merged on the first device. Processes each have their own graph, so
``_SyncBatchNormFunction`` makes one collective in forward (statistics) and one in
backward (two per-channel gradient sums).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from syncbn import kernels
from syncbn._functions import _SyncBatchNormFunction
from syncbn.comm.threads import ReplicaContext, merge_replica_statistics
from syncbn.parallel.scatter_gather import join
from syncbn.stats import BatchStatistics, check_count, update_running_statistics

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
    layer: nn.Module | None = None,
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
        layer: the module making the call, which names the collectives every rank checks
            against each other (``process_group`` only).

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
        shard = _Shard(input, running_mean, running_var, weight, bias, momentum, eps)
        if replica.group.shared_device:
            return replica.group.exchange(replica.rank, replica.layer, shard, _normalize_together)[replica.rank]
        stats = replica.all_reduce_statistics(_local_statistics(input))
        return _normalize_with(shard, stats, replica.rank, replica.world_size)
    if training and process_group is not None:
        return _SyncBatchNormFunction.apply(
            input, weight, bias, running_mean, running_var, momentum, eps, process_group, layer
        )
    return torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


# The threads way.


class _Shard(NamedTuple):
    """One replica's arguments to a SyncBN call."""

    input: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    momentum: float
    eps: float


def _normalize_together(shards: list[_Shard]) -> list[Tensor]:
    """Every replica's output, computed once all have arrived (replicas share a device).

    The shards joined along the batch are the full batch, so torch's own BatchNorm
    normalizes them: bit-identical to one device, three autograd nodes (join, BatchNorm,
    split) where merging statistics takes nine Python ones, and one pass over the batch
    where R shard passes each pay the per-op overhead. Shards that cannot be joined
    (sizes beyond the batch, dtypes, layouts or parameters differ) are normalized one
    by one with merged statistics instead.
    """
    if not _joinable(shards):
        merged = merge_replica_statistics([_local_statistics(shard.input) for shard in shards])
        return [_normalize_with(shard, merged, rank, len(shards)) for rank, shard in enumerate(shards)]
    first = shards[0]  # replica 0's buffers are the master's; the others' copies are discarded
    whole = join([shard.input for shard in shards])
    check_count(whole.numel() // whole.size(1), whole, f"all {len(shards)} replicas")
    output = torch_batch_norm(
        whole, first.running_mean, first.running_var, first.weight, first.bias, True, first.momentum, first.eps
    )
    return list(output.split([shard.input.size(0) for shard in shards]))


def _joinable(shards: list[_Shard]) -> bool:
    """Whether the shards are slices of one batch: same sizes beyond it, dtype, layout, parameters."""
    first = shards[0]
    parts = [shard.input for shard in shards if shard.input.size(0) > 0]
    if not parts or first.input.size(1) == 0:
        return False
    # Equal strides: the joined tensor, and so every output, keeps the shards' layout.
    layout = (parts[0].stride(), parts[0].dtype, parts[0].device)
    return all(
        shard.input.shape[1:] == first.input.shape[1:]
        and shard.weight is first.weight
        and shard.bias is first.bias
        and shard.eps == first.eps  # momentum: only replica 0's updates the running statistics
        for shard in shards
    ) and all((part.stride(), part.dtype, part.device) == layout for part in parts)


def _local_statistics(input: Tensor) -> BatchStatistics:
    mean, m2 = _LocalStatisticsFunction.apply(input)
    return BatchStatistics(input.numel() // input.size(1) if input.size(1) else 0, mean, m2)


def _normalize_with(shard: _Shard, stats: BatchStatistics, rank: int, replicas: int) -> Tensor:
    """Normalize replica ``rank``'s shard with the merged statistics of all of them."""
    input = shard.input
    check_count(stats.count, input, f"replica {rank} of {replicas}")
    mean, m2 = stats.mean.to(input.device), stats.m2.to(input.device)
    invstd = torch.rsqrt(m2 / max(stats.count, 1) + shard.eps)
    # Only replica 0's buffers are the master's; the others' copies are discarded.
    if rank == 0 and shard.running_mean is not None and shard.running_var is not None and stats.count > 0:
        merged = BatchStatistics(stats.count, mean, m2)
        update_running_statistics(shard.running_mean, shard.running_var, merged, shard.momentum)
    return _NormalizeFunction.apply(input, mean, invstd, shard.weight, shard.bias)


# Replicas on different devices: two Functions with fused passes per replica, joined by
# the differentiable merge (syncbn.comm.threads).


class _LocalStatisticsFunction(torch.autograd.Function):
    """x -> this replica's (mean, M2) per channel, float64.

    backward: d/dx of mean is 1/n, of M2 is 2 (x - mean), so
    dx = dmean / n + 2 (x - mean) dM2 — affine in x, one centered affine pass.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, input: Tensor) -> tuple[Tensor, Tensor]:
        stats = kernels.batch_statistics(input)
        ctx.save_for_backward(input, stats.mean)
        ctx.count = stats.count
        return stats.mean, stats.m2

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_mean: Tensor, grad_m2: Tensor) -> Tensor:
        input, mean = ctx.saved_tensors
        if ctx.count == 0:
            return torch.zeros_like(input)
        grad_mean = grad_mean if grad_mean is not None else torch.zeros_like(mean)
        grad_m2 = grad_m2 if grad_m2 is not None else torch.zeros_like(mean)
        deviation_grad = kernels.affine_in_deviation(input, mean, 2 * grad_m2, grad_mean / ctx.count)
        return deviation_grad.to(input.dtype)


class _NormalizeFunction(torch.autograd.Function):
    """(x, mean, invstd, weight, bias) -> (x - mean) * invstd * weight + bias, in one pass.

    backward, from one fused pass giving dy * invstd * w, sum(dy) and sum(dy * xhat):
    dmean = -invstd * w * sum(dy), dinvstd = w * sum(dy * xhat) / invstd,
    dweight = sum(dy * xhat), dbias = sum(dy).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        input: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
    ) -> Tensor:
        ctx.save_for_backward(input, mean, invstd, weight)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return kernels.normalize(input, mean, invstd, weight, bias)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, mean, invstd, weight = ctx.saved_tensors
        grad_input, sum_dy, sum_dy_xhat = kernels.normalize_backward(grad_output, input, mean, invstd, weight)
        w = weight.double() if weight is not None else 1.0
        grad_mean = -invstd * w * sum_dy.double()
        grad_invstd = w * sum_dy_xhat.double() / invstd
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return grad_input.to(input.dtype), grad_mean, grad_invstd, grad_weight, grad_bias
