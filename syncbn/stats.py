"""Per-channel batch statistics (count, mean, M2) and Chan's parallel merge.

Why not sums of x and x**2: ``var = E[x^2] - E[x]^2`` cancels catastrophically when
|mean| >> std (an input offset by 1e4 loses every significant digit in float32). We
keep, per replica, the count, the mean and the sum of squared deviations from that
mean (M2), and merge replicas with the pairwise formula of Chan, Golub & LeVeque
(1979), generalised to R parts:

    n  = sum n_i
    mu = mu_ref + sum n_i (mu_i - mu_ref) / n
    M2 = sum M2_i + sum n_i (mu_i - mu)^2

A replica's own statistics come from ``syncbn.kernels.batch_statistics``;
the merge is made of differentiable tensor ops (``syncbn.functional`` wraps it in one
autograd node with the same gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor


class BatchStatistics(NamedTuple):
    """Per-channel statistics of a batch (or of the union of several batches).

    Attributes:
        count: values per channel (a Python int, the same for every channel).
        mean: per-channel mean, shape ``(C,)``, float64.
        m2: per-channel sum of squared deviations from ``mean``, shape ``(C,)``, float64.
    """

    count: int
    mean: Tensor
    m2: Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions over the batch run in: float64 stays, everything else is float32.

    Example:
        >>> compute_dtype(torch.bfloat16)
        torch.float32
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduced_dims(input: Tensor) -> list[int]:
    """Dimensions BatchNorm reduces over: all but the channel dimension 1.

    Example:
        >>> reduced_dims(torch.zeros(2, 3, 4, 5))
        [0, 2, 3]
    """
    return [0, *range(2, input.dim())]


def merge_statistics(parts: Sequence[BatchStatistics]) -> BatchStatistics:
    """Merge per-replica statistics with Chan's parallel formula (stable, differentiable).

    Every part's tensors must be on one device. Parts with ``count == 0`` take part with
    zero weight.

    Args:
        parts: one ``BatchStatistics`` per replica.

    Returns:
        The statistics of the union of all parts. With a total count of zero, mean and M2
        are zeros.

    Example:
        >>> from syncbn.kernels import batch_statistics
        >>> a = batch_statistics(torch.tensor([[1.0], [2.0]]))
        >>> b = batch_statistics(torch.tensor([[3.0], [4.0], [5.0]]))
        >>> merged = merge_statistics([a, b])
        >>> merged.count, merged.mean.tolist(), merged.m2.tolist()
        (5, [3.0], [10.0])
    """
    if not parts:
        raise ValueError("merge_statistics expected at least one part (got 0)")
    count = sum(part.count for part in parts)
    nonempty = [part for part in parts if part.count > 0]
    if not nonempty:
        return BatchStatistics(0, parts[0].mean, parts[0].m2)
    if len(nonempty) == 1:
        return nonempty[0]
    counts = torch.tensor(
        [part.count for part in nonempty], dtype=nonempty[0].mean.dtype, device=nonempty[0].mean.device
    ).unsqueeze(1)
    means = torch.stack([part.mean for part in nonempty])
    m2s = torch.stack([part.m2 for part in nonempty])
    # Weighted sum of small deltas from one part's mean, not of the means themselves:
    # with |mean| >> std the deltas carry the information and round far less.
    reference = means[0]
    mean = reference + (counts * (means - reference)).sum(0) / count
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return BatchStatistics(count, mean, m2)


def merge_gathered(counts: Sequence[int], means: Tensor, m2s: Tensor) -> BatchStatistics:
    """Chan's merge of statistics gathered as rows (one per replica): ``merge_statistics`` in a few ops.

    Args:
        counts: each replica's count.
        means, m2s: ``(R, C)`` tensors, row ``r`` from replica ``r`` (zeros for an empty one).

    Returns:
        The statistics of the union, bit-for-bit what ``merge_statistics`` gives.

    Example:
        >>> merged = merge_gathered([2, 3], torch.tensor([[1.5], [4.0]]), torch.tensor([[0.5], [2.0]]))
        >>> merged.count, merged.mean.tolist(), merged.m2.tolist()
        (5, [3.0], [10.0])
    """
    count = sum(counts)
    nonempty = [rank for rank, n in enumerate(counts) if n > 0]
    if len(nonempty) <= 1:  # copies: the rows may be views of a large gathered buffer
        rank = nonempty[0] if nonempty else 0
        return BatchStatistics(count, means[rank].clone(), m2s[rank].clone())
    if len(nonempty) < len(counts):
        means, m2s = means[nonempty], m2s[nonempty]
    weights = means.new_tensor([counts[rank] for rank in nonempty]).unsqueeze(1)
    # As merge_statistics: small deltas from the first part's mean carry the information.
    reference = means[0]
    mean = reference + (weights * (means - reference)).sum(0) / count
    m2 = m2s.sum(0) + (weights * (means - mean).square()).sum(0)
    return BatchStatistics(count, mean, m2)


def check_count(count: int, input: Tensor, where: str) -> None:
    """Raise torch's error for training on one value per channel, saying where it happened.

    Example:
        >>> check_count(2, torch.zeros(2, 3), "replica 0 of 2")
    """
    if count == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{input.size()} on {where}, and 1 value per channel over all of them"
        )


def update_running_statistics(
    running_mean: Tensor, running_var: Tensor, stats: BatchStatistics, momentum: float
) -> None:
    """Fold ``stats`` into the running statistics in place, as ``nn.BatchNorm`` does."""
    # The running variance is the unbiased estimate n/(n-1) * var, as in torch. Computed in
    # float64 and rounded once: float16 buffers would otherwise round at each step.
    with torch.no_grad():
        unbiased_var = stats.m2 / (stats.count - 1)
        running_mean.copy_(running_mean.double() * (1 - momentum) + stats.mean.double() * momentum)
        running_var.copy_(running_var.double() * (1 - momentum) + unbiased_var.double() * momentum)


def merge_replica_statistics(parts: list[BatchStatistics]) -> BatchStatistics:
    """Chan's merge of every replica's statistics, on the first one's device, differentiable."""
    device = parts[0].mean.device
    counts = tuple(p.count for p in parts)
    tensors = [p.mean.to(device) for p in parts] + [p.m2.to(device) for p in parts]
    mean, m2 = _MergeFunction.apply(counts, *tensors)
    return BatchStatistics(sum(counts), mean, m2)


