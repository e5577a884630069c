"""The zoo's model families train on R replicas exactly as on one device with the full batch.

Every family of ``sample_models.zoo`` keeps the habits of the codebase it mimics (in-place
activations and ``out += identity`` on BatchNorm outputs, fused BN subclasses, BatchNorm
on pooled maps, frozen BatchNorm). Each one trains for 3 SGD steps with momentum as
``syncbn.DataParallel(convert_model(copy))`` beside the unconverted model fed the full
batch, in float64, on both ways replicas in threads meet (the ``way`` fixture, as in
test_data_parallel_numerics.py); and passes ``syncbn verify --factory`` in-process. With
synchronization broken (``broken_sync``) neither holds, so the checks can fail.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from typer.testing import CliRunner

import sample_models
import syncbn
from sample_models import zoo
from sample_models.zoo.layers import BatchNormAct2d, DropPath, FrozenBatchNorm2d, drop_path
from syncbn.synchronized import is_synchronized
from syncbn_cli.io import build_from_factory
from syncbn_cli.main import app

FAMILIES = zoo.__all__
TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}
EXPECT_SINGLE_VALUE = "Expected more than 1 value per channel when training"
# name: (BatchNorm layers by class, FrozenBatchNorm2d layers, output shapes for a batch of 2)
DOCUMENTED: dict[str, tuple[dict[type[nn.Module], int], int, list[tuple[int, ...]]]] = {
    "resnet_basic": ({nn.BatchNorm2d: 8}, 0, [(2, 10)]),
    "resnet_bottleneck": ({nn.BatchNorm2d: 12}, 0, [(2, 10)]),
    "mobilenet_v3": ({nn.BatchNorm2d: 10}, 0, [(2, 10)]),
    "efficientnet": ({BatchNormAct2d: 10}, 0, [(2, 10)]),
    "densenet": ({nn.BatchNorm2d: 11}, 0, [(2, 10)]),
    "deeplab_aspp": ({nn.BatchNorm2d: 8}, 0, [(2, 3, 16, 16)]),
    "unet": ({nn.BatchNorm2d: 10}, 0, [(2, 2, 16, 16)]),
    "video_resnet3d": ({nn.BatchNorm3d: 6}, 0, [(2, 10)]),
    "detection_backbone": ({nn.BatchNorm2d: 6}, 3, [(2, 8, 4, 4), (2, 16, 2, 2)]),
    "mlp_head": ({nn.BatchNorm1d: 3}, 0, [(2, 8)]),
}
# The first BatchNorm that trains, in forward order: where unsynchronized replicas diverge.
FIRST_TRAINING_BN = {
    "resnet_basic": "bn1",
    "resnet_bottleneck": "bn1",
    "mobilenet_v3": "features.0.1",
    "efficientnet": "bn1",
    "densenet": "features.norm0",
    "deeplab_aspp": "backbone.1",
    "unet": "inc.1",
    "video_resnet3d": "stem.1",
    "detection_backbone": "layer3.0.bn1",
    "mlp_head": "1",
}
runner = CliRunner()


@pytest.fixture
def way(in_process_way: str) -> str:
    """Both in-process ways: joined shards (virtual replicas) and merged statistics (forced)."""
    return in_process_way


def factory(name: str) -> Callable[[], nn.Module]:
    return getattr(zoo, name)


def build(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The family's model, seeded, with random BatchNorm affine and statistics, so no term hides."""
    torch.manual_seed(0)
    model = factory(name)()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (_BatchNorm, FrozenBatchNorm2d)):
                for tensor in (module.weight, module.bias, module.running_mean):
                    if tensor is not None:
                        tensor.copy_(torch.randn_like(tensor))
                if module.running_var is not None:
                    module.running_var.copy_(torch.rand_like(module.running_var) + 0.5)
    return model.to(dtype)


