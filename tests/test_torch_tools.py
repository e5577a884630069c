"""Converted models go through torch's tools like nn.BatchNorm models; syncbn leaves no trace in unrelated code.

TorchScript, FX, torch.export and torch.jit.trace in eval mode, torch.compile in training,
and the rule that ``torch.nn.functional.batch_norm`` is torch's own whenever no
synchronized BN subclass is running.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncbn


class BatchNormReLU(nn.BatchNorm2d):
    """A timm-style BN subclass that calls F.batch_norm itself (scriptable, as timm's are)."""

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        stats = (self.running_mean, self.running_var)
        x = F.batch_norm(x, *stats, self.weight, self.bias, self.training, factor, self.eps)
        return F.relu(x)


def plain_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        BatchNormReLU(4),
        nn.Flatten(),
        nn.Linear(64, 6),
        nn.BatchNorm1d(6),
    )
    with torch.no_grad():  # non-trivial running statistics, so that eval mode is tested
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model


def converted_pair(training: bool = False) -> tuple[nn.Module, nn.Module]:
    plain = plain_model().train(training)
    return plain, syncbn.convert_model(copy.deepcopy(plain)).train(training)


X = torch.randn(5, 3, 6, 6)


def test_torchscript_of_a_converted_model_in_eval_mode():
    plain, converted = converted_pair()
    scripted = torch.jit.script(converted)
    torch.testing.assert_close(scripted(X), plain(X), rtol=0, atol=0)
    assert type(converted[1]).__name__ == "SyncBatchNorm2d"  # scripting left the model as it was


def test_torchscript_of_a_converted_subclass_fails_exactly_when_the_original_does():
    class CallsSuper(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x).relu()  # super() is not TorchScript

    for module in (CallsSuper(3), syncbn.convert_model(CallsSuper(3))):
        with pytest.raises(Exception, match="forward"):
            torch.jit.script(module.eval())


def test_torchscript_of_plain_models_after_a_synchronized_subclass_ran():
    _, converted = converted_pair(training=True)
    syncbn.DataParallel(converted, replicas=2)(X)  # the routed BN subclass ran
    assert F.batch_norm is syncbn.functional.torch_batch_norm
    scripted = torch.jit.script(nn.Sequential(nn.BatchNorm2d(3)).eval())
    torch.testing.assert_close(scripted(X), F.batch_norm(X, torch.zeros(3), torch.ones(3)))


def test_fx_keeps_synchronized_layers_as_module_calls():
    plain, converted = converted_pair()
    traced = torch.fx.symbolic_trace(converted)
    calls = [node.target for node in traced.graph.nodes if node.op == "call_module"]
    assert {"1", "2", "5"} <= set(calls)  # the three BN layers, as nn.BatchNorm's would be
    torch.testing.assert_close(traced(X), plain(X), rtol=0, atol=0)


@pytest.mark.parametrize("replicas", [2, 3])
def test_an_fx_graph_module_trains_synchronized_under_data_parallel(replicas):
    plain, converted = converted_pair(training=True)
    traced = torch.fx.symbolic_trace(converted).train()
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    out = syncbn.DataParallel(traced.double(), replicas=replicas)(x)
    torch.testing.assert_close(out, plain.double()(x), rtol=1e-10, atol=1e-10)


def test_torch_export_in_eval_mode():
    plain, converted = converted_pair()
    exported = torch.export.export(converted, (X,)).module()
    torch.testing.assert_close(exported(X), plain(X), rtol=0, atol=0)


def test_torch_jit_trace_in_eval_mode():
    plain, converted = converted_pair()
    torch.testing.assert_close(torch.jit.trace(converted, X)(X), plain(X), rtol=0, atol=0)


@pytest.mark.slow
def test_torch_compile_in_training_mode_with_one_replica():
    plain, converted = converted_pair(training=True)
    compiled = torch.compile(converted)
    for _ in range(2):
        torch.testing.assert_close(compiled(X), plain(X), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(converted.state_dict(), plain.state_dict(), rtol=1e-5, atol=1e-5)
