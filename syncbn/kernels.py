"""SyncBN's per-replica passes over the batch, built from torch's fastest CPU kernels.

Each pass is one vectorized torch op over the batch: a per-channel ``sum``, a
broadcast ``x - mean[c]`` (exactly rounded, so nothing cancels for offset inputs), an
in-place square or per-channel ``mul_``/``add_``/``addcmul_``, and BatchNorm's own
inference kernel for the output (``x * alpha[c] + beta[c]`` in one pass). Reductions
run in the compute dtype (float32, or float64 for float64 input) and their results are
carried on in float64, where rounding residues are corrected. Inputs of up to ``SMALL``
elements take a few float64 ops instead: there the per-op cost dominates. Why these
kernels and what each costs: docs/design.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from syncbn.stats import BatchStatistics, compute_dtype, reduced_dims

# Up to this many elements a replica's statistics take the few-op float64 path: the
# passes cost less than the ~5 µs each extra op costs.
SMALL = 1 << 15


def centered(input: Tensor, mean: Tensor) -> Tensor:
    """``input - mean`` per channel, exactly rounded, in the compute dtype: one pass, a new tensor.

    Half-precision input is promoted on the fly (a float32 ``mean`` broadcasts against it).

    Example:
        >>> centered(torch.tensor([[1.0, 5.0], [3.0, 7.0]]), torch.tensor([2.0, 6.0])).tolist()
        [[-1.0, -1.0], [1.0, 1.0]]
    """
    return input - _per_channel(mean, input, compute_dtype(input.dtype))


def batch_statistics(input: Tensor) -> BatchStatistics:
    """Count, mean and M2 per channel (float64 results, float32 passes), without autograd.

    Two passes (mean, then deviations from it) keep M2 accurate for offset inputs. The
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
    return centered_statistics(input)[0]


class Centered(NamedTuple):
    """``x - center`` per channel in the compute dtype, kept from the statistics' passes."""

    deviations: Tensor
    center: Tensor


def centered_statistics(input: Tensor) -> tuple[BatchStatistics, Centered | None]:
    """``batch_statistics``, and the deviations from the center it computed, when it kept them.

    They are kept for NCHW-contiguous input above ``SMALL`` elements (else None), so that
    ``normalize_centered`` can write the output over them: no second batch-sized tensor,
    and no ``x * a + b`` cancelling for offset inputs.

    Example:
        >>> stats, centered = centered_statistics(torch.tensor([[1.0], [3.0]]))
        >>> stats.mean.tolist(), centered is None  # small: the float64 path keeps nothing
        ([2.0], True)
    """
    channels = input.size(1)
    count = input.numel() // channels if channels else 0
    if count == 0:
        zeros = torch.zeros(channels, dtype=torch.float64, device=input.device)
        return BatchStatistics(0, zeros, zeros), None
    dims = reduced_dims(input)
    if input.numel() <= SMALL:
        # Per-op overhead dominates here: one float64 var_mean is exact enough and fast.
        with torch.no_grad():
            var, mean = torch.var_mean(input.double(), dims, correction=0)
        return BatchStatistics(count, mean, var * count), None
    kept = None
    with torch.no_grad():
        center = input.sum(dims, dtype=compute_dtype(input.dtype)).div_(count)
        deviations = centered(input, center)
        if deviations.dim() > 2 and deviations.is_contiguous():
            # sum(dev) and sum(dev * dev) in one pass: BatchNorm's backward kernel (inference
            # mode, mean 0, variance 1) with dev as input and gradient. It sums each (n, c)
            # plane vectorized, then the planes: accurate where planes are long, so only here.
            zeros, ones = torch.zeros_like(center), torch.ones_like(center)
            _, squares, sums = torch.ops.aten.native_batch_norm_backward(
                deviations, deviations, ones, zeros, ones, None, None, False, 0.0, [False, True, True]
            )
            kept = Centered(deviations, center)
        else:  # squared in place: no second batch-sized temporary
            sums, squares = deviations.sum(dims), deviations.square_().sum(dims)
        sums = torch.stack([center, sums, squares]).double()
    correction = sums[1] / count
    return BatchStatistics(count, sums[0] + correction, sums[2] - count * correction.square()), kept