def synchronized(reference: nn.Module, replicas: int) -> syncbn.DataParallel:
    return syncbn.DataParallel(syncbn.convert_model(copy.deepcopy(reference)), replicas=replicas)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def outputs_of(output: Tensor | dict[str, Tensor]) -> list[Tensor]:
    """The model's output tensors: one, or a dict's values (segmentation, detection features)."""
    return list(output.values()) if isinstance(output, dict) else [output]


class Step(NamedTuple):
    """One forward + backward: outputs, the cotangents used, the input grad, parameter grads."""

    outputs: list[Tensor]
    cotangents: list[Tensor]
    x_grad: Tensor | None
    grads: dict[str, Tensor]


def step(model: nn.Module, x: Tensor, cotangents: list[Tensor] | None = None) -> Step:
    """Forward a fresh leaf copy of ``x`` and backpropagate ``cotangents`` (random when None)."""
    unwrap(model).zero_grad(set_to_none=True)
    leaf = x.detach().clone().requires_grad_()
    outputs = outputs_of(model(leaf))
    if cotangents is None:
        # The gradient of a loss averaged over samples and pixels: weights move by O(lr).
        cotangents = [torch.randn_like(out) * out.size(1) / max(out.numel(), 1) for out in outputs]
    torch.autograd.backward(outputs, cotangents)
    grads = {name: p.grad.clone() for name, p in unwrap(model).named_parameters() if p.grad is not None}
    return Step([out.detach() for out in outputs], cotangents, leaf.grad, grads)


def assert_steps_close(got: Step, want: Step, **tolerance: float) -> None:
    torch.testing.assert_close(got.outputs, want.outputs, **tolerance, msg=lambda m: f"outputs: {m}")
    torch.testing.assert_close(got.x_grad, want.x_grad, **tolerance, msg=lambda m: f"input grad: {m}")
    assert set(got.grads) == set(want.grads)
    torch.testing.assert_close(got.grads, want.grads, **tolerance)


def train_side_by_side(
    reference: nn.Module, model: nn.Module, shape: tuple[int, ...], assert_state_equal, steps: int = 3
) -> None:
    """``steps`` SGD steps (lr 0.1, momentum 0.9) on fresh batches; compare everything each step."""
    optimizers = [
        torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        for net in (reference, model)
    ]
    trainable = {name for name, p in reference.named_parameters() if p.requires_grad}
    for _ in range(steps):
        x = torch.randn(shape, dtype=torch.float64)
        want = step(reference, x)
        assert set(want.grads) == trainable
        assert_steps_close(step(model, x, want.cotangents), want, **TOLERANCE)
        for optimizer in optimizers:
            optimizer.step()
        assert_state_equal(model, reference, **TOLERANCE)


def batch_shape(name: str, batch: int) -> tuple[int, ...]:
    return (batch, *factory(name).input_shape)


# --- the models themselves (plain torch) -----------------------------------------------


def test_zoo_lists_every_family_and_each_loads_as_a_factory():
    assert list(sample_models.ZOO) == FAMILIES == list(DOCUMENTED)
    for name, spec in sample_models.ZOO.items():
        model, shape = build_from_factory(spec)
        assert isinstance(model, nn.Module) and shape == factory(name).input_shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", FAMILIES)
