"""The autograd Functions of SyncBN: what each way computes, and its gradient.

- The processes way: ``_SyncBatchNormFunction``, one collective in forward, one in
  backward (``forward_across_processes``, ``backward_across_processes``, which the custom
  ops of ``syncbn.processes_op`` run under torch.compile); ``merge_across_processes`` for
  ``DataParallel`` inside a torch.distributed job.
- The threads way on separate devices: ``_LocalStatisticsFunction`` and
  ``_NormalizeFunction`` per replica, joined by the differentiable merge of
  ``syncbn.stats``; ``_Float32GradientFunction`` for half inputs.

(Chan's merge has its Function in ``syncbn.stats``; the shards' split and join theirs in
``syncbn.shards``.)

``_SyncBatchNormFunction`` is differentiable twice (and more): a backward run with
``create_graph=True`` (a gradient penalty) is built from differentiable ops, and its
two global quantities, the statistics and the gradient sums, enter the graph through
``_GlobalSumFunction``, whose backward sums the gradients over every rank. So the
second-order gradients are those of the full batch, as the first-order ones are.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from syncbn import kernels
from syncbn.comm.distributed import (
    BACKWARD,
    FORWARD,
    CollectiveTag,
    PendingGather,
    all_gather_checked,
    all_gather_statistics,
    count_call,
    layer_tag,
)
from syncbn.stats import (
    BatchStatistics,
    check_count,
    compute_dtype,
    merge_gathered,
    reduced_dims,
    update_running_statistics,
)


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
        layer: nn.Module | None,
    ) -> Tensor:
        output, stats, invstd, tag = forward_across_processes(input, weight, bias, eps, group, layer)
        if running_mean is not None and running_var is not None and stats.count > 0:
            update_running_statistics(running_mean, running_var, stats, momentum)
        ctx.save_for_backward(input, weight, stats.mean, stats.m2, invstd)
        ctx.count, ctx.group, ctx.tag, ctx.eps = stats.count, group, tag, eps
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return output

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the backward must be differentiable itself
            grads = _differentiable_backward(ctx, grad_output)
        else:
            grads = _backward(ctx, grad_output)
        return (*grads, None, None, None, None, None, None)


def forward_across_processes(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    group: dist.ProcessGroup,
    layer: nn.Module | None,
) -> tuple[Tensor, BatchStatistics, Tensor, CollectiveTag]:
    """The processes way's forward: the output, the global statistics, their invstd, and the call's tag.

    One checked collective; the running statistics are the caller's to update. Shared by
    ``_SyncBatchNormFunction`` and the custom op that torch.compile traces
    (``syncbn.processes_op``).
    """
    tag = layer_tag(layer, group)
    # An empty local batch still joins the all_gather (count 0): skipping it would
    # leave every other rank waiting.
    local, centered = kernels.centered_statistics(input)
    stats = all_gather_statistics(local, group, tag)
    count_call(layer, group, tag)
    if stats.count == 1:
        check_count(stats.count, input, f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}")
    invstd = (stats.m2 / max(stats.count, 1) + eps).rsqrt_()
    # The output is written over the statistics' deviations: no second batch-sized tensor.
    output = kernels.normalize_centered(input, centered, stats.mean, invstd, weight, bias)
    return output, stats, invstd, tag


def backward_across_processes(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    count: int,
    tag: CollectiveTag,
    group: dist.ProcessGroup,
    input_needs_grad: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The first-order backward: the input gradient (if needed), ``sum(dy)`` and ``sum(dy * xhat)`` (float64).

    Fused passes and one collective of the two gradient sums; shared as the forward is.
    """
    sum_dy, sum_dy_xhat = kernels.gradient_sums(grad_output, input, mean, invstd)
    # Every rank joins, an empty one too (its sums are zeros). While the sums travel,
    # the passes of the input gradient that need no global value run.
    pending = PendingGather(torch.cat([sum_dy, sum_dy_xhat]), tag, BACKWARD, group)
    deviations = kernels.prepare_input_gradient(input, mean) if input_needs_grad else None
    means = pending.wait()[1].sum(0) / max(count, 1)
    grad_input = None
    if input_needs_grad:
        channels = sum_dy.numel()
        grad_input = kernels.finish_input_gradient(
            deviations, grad_output, input, mean, invstd, weight, means[:channels], means[channels:]
        )
    return grad_input, sum_dy, sum_dy_xhat


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    """The first-order backward of ``_SyncBatchNormFunction``."""
    input, weight, mean, _, invstd = ctx.saved_tensors
    grad_input, sum_dy, sum_dy_xhat = backward_across_processes(
        grad_output, input, weight, mean, invstd, ctx.count, ctx.tag, ctx.group, ctx.needs_input_grad[0]
    )
    grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
    return grad_input, grad_weight, grad_bias


