"""R replicas with SyncBN compute what one device computes on the full batch.

Every test trains ``syncbn.DataParallel(convert_model(copy), replicas=R)`` side by side
with the original model (plain ``nn.BatchNormNd``) fed the full batch, the reference,
and compares outputs, input grads, parameter grads and every BN buffer.

Every test runs both ways replicas in threads meet (the ``way`` fixture): normalizing
the joined shards at once, which virtual CPU replicas use, and merging per-replica
statistics, which replicas on different devices use (forced here on the CPU).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncbn
import syncbn.functional
from syncbn.parallel.parallel_apply import current_replica

TOLERANCE = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}
# name: (torch BN class, per-sample input shape for C channels)
LAYOUTS = {
    "bn1d-2D": (nn.BatchNorm1d, lambda c: (c,)),
    "bn1d-3D": (nn.BatchNorm1d, lambda c: (c, 5)),
    "bn2d": (nn.BatchNorm2d, lambda c: (c, 4, 5)),
    "bn3d": (nn.BatchNorm3d, lambda c: (c, 3, 4, 4)),
}
layout_params = pytest.mark.parametrize("layout", LAYOUTS)
CROWDED = [(3, 4), (2, 8), (1, 2)]  # (batch, replicas) with batch < replicas
EXPECT_SINGLE_VALUE = "Expected more than 1 value per channel when training"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def way(in_process_way: str) -> str:
    return in_process_way


def randomize_(model: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so that no term hides."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for tensor in (module.weight, module.bias, module.running_mean):
                    if tensor is not None:
                        tensor.copy_(torch.randn_like(tensor))
                if module.running_var is not None:
                    module.running_var.copy_(torch.rand_like(module.running_var) + 0.5)
    return model


def make_bn(layout: str, channels: int = 4, dtype: torch.dtype = torch.float64, **bn_kwargs) -> nn.Module:
    bn_cls, _ = LAYOUTS[layout]
    return randomize_(bn_cls(channels, dtype=dtype, **bn_kwargs))


def input_shape(layout: str, batch: int, channels: int = 4) -> tuple[int, ...]:
    return (batch, *LAYOUTS[layout][1](channels))


def synchronized(reference: nn.Module, replicas: int) -> syncbn.DataParallel:
    """The model under test: a converted copy of ``reference`` on R virtual CPU replicas."""
    return syncbn.DataParallel(syncbn.convert_model(copy.deepcopy(reference)), replicas=replicas)


def sgd(model: nn.Module, **kwargs) -> torch.optim.Optimizer | None:
    params = list(model.parameters())
    return torch.optim.SGD(params, lr=0.1, **kwargs) if params else None


def train_side_by_side(
    reference, model, shape, run_step, assert_state_equal, *, steps=5, dtype=torch.float64, tolerance=None
):
    """``steps`` SGD steps on fresh random batches; compare everything after each step."""
    tolerance = tolerance or TOLERANCE[dtype]
    optimizers = [sgd(reference), sgd(model)]
    for _ in range(steps):
        x = torch.randn(shape, dtype=dtype)
        cotangent = torch.randn(shape, dtype=dtype)
        want, got = run_step(reference, x, cotangent), run_step(model, x, cotangent)
        torch.testing.assert_close(got.out, want.out, **tolerance)
        torch.testing.assert_close(got.x_grad, want.x_grad, **tolerance)
        torch.testing.assert_close(got.grads, want.grads, **tolerance)
        for optimizer in optimizers:
            if optimizer is not None:
                optimizer.step()
        assert_state_equal(model, reference, **tolerance)
    return got


# --- the core contract -----------------------------------------------------------------


@layout_params
@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_replicas_match_full_batch(layout, replicas, dtype, run_step, assert_state_equal):
    reference = make_bn(layout, dtype=dtype)
    model = synchronized(reference, replicas)
    train_side_by_side(reference, model, input_shape(layout, 8), run_step, assert_state_equal, dtype=dtype)
    assert model.module.num_batches_tracked.item() == 5


def test_unconverted_model_does_not_match(run_step):
    # The comparisons above can fail: plain BN under the same DataParallel uses shard statistics.
    reference = make_bn("bn2d")
    plain = syncbn.DataParallel(copy.deepcopy(reference), replicas=2)
    x = torch.randn(input_shape("bn2d", 8), dtype=torch.float64)
    want, got = run_step(reference, x, torch.ones_like(x)), run_step(plain, x, torch.ones_like(x))
    assert not torch.allclose(got.out, want.out, rtol=1e-3, atol=1e-3)


VARIANTS = {
    "affine=False": {"affine": False},
    "bias=False": {"bias": False},
    "momentum=None": {"momentum": None},
    "track_running_stats=False": {"track_running_stats": False},
}


@layout_params
@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_variants_match_full_batch(layout, replicas, variant, run_step, assert_state_equal):
    reference = make_bn(layout, **variant)
    model = synchronized(reference, replicas)
    train_side_by_side(reference, model, input_shape(layout, 8), run_step, assert_state_equal)


@layout_params
@pytest.mark.parametrize("replicas", [2, 4])
def test_eval_without_running_stats_uses_global_batch_statistics(layout, replicas, run_step, assert_state_equal):
    reference = make_bn(layout, track_running_stats=False).eval()
    model = synchronized(reference, replicas).eval()
    train_side_by_side(reference, model, input_shape(layout, 8), run_step, assert_state_equal, steps=2)


@layout_params
@pytest.mark.parametrize("replicas", [2, 4])
def test_eval_with_running_stats_matches(layout, replicas, run_step, assert_state_equal):
    reference = make_bn(layout).eval()
    model = synchronized(reference, replicas).eval()
    before = copy.deepcopy(reference.state_dict())
    train_side_by_side(reference, model, input_shape(layout, 8), run_step, assert_state_equal, steps=2)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(model.module.state_dict()[key], before[key])


@pytest.mark.parametrize("replicas", [2, 3])
def test_training_forward_without_grad(replicas, run_step, assert_state_equal):
    # e.g. re-estimating BN statistics: running stats must still be those of the full batch.
    reference = make_bn("bn2d")
    model = synchronized(reference, replicas)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(input_shape("bn2d", 7), dtype=torch.float64)
            want, got = run_step(reference, x, None), run_step(model, x, None)
            torch.testing.assert_close(got.out, want.out, **TOLERANCE[torch.float64])
            assert_state_equal(model, reference, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("replicas", [2, 4])
def test_frozen_affine_parameters(replicas, run_step, assert_state_equal):
    reference = make_bn("bn2d").requires_grad_(False)
    model = synchronized(reference, replicas)
    got = train_side_by_side(reference, model, input_shape("bn2d", 8), run_step, assert_state_equal, steps=2)
    assert got.grads == {}


# --- batch sizes ------------------------------------------------------------------------


@layout_params
@pytest.mark.parametrize("replicas", [3, 4, 8])
def test_uneven_shards(layout, replicas, run_step, assert_state_equal):
    reference = make_bn(layout)
    model = synchronized(reference, replicas)
    train_side_by_side(reference, model, input_shape(layout, 10), run_step, assert_state_equal, steps=2)


@pytest.mark.parametrize(
    "layout, batch, replicas",
    [
        ("bn1d-2D", 3, 4),
        ("bn1d-2D", 2, 8),
        *[(layout, batch, replicas) for layout in ("bn1d-3D", "bn2d", "bn3d") for batch, replicas in CROWDED],
    ],
)
def test_fewer_samples_than_replicas(layout, batch, replicas, run_step, assert_state_equal):
    # Some replicas get empty shards; the global count (batch * spatial) is still > 1.
    reference = make_bn(layout)
    model = synchronized(reference, replicas)
    train_side_by_side(reference, model, input_shape(layout, batch), run_step, assert_state_equal, steps=3)


@pytest.mark.parametrize(
    "layout, shape, replicas, bn_kwargs",
    [
        ("bn1d-2D", (1, 4), 2, {}),
        ("bn1d-2D", (1, 4), 4, {}),
        ("bn1d-3D", (1, 4, 1), 2, {}),
        ("bn2d", (1, 4, 1, 1), 1, {}),
        ("bn2d", (1, 4, 1, 1), 2, {}),
        ("bn2d", (1, 4, 1, 1), 8, {"momentum": None}),
        ("bn3d", (1, 4, 1, 1, 1), 3, {"track_running_stats": False}),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_single_value_per_channel_raises_value_error(layout, shape, replicas, bn_kwargs, training):
    if not training:  # batch statistics in eval mode need track_running_stats=False
        bn_kwargs = {**bn_kwargs, "track_running_stats": False}
    reference = make_bn(layout, **bn_kwargs).train(training)
    model = synchronized(reference, replicas).train(training)
    x = torch.randn(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=EXPECT_SINGLE_VALUE):
        reference(x)
    with pytest.raises(ValueError, match=EXPECT_SINGLE_VALUE):
        model(x)


@pytest.mark.parametrize("replicas", [2, 3])
def test_empty_batch_matches(replicas, run_step, assert_state_equal):
    reference = make_bn("bn2d")
    model = synchronized(reference, replicas)
    train_side_by_side(reference, model, input_shape("bn2d", 0), run_step, assert_state_equal, steps=1)


# --- dtypes and memory formats ------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, memory_format, batch, replicas",
    [
        ("bn2d", torch.channels_last, 8, 2),
        ("bn2d", torch.channels_last, 10, 3),
        ("bn2d", torch.channels_last, 8, 4),
        ("bn2d", torch.channels_last, 4, 4),
        ("bn3d", torch.channels_last_3d, 8, 3),
        ("bn2d", torch.channels_last, 3, 4),
    ],
    ids=["bn2d-B8-R2", "bn2d-B10-R3", "bn2d-B8-R4", "bn2d-B4-R4", "bn3d-B8-R3", "bn2d-B3-R4"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_channels_last(layout, memory_format, batch, replicas, dtype, run_step):
    reference = make_bn(layout, dtype=dtype)
    model = synchronized(reference, replicas)
    x = torch.randn(input_shape(layout, batch), dtype=dtype).to(memory_format=memory_format)
    cotangent = torch.randn_like(x)
    want, got = run_step(reference, x, cotangent), run_step(model, x, cotangent)
    torch.testing.assert_close(got.out, want.out, **TOLERANCE[dtype])
    torch.testing.assert_close(got.x_grad, want.x_grad, **TOLERANCE[dtype])
    torch.testing.assert_close(got.grads, want.grads, **TOLERANCE[dtype])
    assert want.out.is_contiguous(memory_format=memory_format)
    assert got.out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("layout", ["bn1d-3D", "bn2d"])
@pytest.mark.parametrize("replicas", [1, 2, 4])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_input_with_float32_module(layout, replicas, low, run_step, assert_state_equal):
    reference = make_bn(layout, dtype=torch.float32)
    model = synchronized(reference, replicas)
    x = torch.randn(input_shape(layout, 8)).to(low)
    cotangent = torch.randn_like(x)
    # The reference sees the very same (rounded) values, in float32.
    want = run_step(reference, x.float(), cotangent.float())
    got = run_step(model, x, cotangent)
    assert got.out.dtype == got.x_grad.dtype == low
    loose = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got.out.float(), want.out, **loose)
    torch.testing.assert_close(got.x_grad.float(), want.x_grad, **loose)
    torch.testing.assert_close(got.grads, want.grads, **loose)
    # Statistics are computed in float32 from the same values: tight.
    assert_state_equal(model, reference, **TOLERANCE[torch.float32])


# --- stability: inputs far from zero ----------------------------------------------------


def naive_merge_normalize(x: torch.Tensor, replicas: int, eps: float = 1e-5) -> torch.Tensor:
    """BN the way a naive SyncBN would: merge per-shard sums of x and x**2 in float32."""
    shards = x.tensor_split(replicas)
    count = x.numel() // x.size(1)
    total = sum(s.sum((0, 2, 3)) for s in shards)
    total_sq = sum(s.square().sum((0, 2, 3)) for s in shards)
    mean = total / count
    var = total_sq / count - mean.square()
    return (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + eps).view(1, -1, 1, 1)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    error = (actual.double() - expected).abs().max()
    return float("inf") if error.isnan() else error.item()


def offset_errors(run_step, seed: int, replicas: int = 4) -> dict[str, tuple[float, float]]:
    """For x = 1e4 + randn in float32: max abs errors against a float64 BN of torch's BN and of SyncBN.

    Returns ``{"out" | "x_grad" | "running_var": (torch_error, syncbn_error)}`` and, under
    ``"naive"``, the error of a sum-of-squares merge next to SyncBN's (the output).
    """
    torch.manual_seed(seed)
    x = 1e4 + torch.randn(16, 8, 8, 8)
    cotangent = torch.randn_like(x)
    torch_bn = nn.BatchNorm2d(8, momentum=1.0)  # running_var becomes the batch's unbiased variance
    float64_bn, model = copy.deepcopy(torch_bn).double(), synchronized(torch_bn, replicas)
    exact = run_step(float64_bn, x.double(), cotangent.double())
    plain, synced = run_step(torch_bn, x, cotangent), run_step(model, x, cotangent)
    errors = {
        name: (
            max_error(getattr(plain, name), getattr(exact, name)),
            max_error(getattr(synced, name), getattr(exact, name)),
        )
        for name in ("out", "x_grad")
    }
    errors["running_var"] = tuple(max_error(bn.running_var, float64_bn.running_var) for bn in (torch_bn, model.module))
    errors["naive"] = (max_error(naive_merge_normalize(x, replicas), exact.out), errors["out"][1])
    return errors


def assert_as_accurate_as_torch(torch_error: float, sync_error: float, what: str) -> None:
    bound = 2 * torch_error if torch_error > 0 else 1e-6
    assert sync_error <= bound, f"{what}: syncbn error {sync_error:.3g} > 2 x torch's {torch_error:.3g}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_offset_inputs_forward_as_accurate_as_torch(seed, run_step):
    errors = offset_errors(run_step, seed)
    assert_as_accurate_as_torch(*errors["out"], "output")
    # What this guards: merging sums of squares loses every digit of the variance.
    naive_error, sync_error = errors["naive"]
    assert naive_error > 10 * sync_error


def test_offset_inputs_batch_variance_as_accurate_as_torch(run_step):
    assert_as_accurate_as_torch(*offset_errors(run_step, seed=0)["running_var"], "running_var (momentum=1)")


def test_offset_inputs_input_grad_as_accurate_as_torch(run_step):
    for seed in range(8):
        assert_as_accurate_as_torch(*offset_errors(run_step, seed)["x_grad"], f"input grad, seed {seed}")


# --- whole networks ---------------------------------------------------------------------


def conv_bn_net(dtype: torch.dtype) -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 4),
    )
    return randomize_(net.to(dtype))


@pytest.mark.parametrize(
    "dtype, tolerance",
    [(torch.float64, TOLERANCE[torch.float64]), (torch.float32, {"rtol": 1e-4, "atol": 1e-4})],
)
def test_conv_bn_relu_network_trains_like_full_batch(dtype, tolerance, assert_state_equal):
    reference = conv_bn_net(dtype)
    model = synchronized(reference, replicas=4)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, model)]
    for _ in range(3):
        x = torch.randn(12, 3, 6, 6, dtype=dtype)
        labels = torch.randint(0, 4, (12,))
        losses = []
        for net, optimizer in zip((reference, model), optimizers, strict=True):
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], **tolerance)
        assert_state_equal(model, reference, **tolerance)
    assert model.module[1].num_batches_tracked.item() == model.module[4].num_batches_tracked.item() == 3


class CalledTwice(nn.Module):
    """One BN instance applied twice per forward: two rendezvous, two running-stat updates."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.bn(x)))


