"""The bundled sample models cover what they promise, and declare their input shapes."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import sample_models
import syncbn
from sample_models.fused import BatchNormAct2d


def build(spec: str):
    module_name, _, function_name = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), function_name)
    return factory(), factory.input_shape


@pytest.mark.parametrize("spec", sorted(sample_models.SAMPLES.values()))
def test_every_sample_builds_runs_and_has_batch_norm(spec):
    model, shape = build(spec)
    assert isinstance(model, nn.Module)
    out = model(torch.randn(4, *shape))
    assert out.shape[0] == 4 and torch.isfinite(out).all()
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("sample_models.mlp:mlp_bn1d", nn.BatchNorm1d),
        ("sample_models.mlp:temporal_bn1d", nn.BatchNorm1d),
        ("sample_models.resnet:resnet_tiny", nn.BatchNorm2d),
        ("sample_models.video:video_tiny", nn.BatchNorm3d),
        ("sample_models.fused:bn_act_net", BatchNormAct2d),
    ],
)
def test_samples_cover_each_batch_norm_kind(spec, kind):
    model, _ = build(spec)
    assert any(type(m) is kind for m in model.modules())


def test_default_sample_mixes_every_situation():
    model, shape = build(sample_models.DEFAULT_SAMPLE)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert any(type(m) is BatchNormAct2d for m in norms)
    assert any(m.momentum is None for m in norms)
    assert any(not m.affine for m in norms)
    assert any(m.affine and m.bias is None for m in norms)
    assert any(type(m) is nn.BatchNorm1d for m in norms)
    model(torch.randn(2, *shape))
    assert model.shared_bn.num_batches_tracked.item() == 2  # called twice per forward


def test_fused_activation_survives_conversion():
    torch.manual_seed(0)
    model, shape = build("sample_models.fused:bn_act_net")
    x = torch.randn(4, *shape)
    before = model(x)  # train mode: batch statistics, so running buffers do not matter
    converted = syncbn.convert_model(model)
    assert isinstance(converted[1], BatchNormAct2d) and isinstance(converted[1].act, nn.SiLU)
    torch.testing.assert_close(converted(x), before, rtol=0, atol=0)


def test_resnet_tiny_docstring_counts_its_batch_norm_layers():
    from sample_models.resnet import resnet_tiny

    count = sum(isinstance(m, nn.BatchNorm2d) for m in resnet_tiny().modules())
    assert count == 9 and f"and {count} BatchNorm2d layers" in resnet_tiny.__doc__