def _differentiable_backward(
    ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor
) -> tuple[Tensor | None, ...]:
    """The same backward from differentiable ops, for ``create_graph=True``.

    The forward's statistics enter as functions of this rank's input: with ``c`` the
    global mean rounded to the compute dtype (a constant), this rank's sums of ``x - c``
    and ``(x - c)**2`` are the local parts of the global ones, which the forward already
    exchanged; ``_GlobalSumFunction`` returns those known totals and, differentiated,
    sums the gradients over every rank. The gradient sums are exchanged the same way
    (the backward's one collective). Batch-sized ops run in the compute dtype.
    """
    input, weight, mean, m2, invstd = ctx.saved_tensors
    count, channels = max(ctx.count, 1), mean.numel()
    dims = reduced_dims(input)
    dtype = compute_dtype(input.dtype)
    shape = (1, channels, *([1] * (input.dim() - 2)))
    center = mean.to(dtype)
    offset = mean - center.double()  # global mean - c, per channel (float64)
    deviation = input.to(dtype) - center.view(shape)
    local = torch.cat([deviation.sum(dims), deviation.square().sum(dims)]).double()
    known = torch.cat([count * offset, m2 + count * offset.square()])
    totals = _GlobalSumFunction.apply(local, known, ctx.tag, FORWARD, ctx.group)
    shift = totals[:channels] / count  # the global mean - c, now a function of every rank's input
    var = totals[channels:] / count - shift.square()
    global_invstd = torch.rsqrt(var + ctx.eps)
    xhat = (deviation - shift.to(dtype).view(shape)) * global_invstd.to(dtype).view(shape)
    dy = grad_output.to(dtype)
    sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)
    sums = _GlobalSumFunction.apply(torch.cat([sum_dy, sum_dy_xhat]).double(), None, ctx.tag, BACKWARD, ctx.group)
    means = (sums / count).to(dtype)
    scale = global_invstd.to(dtype) if weight is None else global_invstd.to(dtype) * weight.to(dtype)
    grad_input = (dy - means[:channels].view(shape) - xhat * means[channels:].view(shape)) * scale.view(shape)
    grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
    return grad_input.to(input.dtype) if ctx.needs_input_grad[0] else None, grad_weight, grad_bias


class _GlobalSumFunction(torch.autograd.Function):
    """This rank's part ``local`` -> the sum of every rank's part; backward: the sum of every rank's gradient.

    Each rank's total depends on every rank's part with derivative one, so the gradient
    of a part is the sum over ranks of the gradients of their totals: one checked
    all_gather (pass ``kind + 2``), itself made by this Function, so any order of
    differentiation stays exact. ``known``, when given, is the total already exchanged
    (no collective in forward).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        local: Tensor,
        known: Tensor | None,
        tag: CollectiveTag,
        kind: int,
        group: dist.ProcessGroup,
    ) -> Tensor:
        ctx.tag, ctx.kind, ctx.group = tag, kind, group
        if known is not None:
            return known.clone()
        _, rows = all_gather_checked(local.detach(), tag, kind, group)
        return rows.sum(0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        grad_local = _GlobalSumFunction.apply(grad_total.contiguous(), None, ctx.tag, ctx.kind + 2, ctx.group)
        return grad_local, None, None, None, None


def merge_across_processes(
    local: BatchStatistics, group: dist.ProcessGroup, layer: nn.Module | None
) -> BatchStatistics:
    """The statistics of every process's batch, from this process's ``local`` ones: one checked all_gather.

    Differentiable: the gradient of ``local`` sums, over every process, the gradients of
    the merged statistics (a collective in backward), as ``syncbn.DataParallel`` in a
    torch.distributed job needs: its replicas' statistics feed every process's layers.

    Example:
        >>> # in every process of an initialized group:
        >>> # merged = merge_across_processes(local, group, layer)
    """
    tag = layer_tag(layer, group)
    counts, rows = all_gather_checked(torch.cat([local.mean, local.m2]).detach(), tag, FORWARD, group, local.count)
    count_call(layer, group, tag)
    channels = local.mean.numel()
    merged = merge_gathered(counts, rows[:, :channels], rows[:, channels:])
    mean, m2 = _CrossProcessMergeFunction.apply(
        local.mean, local.m2, merged.mean, merged.m2, local.count, merged.count, tag, group
    )
    return BatchStatistics(merged.count, mean, m2)


class _CrossProcessMergeFunction(torch.autograd.Function):
    """(local mean, M2; merged mean, M2 already exchanged) -> the merged ones, with their gradient.

    backward, as Chan's merge (``syncbn.stats._MergeFunction``) with this process as
    one part of ``n`` values: dmean_local = n_local / n * g_mean + 2 n_local (mean_local -
    mean) * g_M2 and dM2_local = g_M2, where (g_mean, g_M2) are the merged statistics'
    gradients summed over every process (``_GlobalSumFunction``: one collective, itself
    differentiable).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        local_mean: Tensor,
        local_m2: Tensor,
        mean: Tensor,
        m2: Tensor,
        local_count: int,
        count: int,
        tag: CollectiveTag,
        group: dist.ProcessGroup,
    ) -> tuple[Tensor, Tensor]:
        mean, m2 = mean.clone(), m2.clone()
        ctx.save_for_backward(local_mean, mean)
        ctx.local_count, ctx.count, ctx.tag, ctx.group = local_count, max(count, 1), tag, group
        return mean, m2

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_mean: Tensor, grad_m2: Tensor
    ) -> tuple[Tensor | None, ...]:
        local_mean, mean = ctx.saved_tensors
        grad_mean = grad_mean if grad_mean is not None else torch.zeros_like(mean)
        grad_m2 = grad_m2 if grad_m2 is not None else torch.zeros_like(mean)
        channels = mean.numel()
        summed = _GlobalSumFunction.apply(
            torch.cat([grad_mean, grad_m2]).contiguous(), None, ctx.tag, BACKWARD, ctx.group
        )
        total_mean, total_m2 = summed[:channels], summed[channels:]
        n = ctx.local_count
        grad_local_mean = n / ctx.count * total_mean + 2 * n * (local_mean - mean) * total_m2
        return grad_local_mean, total_m2, None, None, None, None, None, None


