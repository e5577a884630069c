"""A synchronized layer that a replica reaches without its replica copy raises instead of going unsynchronized.

``DataParallel`` binds every replica's copy of every SyncBN layer to the replicas'
rendezvous. A layer reached some other way (the master's own layer through a closure, a
plain attribute or list, or a compiled forward bound to the master) would normalize one
replica's shard alone: silently wrong. These tests pin the error, the refusal of
compiled modules at construction, and the way that works: compiling the DataParallel.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncbn
from syncbn.errors import SyncBNError


class ThroughClosure(nn.Module):
    """Calls a BN layer held in a plain list: replicate() does not copy it, every replica gets the master's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.hidden = [syncbn.SyncBatchNorm2d(4)]

    def forward(self, x):
        return self.hidden[0](self.conv(x))


def test_a_layer_not_bound_to_its_replica_raises_naming_it():
    model = syncbn.DataParallel(ThroughClosure(), replicas=2)
    with pytest.raises(SyncBNError, match=r"SyncBatchNorm2d\(4\) ran in training mode .* without being bound"):
        model(torch.randn(4, 3, 2, 2))


class Holder(nn.Module):
    """Runs a whole converted model kept out of replicate()'s reach."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.anchor = nn.Linear(1, 1)  # something to replicate
        self.hidden = [inner]

    def forward(self, x):
        return self.hidden[0](x)


def test_a_converted_layer_is_named_by_its_qualified_name():
    inner = syncbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    with pytest.raises(SyncBNError, match="SyncBN layer '1' ran in training mode"):
        syncbn.DataParallel(Holder(inner), replicas=2)(torch.randn(4, 3, 2, 2))


def test_an_unbound_layer_in_eval_mode_needs_no_synchronization():
    # Negative control of the guard: with running statistics nothing is exchanged.
    model = ThroughClosure().eval()
    model.hidden[0].eval()  # not a registered submodule: .eval() above did not reach it
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(syncbn.DataParallel(model, replicas=2)(x), model(x))


def test_the_guard_stays_quiet_outside_data_parallel_and_on_one_replica():
    model = ThroughClosure()
    model(torch.randn(4, 3, 2, 2))
    syncbn.DataParallel(model, replicas=1)(torch.randn(4, 3, 2, 2))


def test_a_bn_subclass_not_bound_to_its_replica_raises_too():
    class BatchNormReLU(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x).relu()

    model = ThroughClosure()
    model.hidden = [syncbn.convert_model(BatchNormReLU(4))]
    with pytest.raises(SyncBNError, match="without being bound to its replica"):
        syncbn.DataParallel(model, replicas=2)(torch.randn(4, 3, 2, 2))


def compiled_cases():
    net = syncbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    yield "torch.compile(model)", torch.compile(copy.deepcopy(net))
    yield "a compiled submodule", nn.Sequential(torch.compile(copy.deepcopy(net)))
    method = copy.deepcopy(net)
    method.compile()
    yield "model.compile()", method


@pytest.mark.parametrize("name, module", list(compiled_cases()), ids=lambda case: case if isinstance(case, str) else "")
def test_data_parallel_refuses_a_compiled_module_and_names_the_alternative(name, module):
    with pytest.raises(ValueError, match=r"torch.compile\(syncbn.DataParallel\(model\)\)"):
        syncbn.DataParallel(module, replicas=2)
    with pytest.raises(ValueError, match="cannot replicate a torch.compile'd module"):
        syncbn.patch_replication_callback(nn.DataParallel(module))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        return self.relu(out)


class SiLUBlock(nn.Module):
    """An in-place activation on BN's output, returned: a graph break at BN would crash it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)), inplace=True)


BLOCKS = {
    "residual": Residual,
    "silu_ returned": SiLUBlock,
    "hardswish_ in a Sequential": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Hardswish(inplace=True), nn.Conv2d(4, 3, 1)
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_compiling_the_data_parallel_trains_exactly(replicas, block):
    # The replicas run eagerly inside the compiled DataParallel (syncbn.parallel.parallel_apply).
    torch.manual_seed(0)
    reference = BLOCKS[block]().double()
    compiled = torch.compile(syncbn.DataParallel(syncbn.convert_model(copy.deepcopy(reference)), replicas=replicas))
    for _ in range(2):
        x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
        want, got = reference(x), compiled(x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        want.square().sum().backward()
        got.square().sum().backward()
    for got_param, want_param in zip(compiled.module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got_param.grad, want_param.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compiled.module.state_dict(), reference.state_dict(), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_a_layer_compiled_outside_a_replica_still_refuses_to_run_unbound_in_one():
    # Traced with no replica running, the graph holds no check (the running-replica count
    # is 0, and guarded); run as a replica, the guard fails and the retrace checks again.
    from syncbn.comm.replica_context import running_as

    compiled = torch.compile(syncbn.SyncBatchNorm2d(3))
    x = torch.randn(4, 3, 5, 5)
    compiled(x)
    with running_as(0), pytest.raises(SyncBNError, match="without being bound to its replica"):
        compiled(x)
    compiled(x)  # outside again: no error