class _MergeFunction(torch.autograd.Function):
    """Chan's merge as one autograd node (a dozen small ops would each cost a node).

    forward: ``merge_statistics``. backward, with n = sum n_i:
    dmean_i = n_i / n * dmean + 2 n_i (mean_i - mean) * dM2, and dM2_i = dM2
    (the mean's own dependence on mean_i cancels: sum n_i (mean_i - mean) = 0).
    """

    @staticmethod
    def forward(ctx: Any, counts: tuple[int, ...], *tensors: Tensor) -> tuple[Tensor, Tensor]:
        half = len(counts)
        means, m2s = tensors[:half], tensors[half:]
        merged = merge_statistics([BatchStatistics(n, m, q) for n, m, q in zip(counts, means, m2s, strict=True)])
        ctx.counts = counts
        ctx.save_for_backward(*means, merged.mean)
        return merged.mean, merged.m2

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor | None, grad_m2: Tensor | None) -> tuple[Tensor | None, ...]:
        *means, mean = ctx.saved_tensors
        total = max(sum(ctx.counts), 1)
        grad_mean = grad_mean if grad_mean is not None else torch.zeros_like(mean)
        grad_m2 = grad_m2 if grad_m2 is not None else torch.zeros_like(mean)
        grad_means = [
            n / total * grad_mean + 2 * n * (m - mean) * grad_m2 for n, m in zip(ctx.counts, means, strict=True)
        ]
        return (None, *grad_means, *(grad_m2 for _ in means))
