"""``sync_batch_norm``: batch normalization whose batch statistics span every replica.

Same arguments as ``torch.nn.functional.batch_norm`` plus where the replicas are: a
``replica`` context (the threads way) or a ``process_group`` (the processes way).
With running statistics (eval mode), or with no replicas, it *is* ``F.batch_norm``:
bit-identical results.

This file picks the path; the math is in ``syncbn._functions``. Threads share one
autograd graph, so the threads way is built of differentiable ops and autograd does the
rest: when the replicas share a device (virtual CPU replicas), the last to arrive
normalizes every shard at once with torch's own BatchNorm; across devices, each
replica's statistics are merged on the first device. Processes each have their own
graph, so ``_SyncBatchNormFunction`` makes one collective in forward (statistics) and one
in backward (two per-channel gradient sums); under torch.compile the same code runs as
custom ops (``syncbn.processes_op``), traced without a graph break. A ``DataParallel`` inside a
torch.distributed job does both: its replicas meet first, then the processes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from syncbn._functions import (
    _Float32GradientFunction,
    _LocalStatisticsFunction,
    _NormalizeFunction,
    _SyncBatchNormFunction,
    merge_across_processes,
)
from syncbn.comm.replica_context import ReplicaContext
from syncbn.processes_op import sync_batch_norm_across_processes
from syncbn.shards import join_batch, split_batch
from syncbn.stats import BatchStatistics, check_count, merge_replica_statistics, update_running_statistics

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
    momentum: float | Tensor = 0.1,
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
        momentum: the exponential-average factor (``nn.BatchNorm`` resolves ``None`` first);
            a 0-dim tensor is taken too (a compiled ``SyncBatchNorm``'s ``1 / num_batches_tracked``).
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
    # As torch checks them (older releases did not, and the synchronized paths never reach torch's check).
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    traced_across_processes = training and process_group is not None and torch.compiler.is_compiling()
    if isinstance(momentum, Tensor) and not traced_across_processes:
        momentum = float(momentum)  # torch's kernel takes a float
    if training and replica is not None and replica.world_size > 1:
        # With a process group too (syncbn.DataParallel in a torch.distributed job), the
        # replicas' combined statistics are reduced across processes once per call.
        shard = _Shard(input, running_mean, running_var, weight, bias, momentum, eps, process_group, layer)
        if replica.rendezvous.one_device:
            return replica.rendezvous.exchange(replica.rank, replica.layer, shard, _normalize_together)[replica.rank]
        target = _gradient_target(input)
        local = _local_statistics(target, input)
        merged = _exchange_statistics(replica, _Post(local, weight, bias, process_group, layer))
        return _normalize_with(shard, target, local, merged, replica.rank, replica.world_size)
    if training and process_group is not None:
        if traced_across_processes:  # custom ops: no graph break at the layer
            return sync_batch_norm_across_processes(
                input, weight, bias, running_mean, running_var, momentum, eps, process_group, layer
            )
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
    process_group: dist.ProcessGroup | None = None
    layer: nn.Module | None = None


def _normalize_together(shards: list[_Shard]) -> list[Tensor]:
    """Every replica's output, computed once all have arrived (replicas share a device).

    The shards joined along the batch are the full batch, so torch's own BatchNorm
    normalizes them: bit-identical to one device, and one pass over the batch where R
    shard passes each pay the per-op overhead. Each replica gets its part of the output
    as a tensor of its own (``split_batch``), so it may change it in place. Shards that
    cannot be joined (sizes beyond the batch, dtypes, layouts or parameters differ) are
    normalized one by one with merged statistics instead.
    """
    if not _joinable(shards):
        targets = [_gradient_target(shard.input) for shard in shards]
        local = [_local_statistics(target, shard.input) for target, shard in zip(targets, shards, strict=True)]
        posts = [
            _Post(stats, shard.weight, shard.bias, shard.process_group, shard.layer)
            for stats, shard in zip(local, shards, strict=True)
        ]
        merged = _merge_posts(posts)
        return [
            _normalize_with(shard, targets[rank], local[rank], merged, rank, len(shards))
            for rank, shard in enumerate(shards)
        ]
    first = shards[0]  # replica 0's buffers are the master's; the others' copies are discarded
    whole = join_batch([shard.input for shard in shards], private=True)
    arguments = (first.running_mean, first.running_var, first.weight, first.bias)
    if first.process_group is not None:  # this process's batch, normalized as the processes way does
        running_mean, running_var, weight, bias = arguments
        output = _SyncBatchNormFunction.apply(
            whole, weight, bias, running_mean, running_var, first.momentum, first.eps, first.process_group, first.layer
        )
    else:
        check_count(whole.numel() // whole.size(1), whole, f"all {len(shards)} replicas")
        output = torch_batch_norm(whole, *arguments, True, first.momentum, first.eps)
    return split_batch(output, [shard.input.size(0) for shard in shards])


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


class _Post(NamedTuple):
    """What a replica brings to the rendezvous on the statistics way."""

    statistics: BatchStatistics
    weight: Tensor | None
    bias: Tensor | None
    process_group: dist.ProcessGroup | None = None
    layer: nn.Module | None = None


class _Merged(NamedTuple):
    """What every replica takes from it: the merged statistics and float64 affine parameters.

    Every replica normalizes with the same float64 copies of replica 0's weight and bias,
    so that autograd sums the replicas' parameter gradients in float64 and rounds them to
    the parameters' dtype once, as one device would (R float16 partial sums would each be
    rounded).
    """

    statistics: BatchStatistics
    weight: Tensor | None
    bias: Tensor | None

    def to(self, device: torch.device) -> _Merged:
        stats = BatchStatistics(self.statistics.count, self.statistics.mean.to(device), self.statistics.m2.to(device))
        return _Merged(stats, *(None if p is None else p.to(device) for p in (self.weight, self.bias)))


def _merge_posts(posts: list[_Post]) -> _Merged:
    """Chan's merge of every replica's statistics, and the float64 parameters, on the first replica's device.

    With a process group, the merge then spans every replica of every process.
    """
    merged = merge_replica_statistics([post.statistics for post in posts])
    first = posts[0]
    if first.process_group is not None:
        merged = merge_across_processes(merged, first.process_group, first.layer)
    return _Merged(merged, *(None if p is None else p.double() for p in (first.weight, first.bias)))


def _exchange_statistics(replica: ReplicaContext, post: _Post) -> _Merged:
    """This replica's share of the merge of every replica's post, on its own device."""
    merged = replica.rendezvous.exchange(replica.rank, replica.layer, post, _merge_posts)
    return merged.to(post.statistics.mean.device)


def _gradient_target(input: Tensor) -> Tensor:
    """What the statistics way's input gradient flows into: ``input``, or a float32 stand-in of a half one.

    Its two contributions (from the statistics and from the normalization) are summed by
    autograd in the dtype of what they flow into; float16/bfloat16 would round each
    (the affine one the same way on every element, so the errors add up over a channel),
    where torch rounds the input gradient once.
    """
    if input.dtype in (torch.float16, torch.bfloat16) and input.requires_grad:
        return _Float32GradientFunction.apply(input)
    return input


def _local_statistics(target: Tensor, input: Tensor) -> BatchStatistics:
    mean, m2 = _LocalStatisticsFunction.apply(target, input)
    return BatchStatistics(input.numel() // input.size(1) if input.size(1) else 0, mean, m2)


def _normalize_with(
    shard: _Shard, target: Tensor, local: BatchStatistics, merged: _Merged, rank: int, replicas: int
) -> Tensor:
    """Normalize replica ``rank``'s shard (statistics ``local``) with the ``merged`` statistics of all of them."""
    input, stats = shard.input, merged.statistics
    check_count(stats.count, input, f"replica {rank} of {replicas}")
    mean, m2 = stats.mean.to(input.device), stats.m2.to(input.device)
    invstd = torch.rsqrt(m2 / max(stats.count, 1) + shard.eps)
    # Only replica 0's buffers are the master's; the others' copies are discarded.
    if rank == 0 and shard.running_mean is not None and shard.running_var is not None and stats.count > 0:
        on_device = BatchStatistics(stats.count, mean, m2)
        update_running_statistics(shard.running_mean, shard.running_var, on_device, shard.momentum)
    weight, bias = (None if p is None else p.to(input.device) for p in (merged.weight, merged.bias))
    return _NormalizeFunction.apply(target, input, mean, invstd, weight, bias, local.mean, local.m2)
