"""Replication follows nn.DataParallel: shared parameters, replica 0 owns the master's buffers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import syncbn
from syncbn.parallel.replicate import replicate

CPU = torch.device("cpu")


class Counter(nn.Module):
    """Counts its forward calls in a buffer, as some models do."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return x


def test_replicas_share_parameters_and_only_replica_zero_shares_buffers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Counter())
    replicas = replicate(net, [CPU] * 3)
    for rank, replica in enumerate(replicas):
        assert replica is not net and replica[1] is not net[1]
        assert replica[0].weight is net[0].weight and replica[1].bias is net[1].bias
        shares = replica[1].running_mean is net[1].running_mean
        assert shares == (rank == 0)
        assert torch.equal(replica[1].running_var, net[1].running_var)
    # replicas are shallow copies: the master is never touched by binding or forward state
    assert list(net.state_dict()) == list(replicas[1].state_dict())


def test_unconverted_buffers_follow_nn_data_parallel_semantics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Counter()).double()
    shard_zero_reference = copy.deepcopy(net)
    parallel = syncbn.DataParallel(net, replicas=4)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    parallel(x)
    parallel(x)
    # A plain (unconverted) BN keeps the statistics of replica 0's shard, like nn.DataParallel,
    # and the counter counts forwards, not replicas.
    shard_zero_reference(x[:2])
    shard_zero_reference(x[:2])
    torch.testing.assert_close(net[1].running_mean, shard_zero_reference[1].running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[1].running_var, shard_zero_reference[1].running_var, rtol=1e-12, atol=1e-12)
    assert net[1].num_batches_tracked.item() == 2
    assert net[2].calls.item() == 2


def test_gradients_land_on_the_master_parameters():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    reference = copy.deepcopy(net)
    parallel = syncbn.DataParallel(syncbn.convert_model(net), replicas=3)
    x = torch.randn(7, 3, dtype=torch.float64)
    parallel(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_no_grad_forward_builds_no_graph():
    net = syncbn.convert_model(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    with torch.no_grad():
        out = syncbn.DataParallel(net, replicas=2)(torch.randn(6, 3))
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_data_parallel_rejects_bad_replicas(bad):
    with pytest.raises(ValueError, match="replicas must be a positive integer"):
        syncbn.DataParallel(nn.BatchNorm1d(2), replicas=bad)


@pytest.mark.parametrize("bad", [0, -1.0])
def test_data_parallel_rejects_bad_timeout(bad):
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        syncbn.DataParallel(nn.BatchNorm1d(2), replicas=2, timeout=bad)


def test_module_on_wrong_device_is_reported():
    parallel = syncbn.DataParallel(nn.BatchNorm1d(2), device_ids=[torch.device("meta")], replicas=2)
    with pytest.raises(RuntimeError, match="module must have its parameters and buffers on device meta"):
        parallel(torch.randn(4, 2))
