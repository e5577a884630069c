"""float16/bfloat16 on R replicas is as close to a float64 truth as nn.BatchNorm on one device.

A pure low-precision layer or model (weights, buffers and activations in float16 or
bfloat16) runs one training step three ways from the same weights: in float64 on the
full batch (the truth), in the low dtype on the full batch with plain nn.BatchNorm (one
device), and in the low dtype under ``syncbn.DataParallel`` on R replicas. For the
output, the input gradient, every parameter gradient and every BatchNorm buffer, SyncBN's
error against the truth must be within 2x of one device's, both ways replicas of one
process meet.

Through a whole model, rounding differences of one layer's output (SyncBN's merged
statistics round its output differently from torch's kernel, equally well) grow into
noise in every later check, in any data-parallel setup; so the model test asks the
statistics way not to be worse on the whole (geometric mean of the ratios), and bounds
each ratio loosely, while the layer tests hold every check to 2x.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import syncbn

RATIO = 2.0
LOW = [torch.float16, torch.bfloat16]
LAYERS = {
    "bn2d": (nn.BatchNorm2d, (16, 8, 6, 6)),
    "bn2d-large": (nn.BatchNorm2d, (16, 8, 40, 40)),  # past the kernels' few-op size
    "bn1d": (nn.BatchNorm1d, (32, 16)),
    "bn3d": (nn.BatchNorm3d, (8, 4, 3, 4, 4)),
}
VARIANTS = {"default": {}, "affine=False": {"affine": False}, "momentum=None": {"momentum": None}}


def step(net: nn.Module, x: torch.Tensor, cotangent: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One forward and backward in ``dtype``; every result as float64, by name."""
    leaf = x.to(dtype).requires_grad_()
    out = net(leaf * 1)
    out.backward(cotangent.to(dtype))
    inner = getattr(net, "module", net)
    results = {"output": out, "input grad": leaf.grad}
    results.update({f"{name} grad": p.grad for name, p in inner.named_parameters()})
    results.update({name: b for name, b in inner.named_buffers() if b.is_floating_point()})
    return {name: tensor.detach().double() for name, tensor in results.items()}


def errors_against_truth(reference: nn.Module, x, cotangent, dtype, replicas) -> dict[str, tuple[float, float]]:
    """``{check: (one device's max abs error, SyncBN's)}`` against the float64 truth."""
    truth = step(copy.deepcopy(reference).double(), x.double(), cotangent.double(), torch.float64)
    one_device = step(copy.deepcopy(reference).to(dtype), x, cotangent, dtype)
    converted = syncbn.convert_model(copy.deepcopy(reference).to(dtype))
    synced = step(syncbn.DataParallel(converted, replicas=replicas), x, cotangent, dtype)
    return {
        name: ((one_device[name] - want).abs().max().item(), (synced[name] - want).abs().max().item())
        for name, want in truth.items()
    }


def layer_errors(layer: str, variant: str, dtype: torch.dtype, replicas: int, seed: int):
    torch.manual_seed(seed)
    cls, shape = LAYERS[layer]
    bn = cls(shape[1], **VARIANTS[variant])
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    x, cotangent = torch.randn(shape) * 3 + 2, torch.randn(shape)
    return errors_against_truth(bn, x, cotangent, dtype, replicas)


def model() -> nn.Module:
    # No conv bias before a BatchNorm, as in real models: its gradient, the sum of the BN's
    # input gradient, is exactly zero, so any error there is rounding noise (even of the
    # convolutions, which round differently on shards than on the whole batch).
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.Tanh(),
        nn.Conv2d(8, 4, 1, bias=False),
        nn.BatchNorm2d(4, momentum=None),
    )


def model_ratios(dtype: torch.dtype, seeds: range) -> list[float]:
    ratios = []
    for seed in seeds:
        for replicas in (2, 3, 4):
            torch.manual_seed(seed)
            reference = model()
            x, cotangent = torch.randn(12, 3, 8, 8) * 2 + 0.5, torch.randn(12, 4, 8, 8)
            errors = errors_against_truth(reference, x, cotangent, dtype, replicas)
            ratios += [sync / max(one, 1e-30) for one, sync in errors.values()]
    return ratios


@pytest.mark.parametrize("replicas", [2, 3, 4])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_layer_is_as_close_to_float64_as_one_device(in_process_way, dtype, layer, variant, replicas):
    for seed in (0, 1):
        errors = layer_errors(layer, variant, dtype, replicas, seed)
        worse = {name: f"{sync:.3g} vs {one:.3g}" for name, (one, sync) in errors.items() if sync > RATIO * one}
        assert not worse, f"seed {seed}: {worse}"


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_model_is_as_close_to_float64_as_one_device(in_process_way, dtype):
    ratios = model_ratios(dtype, range(3))
    geometric_mean = math.exp(sum(math.log(max(r, 1e-3)) for r in ratios) / len(ratios))
    if in_process_way == "whole-batch":  # BatchNorm computes exactly what one device does
        assert max(ratios) <= RATIO
    assert geometric_mean <= 1.25, f"SyncBN is {geometric_mean:.2f}x further from float64 than one device"
    assert max(ratios) <= 10.0


def test_the_comparison_can_fail(in_process_way, broken_sync):
    # Negative control: per-replica statistics are far from the truth in every dtype.
    for dtype in LOW:
        one, sync = layer_errors("bn2d", "default", dtype, 4, 0)["output"]
        assert sync > 5 * one
