"""``sync_batch_norm``: batch normalization whose batch statistics span every replica.

Same arguments as ``torch.nn.functional.batch_norm`` plus the replica context. Without
a context, or with a single replica, or when running statistics are used instead of
batch statistics, it *is* ``F.batch_norm`` — native speed, bit-identical results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from syncbn.comm.threads import ReplicaContext
from syncbn.stats import BatchStatistics, channel_view, compute_dtype, local_statistics

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
) -> Tensor:
    """Batch normalization with statistics reduced over all replicas of ``replica``'s group.

    Args:
        input: ``(N, C, *)`` tensor; float16/bfloat16 statistics are computed in float32.
        running_mean, running_var: ``(C,)`` buffers, updated in place when ``training``.
        weight, bias: optional ``(C,)`` affine parameters.
        training: use batch statistics (and update running ones) instead of running ones.
        momentum: the exponential-average factor (``nn.BatchNorm`` resolves ``None`` first).
        eps: added to the variance for numerical stability.
        replica: this replica's rendezvous; ``None`` means no synchronization.

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
    if not training or replica is None or replica.world_size == 1:
        return torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)

    stats = replica.all_reduce_statistics(local_statistics(input))
    if stats.count == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{input.size()} on replica {replica.rank} and 1 value per channel over all "
            f"{replica.world_size} replicas"
        )
    var = stats.m2 / max(stats.count, 1)
    if running_mean is not None and running_var is not None and stats.count > 0:
        _update_running_statistics(running_mean, running_var, stats, momentum)
    return _normalize(input, stats.mean, var, weight, bias, eps)


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
