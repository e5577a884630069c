"""convert_model / revert_model: BatchNorm becomes SyncBN, and everything else survives.

Every conversion is checked against an unconverted copy of the same model: outputs,
gradients, running statistics and optimizer steps must not change on one device, and
under ``syncbn.DataParallel`` must equal the unconverted model on the full batch.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncbn

FLOAT64 = {"rtol": 1e-10, "atol": 1e-12}


# --------------------------------------------------------------------------- helpers


def assert_same_state_dict(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order, and bit-identical tensors of the same dtype."""
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key


def tensors_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by qualified name (None buffers skipped)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def assert_same_objects(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = tensors_of(module)
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key] is value, key


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def bn_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def shard_forward(model: nn.Module, x: torch.Tensor, replicas: int) -> torch.Tensor:
    """What plain per-replica BN computes: every shard normalized with its own statistics."""
    model = copy.deepcopy(model)
    return torch.cat([model(shard) for shard in torch.tensor_split(x, replicas)])


def run_step(model: nn.Module, x: torch.Tensor, weight: torch.Tensor):
    """One forward and backward with a non-trivial loss; returns output and input grad."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * weight).sum().backward()
    return out.detach(), x.grad


class Nested(nn.Module):
    """BN layers of every kind inside a Sequential, a ModuleList and a ModuleDict."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4)), nn.BatchNorm2d(4, momentum=None)]
        )
        self.heads = nn.ModuleDict({"volume": nn.BatchNorm3d(4), "vector": nn.BatchNorm1d(4, affine=False)})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x, self.heads["volume"](x.unsqueeze(2)), self.heads["vector"](x.mean((2, 3)))


class BatchNormReLU2d(nn.BatchNorm2d):
    """A BN subclass that adds an activation after BatchNorm's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style: re-implements BN's forward around ``F.batch_norm``, then drop and act."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: type[nn.Module] = nn.ReLU,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
        )
        self.drop = nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


class ManualBatchNorm2d(nn.BatchNorm2d):
    """Computes batch statistics by hand, never through ``F.batch_norm``: cannot be synced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


SUBCLASSES = [BatchNormReLU2d, BatchNormAct2d]


# ------------------------------------------------------------------ which classes become what


@pytest.mark.parametrize(
    ("plain", "sync", "shape"),
    [
        (nn.BatchNorm1d, syncbn.SyncBatchNorm1d, (6, 3)),
        (nn.BatchNorm2d, syncbn.SyncBatchNorm2d, (6, 3, 4, 4)),
        (nn.BatchNorm3d, syncbn.SyncBatchNorm3d, (6, 3, 2, 3, 3)),
        (nn.SyncBatchNorm, syncbn.SyncBatchNorm, (6, 3, 4, 4)),
    ],
)
def test_bare_layer_becomes_its_sync_class(plain, sync, shape):
    torch.manual_seed(0)
    layer = plain(3)
    weight, running_mean = layer.weight, layer.running_mean
    reference = copy.deepcopy(layer)
    converted = syncbn.convert_model(layer)
    assert type(converted) is sync
    assert converted is not layer  # the root is replaced, and returned
    assert converted.weight is weight and converted.running_mean is running_mean
    x = torch.randn(shape)
    assert torch.equal(converted(x), reference(x))


def test_nested_model_every_bn_converted_in_place():
    model = Nested()
    stem, blocks, heads = model.stem, model.blocks, model.heads
    conv = model.stem[0]
    converted = syncbn.convert_model(model)
    assert converted is model
    assert converted.stem is stem and converted.blocks is blocks and converted.heads is heads
    assert converted.stem[0] is conv
    assert type(converted.stem[1]) is syncbn.SyncBatchNorm2d
    assert type(converted.blocks[0][1]) is syncbn.SyncBatchNorm
    assert type(converted.blocks[1]) is syncbn.SyncBatchNorm2d
    assert type(converted.heads["volume"]) is syncbn.SyncBatchNorm3d
    assert type(converted.heads["vector"]) is syncbn.SyncBatchNorm1d
    assert not any(type(m).__module__.startswith("torch.nn") for m in bn_layers(converted))


