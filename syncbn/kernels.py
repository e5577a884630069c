"""SyncBN's per-replica passes over the batch, built from torch's fastest CPU kernels.

Why not plain tensor expressions: on an NCHW tensor, broadcasting a per-channel vector
(``x - mean.view(1, C, 1, 1)``) runs about 5x slower than BatchNorm's own inference
kernel, which applies ``x * alpha[c] + beta[c]`` in one vectorized pass, and torch's
training-mode forward spends most of its time on a slow variance. So each pass here is
one of three kernels (measured on a 2-core CPU, float32, 32x64x56x56: a copy of the
tensor takes 1.4 ms):

- ``x.sum(dims)``: per-channel sum, 0.5 ms;
- ``F.batch_norm(..., training=False)``: the affine pass ``x * alpha + beta``, 1.1 ms;
  with ``alpha = 1`` and ``beta = -mean`` it is exactly ``x - mean`` (no cancellation);
- ``native_batch_norm_backward(..., train=False)``: ``dy * invstd * w`` together with
  the per-channel sums of ``dy`` and ``dy * xhat``, 3.3 ms.

Passes over memory: statistics read x three times and write one temporary
(sum; x - mean; sum and sum of squares of that); the output is one pass; the backward
is one fused pass plus one affine pass for the statistics' share of the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from syncbn.stats import BatchStatistics, compute_dtype, reduced_dims

# Up to this many elements a replica's statistics take the few-op float64 path: the
# passes cost less than the ~5 µs each extra op costs.
SMALL = 1 << 15


def centered(input: Tensor, mean: Tensor) -> Tensor:
    """``input - mean`` per channel, exactly rounded, in the compute dtype.

    BatchNorm's inference kernel with ``alpha = 1`` (variance 1, eps 0, no weight) and
    ``beta = -mean`` computes ``x * 1 + (-mean)``: one rounding, like a subtraction.
    """
    values = input if input.dtype in (torch.float32, torch.float64) else input.to(compute_dtype(input.dtype))
    mean = mean.to(values.dtype)
    return F.batch_norm(values, mean, torch.ones_like(mean), None, None, False, 0.0, 0.0)


def batch_statistics(input: Tensor) -> BatchStatistics:
    """Count, mean and M2 per channel (float64 results, float32 passes), without autograd.

    Two passes (mean, then squared deviations) keep M2 accurate for offset inputs. The
    mean is compensated: a float32 mean near 1e4 is off by up to 5e-4 from rounding
    alone, and merging replicas multiplies that into M2 through ``(mean_i - mean)^2``.
    So ``center`` is the float32 mean, and the exact mean of ``x - center`` (exact while
    |x - mean| << |mean|) corrects it in float64. An empty input gives zeros, so that it
    joins a merge with weight ``count=0``.

    Example:
        >>> stats = batch_statistics(torch.tensor([[1.0], [3.0]]))
        >>> stats.count, stats.mean.tolist(), stats.m2.tolist()
        (2, [2.0], [2.0])
    """
    channels = input.size(1)
    count = input.numel() // channels if channels else 0
    if count == 0:
        zeros = torch.zeros(channels, dtype=torch.float64, device=input.device)
        return BatchStatistics(0, zeros, zeros)
    dims = reduced_dims(input)
    if input.numel() <= SMALL:
        # Per-op overhead dominates here: one float64 var_mean is exact enough and fast.
        with torch.no_grad():
            var, mean = torch.var_mean(input.double(), dims, correction=0)
        return BatchStatistics(count, mean, var * count)
    with torch.no_grad():
        center = input.sum(dims, dtype=compute_dtype(input.dtype)) / count
        deviations = centered(input, center)
        correction = deviations.sum(dims).double() / count
        # Squared in place: no second batch-sized temporary.
        m2 = deviations.square_().sum(dims).double() - count * correction.square()
    return BatchStatistics(count, center.double() + correction, m2)


def normalize(input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` in one pass; output in ``input``'s dtype and layout.

    Done by BatchNorm's inference kernel as ``(x - mean32) * scale + shift``, where
    ``mean32`` is the float64 mean rounded to the compute dtype and ``shift`` carries the
    rounding residue ``(mean - mean32) * scale`` exactly.
    """
    if input.numel() <= SMALL:  # few ops beat fused passes here; float64 is exact enough
        scale = invstd * weight.double() if weight is not None else invstd
        output = (input.double() - _per_channel(mean, input)) * _per_channel(scale, input)
        if bias is not None:
            output = output + _per_channel(bias.double(), input)
        return output.to(input.dtype)
    dtype = compute_dtype(input.dtype)
    mean = mean.double()
    rounded = mean.to(dtype)
    scale = invstd.double() * (weight.double() if weight is not None else 1.0)
    shift = (bias.double() if bias is not None else 0.0) - (mean - rounded.double()) * scale
    ones = torch.ones_like(rounded)
    return F.batch_norm(input, rounded, ones, scale.to(dtype), shift.to(dtype), False, 0.0, 0.0)


