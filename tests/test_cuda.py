"""CUDA paths of the threads way; skipped cleanly on machines without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import syncbn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("replicas", [2, 4])
def test_virtual_replicas_on_one_gpu_match_full_batch(replicas, dtype):
    torch.manual_seed(0)
    reference = make_model().to("cuda", dtype)
    model = syncbn.convert_model(copy.deepcopy(reference))
    parallel = syncbn.DataParallel(model, device_ids=[0], replicas=replicas)
    x = torch.randn(10, 3, 6, 6, device="cuda", dtype=dtype)
    cotangent = torch.randn(10, 4, 6, 6, device="cuda", dtype=dtype)
    x_ref, x_sync = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_sync = reference(x_ref), parallel(x_sync)
    y_ref.backward(cotangent)
    y_sync.backward(cotangent)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y_sync, y_ref, **tol)
    torch.testing.assert_close(x_sync.grad, x_ref.grad, **tol)
    for p_sync, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p_sync.grad, p_ref.grad, **tol)
    for b_sync, b_ref in zip(model.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b_sync, b_ref, **tol)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_replicas_on_two_gpus_match_full_batch():
    torch.manual_seed(0)
    reference = make_model().to("cuda:0", torch.float64)
    model = syncbn.convert_model(copy.deepcopy(reference))
    parallel = syncbn.DataParallel(model, device_ids=[0, 1])
    x = torch.randn(6, 3, 6, 6, device="cuda:0", dtype=torch.float64)
    torch.testing.assert_close(parallel(x), reference(x), rtol=1e-10, atol=1e-10)