def test_bn_shared_by_two_parents_stays_one_object():
    shared = nn.BatchNorm2d(4)
    first = nn.Sequential(nn.Conv2d(3, 4, 1), shared)
    second = nn.Sequential(shared, nn.ReLU())
    model = nn.Sequential(first, second)
    syncbn.convert_model(model)
    assert type(model[0][1]) is syncbn.SyncBatchNorm2d
    assert model[0][1] is model[1][0]
    assert model[0][1].weight is shared.weight


def test_bn_registered_twice_in_one_parent_is_converted_everywhere():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    syncbn.convert_model(model)
    assert type(model[0]) is syncbn.SyncBatchNorm2d
    assert model[2] is model[0]


def test_sync_bn_registered_twice_in_one_parent_is_reverted_everywhere():
    bn = syncbn.SyncBatchNorm2d(3)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    syncbn.revert_model(model)
    assert type(model[0]) is nn.BatchNorm2d
    assert model[2] is model[0]


@pytest.mark.parametrize(
    "layer",
    [
        syncbn.SyncBatchNorm1d(3),
        syncbn.SyncBatchNorm2d(3),
        syncbn.SyncBatchNorm3d(3),
        syncbn.SyncBatchNorm(3),
    ],
    ids=["1d", "2d", "3d", "any"],
)
def test_already_converted_layer_untouched(layer):
    model = nn.Sequential(layer)
    state = tensors_of(model)
    assert syncbn.convert_model(layer) is layer
    assert syncbn.convert_model(model)[0] is layer
    assert_same_objects(state, model)


def test_converted_subclass_untouched_by_second_conversion():
    layer = syncbn.convert_model(BatchNormReLU2d(3))
    cls = type(layer)
    assert syncbn.convert_model(layer) is layer
    assert type(layer) is cls


def test_non_bn_modules_untouched():
    children = [
        nn.Conv2d(3, 4, 3),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.GroupNorm(2, 4),
        nn.LayerNorm(4),
        nn.ReLU(),
        nn.Linear(4, 4),
    ]
    model = nn.Sequential(*children)
    assert syncbn.convert_model(model) is model
    for child, new in zip(children, model, strict=True):
        assert new is child
        assert type(new).__module__.startswith("torch.nn")
    conv = nn.Conv2d(3, 4, 1)
    assert syncbn.convert_model(conv) is conv


# ---------------------------------------------------------------------- what is preserved


def test_parameters_buffers_and_state_dict_preserved():
    torch.manual_seed(0)
    model = Nested()
    model(torch.randn(4, 3, 5, 5))  # non-trivial running stats and counters
    objects = tensors_of(model)
    state = clone_state(model)
    syncbn.convert_model(model)
    assert_same_objects(objects, model)
    assert_same_state_dict(state, model.state_dict())


def test_requires_grad_and_num_batches_tracked_preserved():
    bn = nn.BatchNorm2d(3)
    bn.weight.requires_grad_(False)
    for _ in range(3):
        bn(torch.randn(4, 3, 2, 2))
    converted = syncbn.convert_model(bn)
    assert converted.weight.requires_grad is False
    assert converted.bias.requires_grad is True
    assert converted.num_batches_tracked.item() == 3
    converted(torch.randn(4, 3, 2, 2))
    assert converted.num_batches_tracked.item() == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps": 1e-3, "momentum": 0.3},
        {"momentum": None},
        {"affine": False},
        {"track_running_stats": False},
        {"bias": False},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_configuration_preserved_and_behaves_identically(kwargs):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, **kwargs)
    expected = {name: getattr(bn, name) for name in ("eps", "momentum", "affine", "track_running_stats")}
    reference = copy.deepcopy(bn)
    converted = syncbn.convert_model(bn)
    for name, value in expected.items():
        assert getattr(converted, name) == value, name
    assert (converted.bias is None) == (reference.bias is None)
    assert (converted.running_mean is None) == (reference.running_mean is None)
    for _ in range(3):  # momentum=None averages over calls: several steps tell it apart
        x = torch.randn(5, 3, 3, 3) * 2 + 1
        assert torch.equal(converted(x), reference(x))
    assert_same_state_dict(reference.state_dict(), converted.state_dict())
    converted.eval()
    reference.eval()
    x = torch.randn(5, 3, 3, 3)
    assert torch.equal(converted(x), reference(x))