def normalize_centered(
    input: Tensor,
    kept: Centered | None,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """``normalize``, written over ``kept.deviations`` (``centered_statistics``'s) when it can.

    ``y = dev * s + (b + (center - mean) * s)`` with ``s = w * invstd``: BatchNorm's
    inference kernel (mean 0, variance 1) over the centered values, in place. Nothing
    cancels, so offset inputs lose no more than a rounding of ``y``; ``normalize`` on
    ``input`` rounds the mean to the compute dtype first. Otherwise (no deviations kept,
    or an output dtype other than theirs) it is ``normalize``.

    Example:
        >>> x = torch.arange(64.0).view(2, 2, 4, 4).repeat(1, 1, 128, 8)
        >>> stats, kept = centered_statistics(x)
        >>> invstd = (stats.m2 / stats.count + 1e-5).rsqrt()
        >>> y = normalize_centered(x, kept, stats.mean, invstd, None, None)
        >>> y.data_ptr() == kept.deviations.data_ptr(), torch.allclose(y, normalize(x, stats.mean, invstd, None, None))
        (True, True)
    """
    if kept is None or kept.deviations.dtype != input.dtype:
        return normalize(input, mean, invstd, weight, bias)
    deviations, dtype = kept.deviations, kept.deviations.dtype
    scale, shift = _scale_and_shift(kept.center, mean, invstd, weight, bias)
    zeros, ones, unused = torch.zeros_like(kept.center), torch.ones_like(kept.center), deviations.new_empty(0)
    output, _, _ = torch.ops.aten.native_batch_norm.out(
        deviations, scale.to(dtype), shift.to(dtype), zeros, ones, False, 0.0, 0.0,
        out=deviations, save_mean=unused, save_invstd=unused,
    )
    return output


def normalize(input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` in one pass; output in ``input``'s dtype and layout.

    Done by BatchNorm's inference kernel with ``mean32`` (the float64 mean rounded to
    the compute dtype) as its mean, variance 1, and a bias that carries the rounding
    residue ``(mean - mean32) * scale``.
    """
    if input.numel() <= SMALL:  # few ops beat fused passes here; float64 is exact enough
        scale = invstd * weight.double() if weight is not None else invstd
        output = (input.double() - _per_channel(mean, input)) * _per_channel(scale, input)
        if bias is not None:
            output = output + _per_channel(bias.double(), input)
        return output.to(input.dtype)
    dtype = compute_dtype(input.dtype)
    rounded = mean.double().to(dtype)
    scale, shift = _scale_and_shift(rounded, mean, invstd, weight, bias)
    ones = torch.ones_like(rounded)
    return torch.batch_norm(input, scale.to(dtype), shift.to(dtype), rounded, ones, False, 0.0, 0.0, False)


def _scale_and_shift(
    center: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Float64 ``s = w * invstd`` and ``shift = b + (center - mean) * s``, for ``(x - center) * s + shift``."""
    scale = invstd.double() * weight if weight is not None else invstd.double()  # float64: promoted
    shift = (center.double() - mean.double()) * scale
    if bias is not None:
        shift += bias
    return scale, shift


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

    BatchNorm's backward kernel (inference mode, variance 1) sums ``dy`` and
    ``dy * (x - mean32)``; ``sum(dy * xhat)`` is corrected for the rounding of the mean
    in float64.

    Example:
        >>> x, dy = torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [2.0]])
        >>> [t.tolist() for t in gradient_sums(dy, x, torch.tensor([2.0]), torch.tensor([0.5]))]
        [[3.0], [0.5]]
    """
    if input.numel() <= SMALL:
        _, sum_dy, sum_dy_xhat = normalize_backward(grad_output, input, mean, invstd, None)
        return sum_dy, sum_dy_xhat
    mean = mean.double()
    rounded = mean.to(compute_dtype(input.dtype))
    ones = torch.ones_like(rounded)
    _, sum_dy_deviation, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad_output, input, ones, rounded, ones, None, None, False, 0.0, [False, True, True]
    )
    sum_dy = sum_dy.double()
    # sum(dy * (x - mean)) = sum(dy * (x - mean32)) - (mean - mean32) * sum(dy)
    return sum_dy, (sum_dy_deviation.double() - (mean - rounded) * sum_dy) * invstd


def prepare_input_gradient(input: Tensor, mean: Tensor) -> Tensor | None:
    """The pass of ``input_gradient`` that needs no global mean, to run while a collective does.

    Returns ``x - mean32`` (``mean`` rounded to the compute dtype), or None for a small
    input (``finish_input_gradient`` then does it all in float64).

    Example:
        >>> prepare_input_gradient(torch.ones(2, 1), torch.ones(1)) is None  # small
        True
    """
    if input.numel() <= SMALL:
        return None
    return centered(input, mean.to(compute_dtype(input.dtype)))


def finish_input_gradient(
    deviations: Tensor | None,
    grad_output: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mean_dy: Tensor,
    mean_dy_xhat: Tensor,
) -> Tensor:
    """BatchNorm's ``dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))`` (global means).

    With ``dev = x - mean32`` (``deviations``; centered, so nothing cancels):
    ``dx = s * r * dev + s * q + s * dy``, where ``s = w * invstd``,
    ``r = -invstd * mean(dy * xhat)`` and ``q = -mean(dy) + r * (mean32 - mean)``, built in
    ``deviations`` in place (which becomes the result): a per-channel multiply, add, and
    multiply-add of ``dy``.

    Example:
        >>> x, dy = torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [2.0]])
        >>> mean, invstd = torch.tensor([2.0]), torch.tensor([1.0])
        >>> dev = prepare_input_gradient(x, mean)
        >>> finish_input_gradient(dev, dy, x, mean, invstd, None, torch.tensor([1.5]), torch.tensor([0.5])).tolist()
        [[0.0], [0.0]]
    """
    invstd = invstd.double()
    scale = invstd * weight.double() if weight is not None else invstd
    slope = -invstd * mean_dy_xhat.double()
    if deviations is None:  # the small path: float64 is exact enough
        deviation = input.double() - _per_channel(mean, input)
        correction = deviation * _per_channel(slope, input) - _per_channel(mean_dy, input)
        return ((grad_output.double() + correction) * _per_channel(scale, input)).to(input.dtype)
    dtype = deviations.dtype
    mean = mean.double()
    offset = scale * (slope * (mean.to(dtype).double() - mean) - mean_dy.double())
    dx = deviations.mul_(_per_channel(scale * slope, input, dtype)).add_(_per_channel(offset, input, dtype))
    return dx.addcmul_(grad_output, _per_channel(scale, input, dtype)).to(input.dtype)


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

    ``prepare_input_gradient`` then ``finish_input_gradient``: four passes over the
    batch and one batch-sized tensor (``x - mean32``, then in place a multiply, an add and
    a multiply-add of ``dy``).

    Example:
        >>> x, dy = torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [2.0]])
        >>> mean, invstd = torch.tensor([2.0]), torch.tensor([1.0])
        >>> input_gradient(dy, x, mean, invstd, None, torch.tensor([1.5]), torch.tensor([0.5])).tolist()
        [[0.0], [0.0]]
    """
    deviations = prepare_input_gradient(input, mean)
    return finish_input_gradient(deviations, grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xhat)


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
    """``values * slope + offset`` per channel in one pass: BatchNorm's inference kernel (mean 0, variance 1)."""
    zeros = torch.zeros_like(slope)
    return torch.batch_norm(values, slope, offset, zeros, torch.ones_like(slope), False, 0.0, 0.0, False)


def _per_channel(vector: Tensor, input: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """A ``(C,)`` vector in ``dtype`` (float64 by default) shaped to broadcast against ``(N, C, *)`` input."""
    return vector.to(dtype).view(1, -1, *([1] * (input.dim() - 2)))


def _as(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if tensor is None else tensor.to(dtype)