def test_family_builds_trains_and_matches_its_documentation(name, dtype):
    norms, frozen, shapes = DOCUMENTED[name]
    model = build(name, dtype)
    x = torch.randn(batch_shape(name, 2), dtype=dtype)
    result = step(model, x)
    assert [tuple(out.shape) for out in result.outputs] == shapes
    assert all(out.dtype == dtype and torch.isfinite(out).all() for out in result.outputs)
    assert result.x_grad is not None and torch.isfinite(result.x_grad).all()
    assert set(result.grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    found: dict[type[nn.Module], int] = {}
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            found[type(module)] = found.get(type(module), 0) + 1
    assert found == norms
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == frozen
    assert sum(p.numel() for p in model.parameters()) < 10_000  # tiny: the tests train each many times


@pytest.mark.parametrize("name", FAMILIES)
def test_family_modifies_a_batch_norm_output_in_place(name):
    # The habit the zoo exists for: an in-place op (ReLU(inplace), +=, mul_, ...) on the
    # very tensor a training BatchNorm returned, after that BatchNorm ran.
    model = build(name)
    outputs: list[tuple[str, Tensor, int]] = []
    for layer_name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.training:
            module.register_forward_hook(
                lambda m, args, out, layer_name=layer_name: outputs.append((layer_name, out, out._version))
            )
    model(torch.randn(batch_shape(name, 4), dtype=torch.float64))
    modified = [layer for layer, out, version in outputs if out._version > version]
    assert modified, f"no BatchNorm output of {name} is modified in place"


@pytest.mark.parametrize("name", FAMILIES)
def test_conversion_alone_changes_nothing(name, assert_state_equal):
    # Outside DataParallel a converted model is the original: bit for bit, train and eval.
    reference = build(name)
    converted = syncbn.convert_model(copy.deepcopy(reference))
    assert sum(is_synchronized(m) for m in converted.modules()) == sum(DOCUMENTED[name][0].values())
    for training in (True, False):
        reference.train(training)
        converted.train(training)
        x = torch.randn(batch_shape(name, 4), dtype=torch.float64)
        want = step(reference, x)
        assert_steps_close(step(converted, x, want.cotangents), want, rtol=0, atol=0)
        assert_state_equal(converted, reference)


def test_efficientnet_batch_norm_act_is_a_batch_norm_2d_with_its_keys_and_survives_conversion():
    model = syncbn.convert_model(build("efficientnet"))
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert all(isinstance(m, BatchNormAct2d) and is_synchronized(m) for m in norms)
    assert sum(isinstance(m.act, nn.SiLU) and m.act.inplace for m in norms) == 7
    assert sum(isinstance(m.act, nn.Identity) for m in norms) == 3  # apply_act=False after projections
    plain = nn.BatchNorm2d(8)
    assert model.bn1.state_dict().keys() == plain.state_dict().keys()


def test_drop_path_is_stochastic_depth_and_off_by_default():
    torch.manual_seed(0)
    x = torch.ones(1000, 3, 2, 2, dtype=torch.float64)
    dropped = drop_path(x, 0.25, training=True).flatten(1)
    kept = dropped.amax(1)
    assert torch.equal(kept, dropped.amin(1))  # whole samples are dropped or kept
    assert set(kept.unique().tolist()) == {0.0, 4 / 3}  # the kept ones rescaled by 1 / (1 - p)
    assert 150 < int((kept == 0).sum()) < 350
    assert drop_path(x, 0.25, training=False) is x
    rates = [m.drop_prob for m in zoo.efficientnet(drop_path_rate=0.2).modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert all(m.drop_prob == 0 for m in zoo.efficientnet().modules() if isinstance(m, DropPath))


def test_detection_backbone_frozen_batch_norm_stays_frozen(assert_state_equal):
    reference = build("detection_backbone")
    model = syncbn.convert_model(copy.deepcopy(reference)).train()
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 3 and not any(isinstance(m, _BatchNorm) or is_synchronized(m) for m in frozen)
    eval_norms = model.frozen_norms()
    assert len(eval_norms) == 3 and all(is_synchronized(m) for m in eval_norms)
    assert not any(m.training or p.requires_grad for m in eval_norms for p in m.parameters())
    assert all(m.training for m in model.layer3.modules())
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("layer3")}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for _ in range(2):
        step(model, torch.randn(batch_shape("detection_backbone", 4), dtype=torch.float64))
        optimizer.step()
    after = model.state_dict()
    # Only layer2's convolutions train below layer3; every frozen statistic is untouched.
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert changed == {"layer2.0.conv1.weight", "layer2.0.conv2.weight", "layer2.0.downsample.0.weight"}
    # FrozenBatchNorm2d loads a BatchNorm2d checkpoint (its counter dropped).
    loaded = FrozenBatchNorm2d(4)
    loaded.load_state_dict(nn.BatchNorm2d(4).state_dict())


def test_one_image_per_replica_is_too_few_for_plain_batch_norm():
    # Why the DeepLab family is here: its image-pooling BN sees one value per channel per
    # image, so with one image per replica only synchronized statistics can train it.
    reference = build("deeplab_aspp")
    unsynced = syncbn.DataParallel(copy.deepcopy(reference), replicas=4)
    with pytest.raises(ValueError, match=EXPECT_SINGLE_VALUE):
        unsynced(torch.randn(batch_shape("deeplab_aspp", 4), dtype=torch.float64))
    reference(torch.randn(batch_shape("deeplab_aspp", 4), dtype=torch.float64))  # the full batch is fine


# --- R replicas vs the full batch ---------------------------------------------------------


@pytest.mark.parametrize("replicas", [2, 3, 4])
@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_like_the_full_batch(name, replicas, way, assert_state_equal):
    reference = build(name)
    train_side_by_side(reference, synchronized(reference, replicas), batch_shape(name, 8), assert_state_equal)


def test_eight_replicas_one_image_each(way, assert_state_equal):
    reference = build("resnet_bottleneck")
    model = synchronized(reference, 8)
    train_side_by_side(reference, model, batch_shape("resnet_bottleneck", 8), assert_state_equal)
    assert int(model.module.bn1.num_batches_tracked) == 3


def test_batch_smaller_than_replicas(way, assert_state_equal):
    # 3 images on 4 replicas: replica 3 gets an empty shard; the pooling BN still has 3 values.
    reference = build("deeplab_aspp")
    train_side_by_side(reference, synchronized(reference, 4), batch_shape("deeplab_aspp", 3), assert_state_equal)


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_pooling_batch_norm_with_one_image_per_replica(replicas, way, assert_state_equal):
    reference = build("deeplab_aspp")
    model = synchronized(reference, replicas)
    train_side_by_side(reference, model, batch_shape("deeplab_aspp", replicas), assert_state_equal)


@pytest.mark.parametrize("name", FAMILIES)
def test_broken_sync_does_not_match_the_full_batch(name, broken_sync, way):
    # The negative control: per-replica statistics give other outputs (checked after one step).
    reference = build(name)
    model = synchronized(reference, 2)
    x = torch.randn(batch_shape(name, 8), dtype=torch.float64)
    want = step(reference, x)
    got = step(model, x, want.cotangents)
    difference = max((a - b).abs().max() / b.abs().max() for a, b in zip(got.outputs, want.outputs, strict=True))
    assert difference > 1e-3


# --- through the command line ---------------------------------------------------------------


def verify_json(*args: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["verify", *args, "--dtype", "float64", "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize("name", FAMILIES)
def test_cli_verify_passes(name):
    exit_code, document = verify_json("--factory", sample_models.ZOO[name])
    failing = [c for c in document["checks"] + document["layers"] if not c["passed"]]
    assert (exit_code, document["passed"], document["error"], failing) == (0, True, None, [])
    assert document["unsynced"]["passed"] is False


def test_cli_verify_passes_with_one_image_per_replica():
    exit_code, document = verify_json(
        "--factory", sample_models.ZOO["deeplab_aspp"], "--replicas", "4", "--batch-size", "4"
    )
    assert (exit_code, document["passed"], document["error"]) == (0, True, None)
    assert EXPECT_SINGLE_VALUE in document["unsynced"]["error"]


@pytest.mark.parametrize("name", FAMILIES)
def test_cli_verify_fails_with_broken_sync(name, broken_sync):
    exit_code, document = verify_json("--factory", sample_models.ZOO[name])
    assert (exit_code, document["passed"], document["error"]) == (1, False, None)
    assert document["first_diverging_layer"] == FIRST_TRAINING_BN[name]