def test_training_flag_kept_per_layer():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm1d(3)))
    model[1].eval()
    model[2].eval()
    model[2][0].train()
    flags = [m.training for m in model.modules()]
    syncbn.convert_model(model)
    assert [m.training for m in model.modules()] == flags == [True, True, False, False, True]


def test_extra_attributes_preserved():
    bn = nn.BatchNorm2d(3)
    qconfig = object()
    bn.qconfig = qconfig
    bn.my_tag = "stem"
    converted = syncbn.convert_model(bn)
    assert converted.qconfig is qconfig
    assert converted.my_tag == "stem"


def test_forward_hooks_and_pre_hooks_fire_and_remove_after_conversion():
    bn = nn.BatchNorm2d(3)
    calls: list[tuple[str, type]] = []
    handles = [
        bn.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m)))),
        bn.register_forward_pre_hook(lambda m, args, kwargs: calls.append(("pre_kw", type(m))), with_kwargs=True),
        bn.register_forward_hook(lambda m, args, out: calls.append(("post", type(m)))),
        bn.register_forward_hook(lambda m, args, kw, out: calls.append(("post_kw", type(m))), with_kwargs=True),
        bn.register_forward_hook(lambda m, args, out: out * 2),  # a hook that changes the output
    ]
    reference = nn.BatchNorm2d(3)
    converted = syncbn.convert_model(bn)
    x = torch.randn(4, 3, 2, 2)
    out = converted(x)
    sync = syncbn.SyncBatchNorm2d
    assert calls == [("pre", sync), ("pre_kw", sync), ("post", sync), ("post_kw", sync)]
    torch.testing.assert_close(out, reference(x) * 2)
    for handle in handles:
        handle.remove()
    calls.clear()
    out = converted(x)
    assert calls == []
    torch.testing.assert_close(out, reference(x))