# The threads way, replicas on separate devices.
# Two Functions per replica, joined by the differentiable
# merge (``_MergeFunction``). Autograd sums their two contributions to the input
# gradient, so each must be small where the sum is: the normalize Function gives the
# shard's own BatchNorm backward (dy less its local means) and hands the rest, a small
# correction affine in x, to the statistics Function through the local (mean, M2). With
# ``w * invstd * dy`` and its large mean split between them instead, each would be
# rounded apart (in float16, 10-1000x further off than torch's input gradient; in float32,
# by a per-channel constant whose rounding adds up over the batch).
# For float16/bfloat16 input the two are summed in float32 (``_gradient_target``) and
# rounded once, as torch rounds its input gradient once.


class _LocalStatisticsFunction(torch.autograd.Function):
    """(target, x) -> this replica's (mean, M2) of x per channel, float64; x's gradient goes to target.

    backward: d/dx of mean is 1/n, of M2 is 2 (x - mean), so
    dx = dmean / n + 2 (x - mean) dM2 — affine in x, one centered affine pass.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, target: Tensor, input: Tensor) -> tuple[Tensor, Tensor]:
        stats = kernels.batch_statistics(input)
        ctx.save_for_backward(input, stats.mean)
        ctx.count, ctx.target_dtype = stats.count, target.dtype
        return stats.mean, stats.m2

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_mean: Tensor, grad_m2: Tensor) -> tuple[Tensor, None]:
        input, mean = ctx.saved_tensors
        if ctx.count == 0:
            return torch.zeros_like(input, dtype=ctx.target_dtype), None
        grad_mean = grad_mean if grad_mean is not None else torch.zeros_like(mean)
        grad_m2 = grad_m2 if grad_m2 is not None else torch.zeros_like(mean)
        if torch.is_grad_enabled():  # create_graph: plain differentiable ops (the kernels are not)
            deviation = input.double() - _per_channel(mean, input)
            grad = _per_channel(grad_mean / ctx.count, input) + 2 * deviation * _per_channel(grad_m2, input)
            return grad.to(ctx.target_dtype), None
        deviation_grad = kernels.affine_in_deviation(input, mean, 2 * grad_m2, grad_mean / ctx.count)
        return deviation_grad.to(ctx.target_dtype), None


class _NormalizeFunction(torch.autograd.Function):
    """(target, x, mean, invstd, weight, bias, local mean, local M2) -> (x - mean) * invstd * weight + bias.

    ``mean`` and ``invstd`` are the merged statistics; the shard's own (local mean, M2)
    take part only in the backward, which hands them a share of x's gradient. That
    gradient goes to ``target`` (x itself, or its float32 stand-in).

    backward, with sums over this shard: dmean = -invstd * w * sum(dy),
    dinvstd = w * sum(dy * (x - mean)), dweight = invstd * sum(dy * (x - mean)),
    dbias = sum(dy); dx = torch's BatchNorm backward on this shard alone (local means of
    dy and dy * xhat), and the local statistics get what makes up the rest of
    ``w * invstd * dy``: ``w * invstd * (mean_local(dy) + xhat * mean_local(dy * xhat))``.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        target: Tensor,
        input: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        local_mean: Tensor,
        local_m2: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(input, mean, invstd, weight, local_mean)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.target_dtype = target.dtype
        return kernels.normalize(input, mean, invstd, weight, bias)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, mean, invstd, weight, local_mean = ctx.saved_tensors
        w = weight.double() if weight is not None else 1.0
        if torch.is_grad_enabled():  # create_graph: plain differentiable ops (the kernels are not)
            dims = reduced_dims(input)
            dy = grad_output.double()
            deviation = input.double() - _per_channel(mean, input)
            sum_dy, sum_dy_deviation = dy.sum(dims), (dy * deviation).sum(dims)
            grad_input = dy * _per_channel(invstd * w, input)
            grad_local_mean = grad_local_m2 = None
        else:
            grad_input, sum_dy, sum_dy_deviation, grad_local_mean, grad_local_m2 = _shard_backward(
                grad_output, input, mean, invstd, weight, local_mean
            )
        grad_mean = -invstd * w * sum_dy
        grad_invstd = w * sum_dy_deviation
        grad_weight = (invstd * sum_dy_deviation).to(weight.dtype) if weight is not None else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        grad_input = grad_input.to(ctx.target_dtype)
        return grad_input, None, grad_mean, grad_invstd, grad_weight, grad_bias, grad_local_mean, grad_local_m2


