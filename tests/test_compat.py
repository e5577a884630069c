"""syncbn.compat: the names of the original ``sync_batchnorm`` package keep working."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import syncbn


def test_original_names_import_and_are_syncbn_objects():
    from syncbn.compat import (
        DataParallelWithCallback,
        SynchronizedBatchNorm1d,
        SynchronizedBatchNorm2d,
        SynchronizedBatchNorm3d,
        convert_model,
        patch_replication_callback,
    )

    assert SynchronizedBatchNorm1d is syncbn.SyncBatchNorm1d
    assert SynchronizedBatchNorm2d is syncbn.SyncBatchNorm2d
    assert SynchronizedBatchNorm3d is syncbn.SyncBatchNorm3d
    assert DataParallelWithCallback is syncbn.DataParallel
    assert patch_replication_callback is syncbn.patch_replication_callback
    assert convert_model is syncbn.convert_model
    assert syncbn.compat is __import__("syncbn.compat").compat


@pytest.mark.parametrize("name", syncbn.__all__)
def test_public_names_exist(name):
    assert getattr(syncbn, name) is not None


@pytest.mark.parametrize("name", syncbn.compat.__all__)
def test_compat_names_exist(name):
    assert getattr(syncbn.compat, name) is not None


def test_original_positional_signature():
    # sync_batchnorm's SynchronizedBatchNorm2d(num_features, eps, momentum, affine)
    bn = syncbn.compat.SynchronizedBatchNorm2d(3, 1e-3, 0.2, False)
    assert (bn.num_features, bn.eps, bn.momentum, bn.affine) == (3, 1e-3, 0.2, False)
    assert bn.weight is None


def test_data_parallel_with_callback_matches_full_batch():
    from syncbn.compat import DataParallelWithCallback, SynchronizedBatchNorm2d

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SynchronizedBatchNorm2d(4)).double()
    model.load_state_dict(reference.state_dict())  # the state dicts are interchangeable
    unsynced = copy.deepcopy(reference)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2 + 1
    weight = torch.randn(6, 4, 4, 4, dtype=torch.float64)

    tolerance = {"rtol": 1e-10, "atol": 1e-12}
    outputs = []
    for net in (DataParallelWithCallback(model, replicas=2), reference):
        x_ = x.clone().requires_grad_(True)
        out = net(x_)
        (out * weight).sum().backward()
        outputs.append((out.detach(), x_.grad))
    (out, grad), (ref_out, ref_grad) = outputs
    torch.testing.assert_close(out, ref_out, **tolerance)
    torch.testing.assert_close(grad, ref_grad, **tolerance)
    for param, ref_param in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param.grad, ref_param.grad, **tolerance)
    for buf, ref_buf in zip(model.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(buf, ref_buf, **tolerance)
    # Per-replica statistics would give another answer: the match above is synchronization.
    shards = torch.cat([unsynced(s) for s in torch.tensor_split(x, 2)])
    assert not torch.allclose(shards, ref_out, rtol=1e-3, atol=1e-3)


def test_compat_convert_model_wraps_data_parallel():
    from syncbn.compat import DataParallelWithCallback, SynchronizedBatchNorm2d, convert_model

    converted = convert_model(nn.DataParallel(nn.Sequential(nn.BatchNorm2d(3))))
    assert isinstance(converted, DataParallelWithCallback)
    assert type(converted.module[0]) is SynchronizedBatchNorm2d


def test_patch_replication_callback_returns_the_same_data_parallel():
    from syncbn.compat import SynchronizedBatchNorm2d, patch_replication_callback

    data_parallel = nn.DataParallel(nn.Sequential(SynchronizedBatchNorm2d(3)))
    assert patch_replication_callback(data_parallel) is data_parallel
    with pytest.raises(TypeError, match="nn.DataParallel"):
        patch_replication_callback(nn.Sequential())


def test_data_parallel_has_nn_data_parallels_four_seams():
    # scatter, replicate, parallel_apply and gather are methods a subclass can override.
    calls = []

    class Recording(syncbn.DataParallel):
        def scatter(self, inputs, kwargs, devices):
            calls.append("scatter")
            return super().scatter(inputs, kwargs, devices)

        def replicate(self, module, devices):
            calls.append("replicate")
            return super().replicate(module, devices)

        def parallel_apply(self, replicas, inputs, kwargs):
            calls.append("parallel_apply")
            return super().parallel_apply(replicas, inputs, kwargs)

        def gather(self, outputs, output_device):
            calls.append("gather")
            return list(outputs)  # keep the replicas' outputs apart

    net = syncbn.convert_model(torch.nn.Sequential(torch.nn.BatchNorm1d(2)))
    outputs = Recording(net, replicas=2)(torch.randn(6, 2))
    assert calls == ["scatter", "replicate", "parallel_apply", "gather"]
    assert [out.shape[0] for out in outputs] == [3, 3]
