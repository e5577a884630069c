"""Second-order gradients (a gradient penalty) through SyncBN on R replicas of one process.

``torch.autograd.grad(..., create_graph=True)`` differentiates SyncBN's backward; both
in-process ways must give what nn.BatchNorm gives on the full batch, in float64, for
shards small enough for the few-op float64 passes and for larger ones (fused kernels).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import syncbn


def penalized_step(model: nn.Module, parameters: nn.Module, x: torch.Tensor):
    """loss = sum(out) + |d sum(out^2 * w) / dx|^2; returns the loss and every parameter grad."""
    leaf = x.clone().requires_grad_()
    out = model(leaf)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)
    (grad,) = torch.autograd.grad((out.square() * weights).sum(), leaf, create_graph=True)
    loss = out.sum() + grad.square().sum()
    loss.backward()
    return loss.detach(), leaf.grad, [p.grad.clone() for p in parameters.parameters()]


def network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Conv2d(4, 2, 1, bias=False),
        nn.BatchNorm2d(2),
    ).double()


@pytest.mark.parametrize("size", [5, 48], ids=["small", "large"])
@pytest.mark.parametrize("replicas", [2, 3])
def test_gradient_penalty_matches_the_full_batch(in_process_way, replicas, size):
    torch.manual_seed(0)
    reference = network()
    converted = syncbn.convert_model(copy.deepcopy(reference))
    x = torch.randn(6, 3, size, size, dtype=torch.float64)
    want = penalized_step(reference, reference, x)
    got = penalized_step(syncbn.DataParallel(converted, replicas=replicas), converted, x)
    scale = max(g.abs().max().item() for g in want[2])
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-12 * scale)
    torch.testing.assert_close(got[2], want[2], rtol=1e-9, atol=1e-12 * scale)


def test_the_penalty_comparison_can_fail(in_process_way, broken_sync):
    torch.manual_seed(0)
    reference = network()
    converted = syncbn.convert_model(copy.deepcopy(reference))
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    want = penalized_step(reference, reference, x)
    got = penalized_step(syncbn.DataParallel(converted, replicas=2), converted, x)
    assert not torch.allclose(got[2][0], want[2][0], rtol=1e-3)