@pytest.mark.parametrize("replicas", [2, 3])
def test_layer_called_twice_per_forward(replicas, run_step, assert_state_equal):
    reference = randomize_(CalledTwice().double())
    model = synchronized(reference, replicas)
    train_side_by_side(reference, model, (8, 4, 3, 3), run_step, assert_state_equal, steps=3)
    assert model.module.bn.num_batches_tracked.item() == 6


class TupleInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        y = self.bn(x) * scale
        return y if extra is None else y + self.bn(extra).sum(1, keepdim=True)


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image": self.bn(batch["image"]) * batch["mask"], "label": batch["label"]}


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("call", ["positional", "keyword", "none"])
def test_tuple_and_keyword_inputs(replicas, call, run_step, assert_state_equal):
    reference = randomize_(TupleInput().double())
    model = synchronized(reference, replicas)
    x, extra, cotangent = torch.randn(3, 7, 4, dtype=torch.float64).unbind(0)
    args, kwargs = {
        "positional": ((extra, 2.0), {}),
        "keyword": ((), {"extra": extra, "scale": 2.0}),
        "none": ((), {}),
    }[call]
    want, got = run_step(reference, x, cotangent, *args, **kwargs), run_step(model, x, cotangent, *args, **kwargs)
    torch.testing.assert_close(got.out, want.out, **TOLERANCE[torch.float64])
    torch.testing.assert_close(got.x_grad, want.x_grad, **TOLERANCE[torch.float64])
    torch.testing.assert_close(got.grads, want.grads, **TOLERANCE[torch.float64])
    assert_state_equal(model, reference, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("replicas", [2, 3])
def test_dict_input_and_output(replicas, assert_state_equal):
    reference = randomize_(DictInput().double())
    model = synchronized(reference, replicas)
    image = torch.randn(7, 4, 3, 3, dtype=torch.float64)
    batch = {"image": image, "mask": torch.rand(7, 1, 1, 1, dtype=torch.float64), "label": torch.arange(7)}
    cotangent = torch.randn_like(image)
    outputs = []
    for net in (reference, model):
        net.zero_grad()
        out = net(batch)
        out["image"].backward(cotangent)
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], **TOLERANCE[torch.float64])
    torch.testing.assert_close(model.module.bn.weight.grad, reference.bn.weight.grad, **TOLERANCE[torch.float64])
    assert_state_equal(model, reference, **TOLERANCE[torch.float64])