def _shard_backward(
    grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, local_mean: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """torch's training-mode BatchNorm backward on one shard, with the merged mean and invstd.

    Returns ``(dx_local, sum(dy), sum(dy * (x - mean)), dlocal_mean, dlocal_M2)``, sums in
    float64: ``dx_local`` is the kernel's input gradient (in the compute dtype), and the
    local statistics' share makes up the rest of ``w * invstd * dy`` through their backward.
    """
    count = input.numel() // input.size(1)
    zeros = torch.zeros_like(mean)
    if count == 0:
        return torch.zeros_like(input), zeros, zeros, zeros, zeros
    dtype = compute_dtype(input.dtype)
    # The kernel works with the mean and invstd rounded to the compute dtype: its centred
    # term is (x - mean_k) * invstd_k^2 * sum(dy * (x - mean_k)) / n, and the share below
    # uses the same, so that the two add up to w * invstd * dy up to a rounding of the
    # scale on centred values (whose sum over the shard is zero: no error adds up).
    mean_k, invstd_k = mean.to(dtype), invstd.to(dtype)
    w_k = weight.to(dtype) if weight is not None else torch.ones_like(invstd_k)
    # In the compute dtype, not rounded to float16: the share below is added to it in
    # float32 (``_gradient_target``), and only the sum is rounded.
    grad_input, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad_output.to(dtype), input.to(dtype), w_k, None, None, mean_k, invstd_k, True, 0.0, [True, True, True]
    )
    scale = invstd.double() * (weight.double() if weight is not None else 1.0)
    sum_dy, invstd_k = sum_dy.double(), invstd_k.double()
    sum_dy_deviation_k = sum_dy_xhat.double() / invstd_k  # sum(dy * (x - mean_k))
    # The share, scale * (sum_dy / n + invstd_k^2 * sum_dy_deviation_k / n * (x - mean_k)),
    # as dx = dlocal_mean / n + 2 * (x - local_mean) * dlocal_M2 with x - mean_k =
    # (x - local_mean) + (local_mean - mean_k):
    slope = scale * invstd_k.square() * sum_dy_deviation_k / count
    grad_local_mean = scale * sum_dy + count * slope * (local_mean - mean_k.double())
    shift = mean.double() - mean_k.double()
    return grad_input, sum_dy, sum_dy_deviation_k - shift * sum_dy, grad_local_mean, slope / 2


class _Float32GradientFunction(torch.autograd.Function):
    """x (float16/bfloat16) -> a float32 stand-in of x's shape that holds no memory.

    The statistics way's Functions read x itself and send x's gradient to the stand-in;
    autograd sums what they send in float32, and the backward rounds it to x's dtype once.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, input: Tensor) -> Tensor:
        ctx.dtype = input.dtype
        return input.new_zeros((), dtype=torch.float32).expand(input.shape)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        return grad.to(ctx.dtype)


def _per_channel(vector: Tensor, input: Tensor) -> Tensor:
    """A float64 ``(C,)`` vector shaped to broadcast against ``(N, C, *)`` input."""
    return vector.double().view(1, -1, *([1] * (input.dim() - 2)))