def test_meta_device_preserved():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, device="meta"), nn.BatchNorm2d(4, device="meta"))
    syncbn.convert_model(model)
    assert type(model[1]) is syncbn.SyncBatchNorm2d
    assert {t.device.type for t in tensors_of(model).values()} == {"meta"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_preserved():
    bn = nn.BatchNorm2d(3).cuda()
    reference = copy.deepcopy(bn)
    converted = syncbn.convert_model(bn)
    assert {t.device.type for t in tensors_of(converted).values()} == {"cuda"}
    x = torch.randn(4, 3, 2, 2, device="cuda")
    assert torch.equal(converted(x), reference(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_preserved_and_output_identical(dtype):
    torch.manual_seed(0)
    model = Nested().to(dtype)
    dtypes = {k: v.dtype for k, v in tensors_of(model).items()}
    reference = copy.deepcopy(model)
    syncbn.convert_model(model)
    assert {k: v.dtype for k, v in tensors_of(model).items()} == dtypes
    assert dtypes["stem.1.num_batches_tracked"] == torch.int64
    assert dtypes["stem.1.weight"] == dtype
    x = torch.randn(4, 3, 5, 5, dtype=dtype)
    for out, ref in zip(model(x), reference(x), strict=True):
        assert out.dtype == dtype
        assert torch.equal(out, ref)


def test_output_identical_before_and_after_in_train_and_eval():
    torch.manual_seed(0)
    model = Nested()
    reference = copy.deepcopy(model)
    syncbn.convert_model(model)
    x = torch.randn(4, 3, 5, 5)
    for _ in range(2):
        for out, ref in zip(model(x), reference(x), strict=True):
            assert torch.equal(out, ref)
    assert_same_state_dict(reference.state_dict(), model.state_dict())
    model.eval()
    reference.eval()
    for out, ref in zip(model(x), reference(x), strict=True):
        assert torch.equal(out, ref)


# -------------------------------------------------------- optimizers built before conversion


def small_net() -> nn.Module:
    # No conv bias before BN: its true gradient is zero, and Adam would amplify rounding noise.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1, bias=False),
        nn.BatchNorm2d(4, momentum=None),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 2),
    ).double()


OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


@pytest.mark.parametrize("replicas", [None, 2], ids=["one-device", "dataparallel-2"])
@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_optimizer_built_before_conversion_keeps_training(make_optimizer, replicas):
    torch.manual_seed(0)
    model = small_net()
    reference = copy.deepcopy(model)
    initial = clone_state(model)
    optimizer = make_optimizer(model.parameters())  # before conversion
    reference_optimizer = make_optimizer(reference.parameters())
    model = syncbn.convert_model(model)
    runner = model if replicas is None else syncbn.DataParallel(model, replicas=replicas)
    for _ in range(3):
        x, target = torch.randn(8, 3, 4, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        for net, opt in ((runner, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            F.mse_loss(net(x), target).backward()
            opt.step()
    state, expected = model.state_dict(), reference.state_dict()
    assert list(state) == list(expected)
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], **FLOAT64, msg=key)
    # The optimizer stepped the live weights (a copy would leave the model unchanged).
    assert not torch.equal(model[0].weight, initial["0.weight"])
    assert not torch.equal(model[1].weight, initial["1.weight"])
    assert model[4].num_batches_tracked.item() == 3


# ------------------------------------------------------------ BN subclasses with extra work


@pytest.mark.parametrize("cls", SUBCLASSES)
def test_subclass_keeps_its_class_and_output(cls):
    torch.manual_seed(0)
    layer = cls(3)
    objects = tensors_of(layer)
    children = dict(layer.named_children())
    reference = copy.deepcopy(layer)
    converted = syncbn.convert_model(layer)
    assert isinstance(converted, cls)
    assert isinstance(converted, nn.BatchNorm2d)
    assert dict(converted.named_children()) == children  # act / drop kept, same objects
    assert_same_objects(objects, converted)
    x = torch.randn(4, 3, 3, 3)
    out = converted(x)
    assert torch.equal(out, reference(x))
    assert (out >= 0).all() and (out == 0).any()  # the activation is still applied
    converted.eval()
    reference.eval()
    assert torch.equal(converted(x), reference(x))
    assert_same_state_dict(reference.state_dict(), converted.state_dict())


@pytest.mark.parametrize("replicas", [2, 4])
@pytest.mark.parametrize("cls", SUBCLASSES)
def test_subclass_under_dataparallel_matches_full_batch(cls, replicas):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), cls(4)).double()
    reference = copy.deepcopy(model)
    unsynced = copy.deepcopy(model)
    syncbn.convert_model(model)
    assert isinstance(model[1], cls)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 3 + 1
    weight = torch.randn(8, 4, 4, 4, dtype=torch.float64)

    out, grad = run_step(syncbn.DataParallel(model, replicas=replicas), x, weight)
    ref_out, ref_grad = run_step(reference, x, weight)

    assert (out >= 0).all() and (out == 0).any()  # the activation survived
    torch.testing.assert_close(out, ref_out, **FLOAT64)
    torch.testing.assert_close(grad, ref_grad, **FLOAT64)
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param.grad, ref_param.grad, **FLOAT64, msg=name)
    for (name, buf), ref_buf in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(buf, ref_buf, **FLOAT64, msg=name)
    # Plain per-replica BN computes something else, so the match above proves synchronization.
    assert not torch.allclose(shard_forward(unsynced, x, replicas), ref_out, rtol=1e-3, atol=1e-3)


def test_subclass_without_f_batch_norm_raises_under_replicas():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("block", nn.Sequential())
    model.block.add_module("norm", ManualBatchNorm2d(3))
    syncbn.convert_model(model)
    assert isinstance(model.block.norm, ManualBatchNorm2d)
    with pytest.raises(syncbn.SyncBNError, match=r"block\.norm") as info:
        syncbn.DataParallel(model, replicas=2)(torch.randn(4, 3, 2, 2))
    assert "ManualBatchNorm2d" in str(info.value)


def test_subclass_without_f_batch_norm_works_with_one_replica():
    torch.manual_seed(0)
    layer = ManualBatchNorm2d(3)
    reference = copy.deepcopy(layer)
    converted = syncbn.convert_model(layer)
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(syncbn.DataParallel(converted, replicas=1)(x), reference(x))
    assert torch.equal(converted(x), reference(x))


