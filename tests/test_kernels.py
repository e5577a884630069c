"""The per-replica passes (syncbn.kernels), both paths, against float64 math.

Small shards (up to SMALL elements) take a few-op float64 path; larger ones take the
fused passes built from BatchNorm's own kernels. Both must be exact up to the input
dtype's rounding, also for inputs offset by 1e4.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import syncbn
from syncbn.kernels import (
    SMALL,
    affine_in_deviation,
    batch_statistics,
    centered_statistics,
    gradient_sums,
    input_gradient,
    normalize,
    normalize_backward,
    normalize_centered,
)

SIZES = {"small": (4, 3, 8, 8), "large": (32, 3, 32, 32)}


def as_float64_view(vector: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    return vector.double().view(1, -1, *([1] * (input.dim() - 2)))


@pytest.fixture(params=["small", "large"])
def offset_input(request):
    torch.manual_seed(0)
    x = 1e4 + torch.randn(SIZES[request.param])
    assert (x.numel() <= SMALL) == (request.param == "small")
    return x


def test_statistics(offset_input):
    x = offset_input
    stats = batch_statistics(x)
    xd = x.double()
    torch.testing.assert_close(stats.mean, xd.mean((0, 2, 3)), rtol=1e-13, atol=1e-9)
    torch.testing.assert_close(stats.m2 / stats.count, xd.var((0, 2, 3), correction=0), rtol=1e-5, atol=1e-7)


def test_normalize_and_its_backward(offset_input):
    x = offset_input
    xd = x.double()
    mean, var = xd.mean((0, 2, 3)), xd.var((0, 2, 3), correction=0)
    invstd, weight, bias = (var + 1e-5).rsqrt(), torch.rand(3) + 0.5, torch.randn(3)
    xhat = (xd - as_float64_view(mean, x)) * as_float64_view(invstd, x)
    expected = xhat * as_float64_view(weight, x) + as_float64_view(bias, x)
    out = normalize(x, mean, invstd, weight, bias)
    assert out.dtype == x.dtype
    # float32 output: one rounding of x itself (|x| ~ 1e4) bounds what any method can do
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-3)
    dy = torch.randn_like(x)
    grad_input, sum_dy, sum_dy_xhat = normalize_backward(dy, x, mean, invstd, weight)
    torch.testing.assert_close(
        grad_input.double(), dy.double() * as_float64_view(invstd * weight, x), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(sum_dy, dy.double().sum((0, 2, 3)), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(sum_dy_xhat, (dy.double() * xhat).sum((0, 2, 3)), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("layout", ["contiguous", "float64", "channels_last", "half"])
def test_normalize_centered_writes_over_the_deviations_and_is_exact_for_offset_input(offset_input, layout):
    x = offset_input
    if layout == "float64":
        x = x.double()
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "half":
        x = (x - 1e4).half()  # float16 cannot hold 1e4 + noise
    stats, kept = centered_statistics(x)
    torch.testing.assert_close(stats.mean, batch_statistics(x).mean, rtol=0, atol=0)
    invstd, weight, bias = (stats.m2 / stats.count + 1e-5).rsqrt(), torch.rand(3) + 0.5, torch.randn(3)
    xd = x.double()
    expected = (xd - as_float64_view(stats.mean, x)) * as_float64_view(invstd * weight, x) + as_float64_view(bias, x)
    reused = kept is not None and kept.deviations.dtype == x.dtype
    # Only NCHW-contiguous large float32 input keeps its deviations to write over.
    assert reused == (layout in ("contiguous", "float64") and x.numel() > SMALL)
    out = normalize_centered(x, kept, stats.mean, invstd, weight, bias)
    assert out.dtype == x.dtype and out.shape == x.shape
    layout_kept = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout_kept)
    if reused:
        assert out.data_ptr() == kept.deviations.data_ptr()
        # No cancellation: within a few roundings of the output (|y| < 10), where normalize
        # on x rounds the float32 mean near 1e4 (up to 5e-4 off) first.
        tolerance = 1e-12 if x.dtype == torch.float64 else 4e-6
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=tolerance)
        if x.dtype == torch.float32:
            assert (normalize(x, stats.mean, invstd, weight, bias).double() - expected).abs().max() > 1e-5
    else:
        torch.testing.assert_close(out, normalize(x, stats.mean, invstd, weight, bias), rtol=0, atol=0)


@pytest.mark.parametrize("affine", [True, False])
def test_gradient_sums_and_input_gradient_as_accurate_as_torch(offset_input, affine):
    # The processes way's backward against float64 math, beside torch's own BatchNorm
    # backward (float32 in, same statistics) against the same truth.
    x = offset_input
    xd = x.double()
    mean, var = xd.mean((0, 2, 3)), xd.var((0, 2, 3), correction=0)
    invstd = (var + 1e-5).rsqrt()
    weight = torch.rand(3) + 0.5 if affine else None
    # correlated with x, so that mean(dy * xhat) is far from zero
    dy = torch.randn_like(x) + 0.3 * (xd - as_float64_view(mean, x)).float()
    xhat = (xd - as_float64_view(mean, x)) * as_float64_view(invstd, x)
    sum_dy, sum_dy_xhat = gradient_sums(dy, x, mean, invstd)
    torch.testing.assert_close(sum_dy, dy.double().sum((0, 2, 3)), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(sum_dy_xhat, (dy.double() * xhat).sum((0, 2, 3)), rtol=1e-6, atol=1e-3)
    count = x.numel() // 3
    mean_dy, mean_dy_xhat = dy.double().mean((0, 2, 3)), (dy.double() * xhat).mean((0, 2, 3))
    w = weight.double() if affine else torch.ones(3, dtype=torch.float64)
    truth = (dy.double() - as_float64_view(mean_dy, x) - xhat * as_float64_view(mean_dy_xhat, x)) * as_float64_view(
        w * invstd, x
    )
    got = input_gradient(dy, x, mean, invstd, weight, sum_dy / count, sum_dy_xhat / count)
    assert got.dtype == x.dtype and got.shape == x.shape
    torch_grad = torch.ops.aten.native_batch_norm_backward(
        dy, x, weight, None, None, mean.float(), invstd.float(), True, 1e-5, [True, False, False]
    )[0]
    torch_error = (torch_grad.double() - truth).abs().max()
    assert (got.double() - truth).abs().max() <= 2 * torch_error + 1e-6


def test_affine_in_deviation(offset_input):
    x = offset_input
    mean = x.double().mean((0, 2, 3))
    slope, offset = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    got = affine_in_deviation(x, mean, slope, offset)
    expected = (x.double() - as_float64_view(mean, x)) * as_float64_view(slope, x) + as_float64_view(offset, x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", ["small", "large"])
def test_offset_training_step_as_accurate_as_torch_on_both_paths(size):
    torch.manual_seed(0)
    x = 1e4 + torch.randn(SIZES[size])
    cotangent = torch.randn_like(x)
    torch_bn = nn.BatchNorm2d(3)
    exact_bn, model = (
        copy.deepcopy(torch_bn).double(),
        syncbn.DataParallel(syncbn.convert_model(copy.deepcopy(torch_bn)), replicas=2),
    )

    def step(module, inputs):
        leaf = inputs.clone().requires_grad_()
        out = module(leaf)
        out.backward(cotangent.to(out.dtype))
        return out.detach().double(), leaf.grad.double()

    exact_out, exact_grad = step(exact_bn, x.double())
    torch_out, torch_grad = step(torch_bn, x)
    sync_out, sync_grad = step(model, x)
    assert (sync_out - exact_out).abs().max() <= 2 * (torch_out - exact_out).abs().max()
    assert (sync_grad - exact_grad).abs().max() <= 2 * (torch_grad - exact_grad).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", ["small", "large"])
def test_half_precision_input_on_both_paths(dtype, size):
    torch.manual_seed(0)
    x = torch.randn(SIZES[size]).to(dtype)
    cotangent = torch.randn(SIZES[size])
    reference_bn = nn.BatchNorm2d(3)
    model = syncbn.DataParallel(syncbn.convert_model(copy.deepcopy(reference_bn)), replicas=2)
    half, full = x.clone().requires_grad_(), x.float().clone().requires_grad_()
    out, expected = model(half), reference_bn(full)
    out.backward(cotangent.to(dtype))
    expected.backward(cotangent)
    assert out.dtype == half.grad.dtype == dtype
    tolerance = {"rtol": 2e-2, "atol": 5e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3, "atol": 5e-3}
    torch.testing.assert_close(out.float(), expected.detach(), **tolerance)
    torch.testing.assert_close(half.grad.float(), full.grad, **tolerance)
    torch.testing.assert_close(model.module.running_var, reference_bn.running_var, rtol=1e-5, atol=1e-6)