def normalize_backward(
    grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """For ``y = (x - mean) * invstd * w + b``: ``dy * invstd * w``, ``sum(dy)``, ``sum(dy * xhat)``.

    One fused pass (BatchNorm's backward kernel in inference mode). The per-channel sums
    are returned in float64.
    """
    dtype = compute_dtype(input.dtype)
    if input.numel() == 0:  # torch's kernel divides by the element count
        zeros = torch.zeros(input.size(1), dtype=torch.float64, device=input.device)
        return grad_output.to(input.dtype, copy=True), zeros, zeros.clone()
    if input.numel() <= SMALL:
        dims = reduced_dims(input)
        dy = grad_output.double()
        xhat = (input.double() - _per_channel(mean, input)) * _per_channel(invstd, input)
        scale = invstd * weight.double() if weight is not None else invstd
        grad_input = (dy * _per_channel(scale, input)).to(input.dtype)
        return grad_input, dy.sum(dims), (dy * xhat).sum(dims)
    w = _as(weight, dtype) if weight is not None else None
    return _kernel_backward(grad_output, input, mean, invstd, w, with_input_grad=True)


def gradient_sums(grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """``sum(dy)`` and ``sum(dy * xhat)`` per channel, float64: one fused pass, nothing written.

    Example:
        >>> x, dy = torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [2.0]])
        >>> [t.tolist() for t in gradient_sums(dy, x, torch.tensor([2.0]), torch.tensor([0.5]))]
        [[3.0], [0.5]]
    """
    if input.numel() <= SMALL:
        _, sum_dy, sum_dy_xhat = normalize_backward(grad_output, input, mean, invstd, None)
        return sum_dy, sum_dy_xhat
    _, sum_dy, sum_dy_xhat = _kernel_backward(grad_output, input, mean, invstd, None, with_input_grad=False)
    return sum_dy, sum_dy_xhat


def input_gradient(
    grad_output: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mean_dy: Tensor,
    mean_dy_xhat: Tensor,
) -> Tensor:
    """BatchNorm's ``dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))`` (global means).

    Three passes and one batch-sized tensor, which becomes ``dx``: ``x - mean32``
    (centered, so nothing cancels), then an affine map of it in place, then
    ``+ w * invstd * dy`` in place. With ``dev = x - mean32``:
    ``dx = s * dy + s * r * dev + s * q``, ``s = w * invstd``, ``r = -invstd * mean(dy * xhat)``,
    ``q = -mean(dy) + r * (mean32 - mean)``.

    Example:
        >>> x, dy = torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [2.0]])
        >>> mean, invstd = torch.tensor([2.0]), torch.tensor([1.0])
        >>> input_gradient(dy, x, mean, invstd, None, torch.tensor([1.5]), torch.tensor([0.5])).tolist()
        [[0.0], [0.0]]
    """
    invstd = invstd.double()
    scale = invstd * weight.double() if weight is not None else invstd
    slope = -invstd * mean_dy_xhat.double()
    if input.numel() <= SMALL:  # few ops beat fused passes here; float64 is exact enough
        deviation = input.double() - _per_channel(mean, input)
        correction = deviation * _per_channel(slope, input) - _per_channel(mean_dy, input)
        return ((grad_output.double() + correction) * _per_channel(scale, input)).to(input.dtype)
    dtype = compute_dtype(input.dtype)
    mean = mean.double()
    rounded = mean.to(dtype)
    offset = scale * (slope * (rounded.double() - mean) - mean_dy.double())
    dx = centered(input, rounded)
    torch.addcmul(_per_channel(offset, input, dtype), dx, _per_channel(scale * slope, input, dtype), out=dx)
    dx.addcmul_(grad_output, _per_channel(scale, input, dtype))
    return dx.to(input.dtype)


def _kernel_backward(
    grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, *, with_input_grad: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    # The kernel works with mean32 (the mean rounded to the compute dtype) and invstd32;
    # sum(dy * xhat) is corrected for both in float64: the residue times sum(dy).
    dtype = compute_dtype(input.dtype)
    mean, invstd = mean.double(), invstd.double()
    rounded_mean, var = mean.to(dtype), invstd.pow(-2).to(dtype)
    w = weight if weight is not None else torch.ones_like(var)
    grad_input, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad_output, input, w, rounded_mean, var, None, None, False, 0.0, [with_input_grad, True, True]
    )
    kernel_invstd = var.double().rsqrt()
    sum_dy_deviation = sum_dy_xhat.double() / kernel_invstd - (mean - rounded_mean.double()) * sum_dy.double()
    return grad_input, sum_dy.double(), sum_dy_deviation * invstd


def affine_in_deviation(input: Tensor, mean: Tensor, slope: Tensor, offset: Tensor) -> Tensor:
    """``(x - mean) * slope + offset`` per channel, in the compute dtype: two passes.

    Gradients of the statistics are affine in x. One inference-kernel pass would compute
    ``x * slope + (offset - mean * slope)``, which cancels when |mean| >> std; centering
    first keeps every term small.
    """
    if input.numel() <= SMALL:
        deviation = input.double() - _per_channel(mean, input)
        return deviation * _per_channel(slope, input) + _per_channel(offset, input)
    dtype = compute_dtype(input.dtype)
    mean = mean.double()
    rounded = mean.to(dtype)
    # (x - mean) * slope + offset == (x - mean32) * slope + (offset - (mean - mean32) * slope)
    offset = offset.double() - (mean - rounded.double()) * slope.double()
    return _affine(centered(input, rounded), slope.to(dtype), offset.to(dtype))


def _affine(values: Tensor, slope: Tensor, offset: Tensor) -> Tensor:
    zeros = torch.zeros_like(slope)
    return F.batch_norm(values, zeros, torch.ones_like(slope), slope, offset, False, 0.0, 0.0)


def _per_channel(vector: Tensor, input: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """A ``(C,)`` vector in ``dtype`` (float64 by default) shaped to broadcast against ``(N, C, *)`` input."""
    return vector.to(dtype).view(1, -1, *([1] * (input.dim() - 2)))


def _as(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if tensor is None else tensor.to(dtype)
