"""The compiled CPU kernels (syncbn.kernels.native) against float64 references, and the
one-replica training path that uses them, against nn.BatchNorm."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import syncbn
from syncbn.kernels import for_input, native, torch_ops

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)

# (shape, memory format): every layout the kernels handle, large and small planes.
LAYOUTS = {
    "nchw": ((6, 5, 12, 11), torch.contiguous_format),
    "nchw-small-plane": ((6, 5, 3, 2), torch.contiguous_format),
    "ncl": ((6, 5, 70), torch.contiguous_format),
    "ncdhw": ((3, 5, 4, 5, 6), torch.contiguous_format),
    "channels_last": ((6, 5, 12, 11), torch.channels_last),
    "channels_last_3d": ((3, 5, 4, 5, 6), torch.channels_last_3d),
    "nc": ((300, 5), torch.contiguous_format),
}
layout_params = pytest.mark.parametrize("shape, memory_format", LAYOUTS.values(), ids=LAYOUTS.keys())
dtype_params = pytest.mark.parametrize("dtype", [torch.float32, torch.float64])


@pytest.fixture(autouse=True)
def _seed_and_enable(monkeypatch) -> None:
    torch.manual_seed(0)
    monkeypatch.setenv("SYNCBN_NATIVE", "1")  # opt-in; the default is torch's path


def per_channel(vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return vector.double().view(1, -1, *([1] * (like.dim() - 2)))


def sample(shape, memory_format, dtype, offset=0.0):
    x = (torch.randn(shape, dtype=torch.float64) * 3 + offset).to(dtype)
    return x.contiguous(memory_format=memory_format)


def tolerance(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-6


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


@layout_params
@dtype_params
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_statistics_match_float64(shape, memory_format, dtype, offset):
    x = sample(shape, memory_format, dtype, offset)
    assert native.handles(x)
    stats = native.batch_statistics(x)
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x.double(), dims, correction=0)
    assert stats.count == x.numel() // x.size(1)
    # float32 planes are summed in float32 blocks: the mean is within float32 rounding.
    mean_tolerance = 1e-12 if dtype == torch.float64 else 1e-7
    assert (stats.mean - mean).abs().max().item() <= mean_tolerance * (abs(offset) + 3)
    # M2 is at least as accurate as torch's own float32 reduction (about 2e-7 relative).
    # (in float64 the reference itself carries ~1e-13 at offset 1e4)
    assert relative_error(stats.m2, var * stats.count) <= (1e-11 if dtype == torch.float64 else 5e-7)


@layout_params
@dtype_params
def test_elementwise_passes_match_float64_and_keep_layout(shape, memory_format, dtype):
    x = sample(shape, memory_format, dtype, 1e4)
    dy = torch.randn_like(x)
    channels = x.size(1)
    mean = x.double().mean([0, *range(2, x.dim())])
    invstd = torch.rand(channels, dtype=torch.float64) + 0.5
    weight, bias = torch.randn(channels, dtype=dtype), torch.randn(channels, dtype=dtype)
    xhat = (x.double() - per_channel(mean, x)) * per_channel(invstd, x)

    y = native.normalize(x, mean, invstd, weight, bias)
    assert y.dtype == dtype and y.stride() == x.stride()
    want = xhat * per_channel(weight, x) + per_channel(bias, x)
    assert relative_error(y, want) <= tolerance(dtype)

    grad, sum_dy, sum_dy_xhat = native.normalize_backward(dy, x, mean, invstd, weight)
    dims = [0, *range(2, x.dim())]
    assert grad.stride() == x.stride()
    assert relative_error(grad, dy.double() * per_channel(invstd * weight.double(), x)) <= tolerance(dtype)
    assert relative_error(sum_dy, dy.double().sum(dims)) <= 10 * tolerance(dtype)
    assert relative_error(sum_dy_xhat, (dy.double() * xhat).sum(dims)) <= 10 * tolerance(dtype)

    mean_dy, mean_dy_xhat = torch.randn(channels, dtype=torch.float64), torch.randn(channels, dtype=torch.float64)
    dx = native.input_gradient(dy, x, mean, invstd, weight, mean_dy, mean_dy_xhat)
    scale = per_channel(invstd * weight.double(), x)
    want = scale * (dy.double() - per_channel(mean_dy, x) - xhat * per_channel(mean_dy_xhat, x))
    assert dx.stride() == x.stride()
    assert relative_error(dx, want) <= tolerance(dtype)

    slope, offset = torch.randn(channels, dtype=torch.float64), torch.randn(channels, dtype=torch.float64)
    affine = native.affine_in_deviation(x, mean, slope, offset)
    want = (x.double() - per_channel(mean, x)) * per_channel(slope, x) + per_channel(offset, x)
    assert relative_error(affine, want) <= tolerance(dtype)


@layout_params
def test_native_and_torch_ops_agree(shape, memory_format):
    """The two implementations are interchangeable: same results up to rounding."""
    x = sample(shape, memory_format, torch.float32)
    dy = torch.randn_like(x)
    stats = native.batch_statistics(x)
    invstd = torch.rsqrt(stats.m2 / stats.count + 1e-5)
    for name in ("normalize_backward",):
        got = getattr(native, name)(dy, x, stats.mean, invstd, None)
        want = getattr(torch_ops, name)(dy, x, stats.mean, invstd, None)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        native.gradient_sums(dy, x, stats.mean, invstd), torch_ops.gradient_sums(dy, x, stats.mean, invstd),
        rtol=1e-5, atol=1e-4,
    )  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_thread_counts_agree(threads, memory_format, monkeypatch):
    x = sample((40, 6, 64, 64), memory_format, torch.float32, 1e4)  # large enough to split
    reference = native.batch_statistics(x)
    monkeypatch.setattr(native, "_threads", lambda _: threads)
    stats = native.batch_statistics(x)
    torch.testing.assert_close(stats.mean, reference.mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(stats.m2, reference.m2, rtol=1e-9, atol=0)
    if memory_format == torch.contiguous_format:  # one thread sums each channel, whatever the count
        assert torch.equal(stats.m2, reference.m2)


def test_empty_input_and_odd_gradient_strides():
    empty = torch.randn(0, 3, 8, 8)
    stats = native.batch_statistics(empty)
    assert stats.count == 0 and torch.equal(stats.m2, torch.zeros(3, dtype=torch.float64))
    assert native.normalize(empty, stats.mean, torch.ones(3), None, None).shape == empty.shape
    x = torch.randn(4, 3, 8, 8)
    mean, invstd = torch.zeros(3), torch.ones(3)
    expanded = torch.ones(1, 1, 1, 1).expand_as(x)  # what y.sum().backward() sends
    grad, sum_dy, _ = native.normalize_backward(expanded, x, mean, invstd, None)
    assert torch.equal(grad, torch.ones_like(x)) and torch.equal(sum_dy, torch.full((3,), 256.0, dtype=torch.float64))


def test_handles_and_selection():
    assert not native.handles(torch.randn(4, 3, 8, 8)[:, :, ::2])  # not dense
    assert not native.handles(torch.randn(4, 3, dtype=torch.float16))
    assert for_input(torch.randn(4, 3, 8, 8)) is native
    assert for_input(torch.randn(4, 3, 2, 2)) is torch_ops  # small planes: torch is faster
    assert for_input(torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)) is torch_ops


# --- the one-replica training path --------------------------------------------------------

CONFIGS = {
    "default": {},
    "affine=False": {"affine": False},
    "bias=False": {"bias": False},
    "track_running_stats=False": {"track_running_stats": False},
    "momentum=None": {"momentum": None},
}


def train_step(module, x, cotangent):
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(cotangent)
    grads = [p.grad.clone() for p in module.parameters()]
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_replica_training_matches_torch(config, dtype):
    reference = nn.BatchNorm2d(4, dtype=dtype, **config)
    module = syncbn.convert_model(nn.BatchNorm2d(4, dtype=dtype, **config))
    module.load_state_dict(reference.state_dict())
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for _ in range(3):  # running averages (and momentum=None's 1/n) evolve
        x = torch.randn(5, 4, 9, 10, dtype=dtype) * 2 + 1
        assert for_input(x) is native
        cotangent = torch.randn_like(x)
        got, want = train_step(module, x, cotangent), train_step(reference, x, cotangent)
        torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=rtol)
        torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=rtol)
        for a, b in zip(got[2], want[2], strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * 100)
        for key, value in reference.state_dict().items():
            assert module.state_dict()[key].dtype == value.dtype
            torch.testing.assert_close(module.state_dict()[key], value, rtol=rtol, atol=rtol)


def test_one_replica_offset_input_is_at_least_as_accurate_as_torch():
    x64 = torch.randn(8, 4, 16, 16, dtype=torch.float64) + 1e4
    cotangent64 = torch.randn_like(x64)
    exact = train_step(nn.BatchNorm2d(4, dtype=torch.float64), x64, cotangent64)
    torch_bn, sync_bn = nn.BatchNorm2d(4), syncbn.convert_model(nn.BatchNorm2d(4))
    ours = train_step(sync_bn, x64.float(), cotangent64.float())
    theirs = train_step(torch_bn, x64.float(), cotangent64.float())
    for index in (0, 1):  # output, input gradient
        assert relative_error(ours[index], exact[index]) <= relative_error(theirs[index], exact[index]) * 1.5 + 1e-7
    var_exact = x64.var([0, 2, 3]) * 0.1 + 0.9
    ours_var = (sync_bn.running_var.double() - var_exact).abs().max()
    assert ours_var <= (torch_bn.running_var.double() - var_exact).abs().max() + 1e-6


def test_eval_and_unsupported_inputs_stay_bit_identical():
    reference = nn.BatchNorm2d(4)
    module = syncbn.convert_model(nn.BatchNorm2d(4))
    x = torch.randn(5, 4, 9, 10)
    module.eval(), reference.eval()
    assert torch.equal(module(x), reference(x))
    module.train(), reference.train()
    x = x.contiguous(memory_format=torch.channels_last)  # torch's kernel: faster there
    assert torch.equal(module(x), reference(x))


def test_one_replica_double_backward_matches_torch():
    x = torch.randn(5, 4, 9, 10, dtype=torch.float64, requires_grad=True)
    reference = nn.BatchNorm2d(4, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
    synchronized = syncbn.convert_model(nn.BatchNorm2d(4, dtype=torch.float64))
    synchronized.load_state_dict(reference.state_dict())
    grads = []
    for module in (reference, synchronized):
        out = module(x)
        (grad_x,) = torch.autograd.grad((out**3).sum(), x, create_graph=True)  # a gradient penalty
        grads.append(torch.autograd.grad(grad_x.square().sum(), [x, module.weight]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def run_python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


CHECK = """
import torch, syncbn
from syncbn.kernels import native
bn, sbn = torch.nn.BatchNorm2d(4), syncbn.convert_model(torch.nn.BatchNorm2d(4))
x = torch.randn(5, 4, 9, 10)
print(native.supports(x), torch.equal(bn(x), sbn(x)), native.unavailable_reason())
"""


@pytest.mark.parametrize("setting", [None, "0", "off"])
def test_off_by_default_and_bit_identical_to_torch(setting):
    env = {key: value for key, value in os.environ.items() if key != "SYNCBN_NATIVE"}
    if setting is not None:
        env["SYNCBN_NATIVE"] = setting
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False True None"


def test_turned_on_uses_them():
    assert run_python(CHECK, SYNCBN_NATIVE="1").startswith("True ")


def test_without_a_compiler_falls_back_to_torch(tmp_path):
    output = run_python(CHECK, SYNCBN_NATIVE="1", CC="/bin/false", SYNCBN_CACHE_DIR=str(tmp_path))
    assert output.startswith("False True /bin/false could not build cpu_kernels.c")
    assert list(tmp_path.iterdir()) == []  # no partial library left behind


def test_build_is_cached(tmp_path):
    code = "from syncbn.kernels import native; print(native.available())"
    assert run_python(code, SYNCBN_CACHE_DIR=str(tmp_path)) == "True"
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].name.startswith("cpu_kernels-")
    stamp = built[0].stat().st_mtime_ns
    assert run_python(code, SYNCBN_CACHE_DIR=str(tmp_path)) == "True"
    assert list(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_asking_for_them_without_a_compiler_warns_once(tmp_path):
    env = {**os.environ, "SYNCBN_NATIVE": "1", "CC": "/bin/false", "SYNCBN_CACHE_DIR": str(tmp_path)}
    code = CHECK + "sbn(x); sbn(x)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("SYNCBN_NATIVE=1, but syncbn's compiled kernels are unavailable") == 1