@pytest.mark.parametrize("cls", SUBCLASSES)
def test_revert_restores_subclass(cls):
    layer = cls(3)
    model = nn.Sequential(layer)
    objects = tensors_of(model)
    syncbn.convert_model(model)
    assert type(model[0]) is not cls
    syncbn.revert_model(model)
    assert type(model[0]) is cls
    assert model[0] is layer
    assert_same_objects(objects, model)


def test_converted_subclass_model_pickles():
    model = nn.Sequential(BatchNormReLU2d(3))
    pickle.dumps(model)  # the unconverted model pickles fine
    syncbn.convert_model(model)
    restored = pickle.loads(pickle.dumps(model))
    assert isinstance(restored[0], BatchNormReLU2d)


# ------------------------------------------------------------------------------ revert_model


@pytest.mark.parametrize(
    ("sync", "plain"),
    [
        (syncbn.SyncBatchNorm1d, nn.BatchNorm1d),
        (syncbn.SyncBatchNorm2d, nn.BatchNorm2d),
        (syncbn.SyncBatchNorm3d, nn.BatchNorm3d),
    ],
)
def test_revert_sync_layer_to_plain(sync, plain):
    layer = sync(3, momentum=None)
    weight = layer.weight
    reverted = syncbn.revert_model(layer)
    assert type(reverted) is plain
    assert reverted.weight is weight
    assert reverted.momentum is None


def test_convert_then_revert_round_trip():
    torch.manual_seed(0)
    model = Nested()
    model.blocks.append(BatchNormAct2d(4))
    model(torch.randn(4, 3, 5, 5))
    classes = [type(m) for m in model.modules()]
    objects = tensors_of(model)
    state = clone_state(model)
    syncbn.convert_model(model)
    assert [type(m) for m in model.modules()] != classes
    syncbn.revert_model(model)
    assert [type(m) for m in model.modules()] == classes
    assert nn.SyncBatchNorm in classes and BatchNormAct2d in classes
    assert_same_objects(objects, model)
    assert_same_state_dict(state, model.state_dict())
    assert not any(hasattr(m, "_syncbn_converted_from") for m in model.modules())


@pytest.mark.parametrize("make", [lambda: syncbn.convert_model(nn.SyncBatchNorm(3)), lambda: syncbn.SyncBatchNorm(3)])
def test_reverted_sync_batch_norm_has_process_group(make):
    # nn.SyncBatchNorm.forward reads self.process_group when training under torch.distributed.
    reverted = syncbn.revert_model(make())
    assert type(reverted) is nn.SyncBatchNorm
    assert reverted.process_group is None


def test_revert_dataparallel_to_torch_dataparallel():
    inner = nn.Sequential(syncbn.SyncBatchNorm2d(3))
    reverted = syncbn.revert_model(syncbn.DataParallel(inner, replicas=2))
    assert type(reverted) is nn.DataParallel
    assert reverted.module is inner
    assert type(inner[0]) is nn.BatchNorm2d


# ------------------------------------------------------------------------- nn.DataParallel


def test_torch_dataparallel_becomes_syncbn_dataparallel():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    wrapped = nn.DataParallel(inner)
    keys = list(wrapped.state_dict())
    assert keys[0].startswith("module.")
    reference = copy.deepcopy(inner)
    converted = syncbn.convert_model(wrapped)
    assert type(converted) is syncbn.DataParallel
    assert converted.module is inner
    assert type(inner[1]) is syncbn.SyncBatchNorm2d
    assert list(converted.state_dict()) == keys
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(converted(x), reference(x))
    # And back.
    back = syncbn.revert_model(converted)
    assert type(back) is nn.DataParallel
    assert list(back.state_dict()) == keys


# ----------------------------------------------------------------------------- lazy modules


def test_uninitialized_lazy_bn_raises_then_converts_after_forward():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"LazyBatchNorm2d.*forward"):
        syncbn.convert_model(model)
    model(torch.randn(2, 3, 2, 2))
    weight = model[1].weight
    syncbn.convert_model(model)
    assert type(model[1]) is syncbn.SyncBatchNorm2d
    assert model[1].weight is weight
    assert model[1].num_features == 4