# --- how the replicas meet ------------------------------------------------------------------


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("replicas", [2, 3, 4, 8])
def test_whole_batch_way_is_bit_identical_to_one_device(way, replicas, memory_format, run_step):
    if way != "whole-batch":
        pytest.skip("merging statistics rounds differently from torch's kernel")
    # Replicas run on the caller's thread, so torch's kernel runs with the reference's
    # intra-op thread count (its reductions round differently with another).
    reference = make_bn("bn2d", dtype=torch.float32)
    model = synchronized(reference, replicas)
    x = torch.randn(input_shape("bn2d", 10), dtype=torch.float32).to(memory_format=memory_format) + 1e4
    cotangent = torch.randn_like(x)
    want, got = run_step(reference, x, cotangent), run_step(model, x, cotangent)
    assert torch.equal(got.out, want.out) and torch.equal(got.x_grad, want.x_grad)
    assert all(torch.equal(got.grads[name], want.grads[name]) for name in want.grads)
    assert torch.equal(model.module.running_var, reference.running_var)
    assert got.out.is_contiguous(memory_format=memory_format)


class CropPerReplica(nn.Module):
    """Replica r drops its last r rows: shards that cannot be joined into one batch."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = current_replica() or 0
        return self.bn(x[:, :, : x.size(2) - rank]).sum(dim=(2, 3))  # (N, C): shapes that gather


@pytest.mark.parametrize("replicas", [2, 3])
def test_shards_that_cannot_be_joined_use_merged_statistics(replicas):
    model = syncbn.DataParallel(syncbn.convert_model(CropPerReplica()), replicas=replicas)
    x = torch.randn(2 * replicas, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    outputs = []
    hook = model.module.bn.register_forward_hook(lambda module, args, out: outputs.append((args[0], out)))
    model(x)
    hook.remove()
    # The reference: every value each replica normalized, pooled per channel.
    inputs = [inp for inp, _ in sorted(outputs, key=lambda pair: pair[0].size(2), reverse=True)]
    pooled = torch.cat([inp.transpose(0, 1).reshape(4, -1) for inp in inputs], dim=1)
    mean, var = pooled.mean(dim=1), pooled.var(dim=1, unbiased=False)
    weight, bias = model.module.bn.weight.detach(), model.module.bn.bias.detach()
    got_loss, want_loss = 0.0, 0.0
    for inp, out in outputs:
        shape = (1, -1, 1, 1)
        expected = (inp - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5) * weight.view(shape) + bias.view(shape)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
        cotangent = torch.randn_like(out)
        got_loss, want_loss = got_loss + (out * cotangent).sum(), want_loss + (expected * cotangent).sum()
    (got_grad,) = torch.autograd.grad(got_loss, x, retain_graph=True)
    (want_grad,) = torch.autograd.grad(want_loss, x)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.module.bn.running_mean, 0.1 * mean, rtol=1e-10, atol=1e-12)


def test_the_whole_batch_is_normalized_once_on_the_callers_thread_in_its_grad_mode(way, monkeypatch):
    threads = []

    def recording_batch_norm(*args, **kwargs):
        threads.append((threading.current_thread(), torch.is_grad_enabled()))
        return torch.nn.functional.batch_norm(*args, **kwargs)

    monkeypatch.setattr(syncbn.functional, "torch_batch_norm", recording_batch_norm)
    model = synchronized(make_bn("bn2d"), replicas=4)
    model(torch.randn(8, 4, 3, 3, dtype=torch.float64))
    with torch.no_grad():
        model(torch.randn(8, 4, 3, 3, dtype=torch.float64))
    expected = [(threading.current_thread(), True), (threading.current_thread(), False)]
    assert threads == (expected if way == "whole-batch" else [])


def test_the_callers_intra_op_thread_count_is_kept():
    before = torch.get_num_threads()
    synchronized(make_bn("bn2d"), replicas=4)(torch.randn(8, 4, 3, 3, dtype=torch.float64))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_replicas_read_the_masters_buffers_and_only_replica_0_writes_them(way, momentum, run_step, monkeypatch):
    # The whole-batch way stays bit-identical over three steps, with momentum=None too,
    # whose factor depends on the counter: a replica that reads it before replica 0
    # counted must not push the call off the whole-batch path.
    merged = []
    original = syncbn.functional.merge_replica_statistics
    monkeypatch.setattr(
        syncbn.functional, "merge_replica_statistics", lambda parts: merged.append(1) or original(parts)
    )
    reference = nn.Sequential(nn.BatchNorm1d(4, momentum=momentum), nn.BatchNorm1d(4, momentum=momentum)).double()
    model = synchronized(reference, replicas=4)
    master_buffers = dict(model.module.named_buffers())
    seen = []
    hook = model.module[1].register_forward_hook(lambda module, args, out: seen.append(module.running_mean))
    exact = way == "whole-batch"
    for _ in range(3):
        x, cotangent = torch.randn(2, 8, 4, dtype=torch.float64).unbind(0)
        want, got = run_step(reference, x, cotangent), run_step(model, x, cotangent)
        state, expected = model.module.state_dict(), reference.state_dict()
        if exact:
            assert torch.equal(got.out, want.out) and torch.equal(got.x_grad, want.x_grad)
            assert all(torch.equal(state[key], expected[key]) for key in expected)
        else:
            torch.testing.assert_close(got.out, want.out, **TOLERANCE[torch.float64])
            torch.testing.assert_close(state, expected, **TOLERANCE[torch.float64])
    hook.remove()
    assert int(model.module[0].num_batches_tracked) == 3 and not (exact and merged)
    assert all(buffer is master_buffers["1.running_mean"] for buffer in seen) and len(seen) == 12
    assert all(model.module.get_buffer(name) is buf for name, buf in master_buffers.items())


@pytest.mark.parametrize(
    "eps, training, message", [(0.0, True, "positive"), (-1.0, True, "positive"), (-1.0, False, "non-negative")]
)
@pytest.mark.parametrize("replicas", [1, 2])
def test_eps_out_of_range_raises_like_torch(eps, training, message, replicas):
    model = synchronized(make_bn("bn2d", eps=eps), replicas).train(training)
    with pytest.raises(ValueError, match=f"batch_norm eps must be {message}"):
        model(torch.randn(input_shape("bn2d", 4), dtype=torch.float64))
