"""One SyncBN module on its own: the same constructor, state and checks as nn.BatchNormNd,
and, outside a synchronized context, bit-identical outputs, gradients and buffers (SyncBN
calls F.batch_norm there)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import syncbn

# (SyncBN class, torch class, input shape without the batch dimension, for C=4)
PAIRS = {
    "1d-2D": (syncbn.SyncBatchNorm1d, nn.BatchNorm1d, (4,)),
    "1d-3D": (syncbn.SyncBatchNorm1d, nn.BatchNorm1d, (4, 5)),
    "2d": (syncbn.SyncBatchNorm2d, nn.BatchNorm2d, (4, 3, 5)),
    "3d": (syncbn.SyncBatchNorm3d, nn.BatchNorm3d, (4, 2, 3, 4)),
    "any-4D": (syncbn.SyncBatchNorm, nn.BatchNorm2d, (4, 3, 5)),
}
CONFIGS = {
    "default": {},
    "affine=False": {"affine": False},
    "bias=False": {"bias": False},
    "track_running_stats=False": {"track_running_stats": False},
    "momentum=None": {"momentum": None},
    "float64": {"dtype": torch.float64},
}
pair_params = pytest.mark.parametrize("sync_cls, torch_cls, shape", PAIRS.values(), ids=PAIRS.keys())
config_params = pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_pair(sync_cls, torch_cls, config, num_features=4):
    """A torch BN with non-trivial parameters and buffers, and a SyncBN loaded from it."""
    reference = torch_cls(num_features, **config)
    with torch.no_grad():
        for tensor in (*reference.parameters(), reference.running_mean, reference.running_var):
            if tensor is not None:
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    module = sync_cls(num_features, **config)
    module.load_state_dict(reference.state_dict(), strict=True)
    return module, reference


def assert_identical(actual, expected):
    for name, a, b in zip(expected._fields, actual, expected, strict=True):
        if isinstance(b, dict):
            assert a.keys() == b.keys(), name
            for key in b:
                assert torch.equal(a[key], b[key]), f"{name}[{key}]"
        else:
            assert (a is None) == (b is None), name
            assert b is None or (torch.equal(a, b) and a.dtype == b.dtype and a.stride() == b.stride()), name


# --- constructor and state -------------------------------------------------------------


@pytest.mark.parametrize(
    "sync_cls, torch_cls",
    [
        (syncbn.SyncBatchNorm, nn.BatchNorm1d),
        (syncbn.SyncBatchNorm1d, nn.BatchNorm1d),
        (syncbn.SyncBatchNorm2d, nn.BatchNorm2d),
        (syncbn.SyncBatchNorm3d, nn.BatchNorm3d),
    ],
)
def test_constructor_signature_equals_torch(sync_cls, torch_cls):
    """nn.BatchNormNd's parameters, in order, with its defaults, plus one keyword-only extra."""
    sync_params = dict(inspect.signature(sync_cls).parameters)
    extra = sync_params.pop("process_group")
    assert extra.kind is inspect.Parameter.KEYWORD_ONLY and extra.default is None
    torch_params = inspect.signature(torch_cls).parameters
    assert (
        list(sync_params)
        == list(torch_params)
        == [
            "num_features",
            "eps",
            "momentum",
            "affine",
            "track_running_stats",
            "device",
            "dtype",
            "bias",
        ]
    )
    for name, param in torch_params.items():
        assert (sync_params[name].kind, sync_params[name].default) == (param.kind, param.default), name
    assert [p.default for p in sync_params.values()][1:] == [1e-5, 0.1, True, True, None, None, True]
    assert sync_params["bias"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("sync_cls", [syncbn.SyncBatchNorm, syncbn.SyncBatchNorm1d, syncbn.SyncBatchNorm2d])
def test_is_a_torch_batchnorm(sync_cls):
    assert isinstance(sync_cls(3), _BatchNorm)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, None])
def test_device_and_dtype_arguments(device, dtype):
    module = syncbn.SyncBatchNorm2d(3, device=device, dtype=dtype)
    reference = nn.BatchNorm2d(3, device=device, dtype=dtype)
    got = {k: (v.dtype, v.device, v.shape) for k, v in module.state_dict().items()}
    assert got == {k: (v.dtype, v.device, v.shape) for k, v in reference.state_dict().items()}
    assert module.weight.dtype == (dtype or torch.float32) and module.weight.device.type == device
    assert module.num_batches_tracked.dtype == torch.long


@pair_params
@config_params
def test_state_dict_keys_and_dtypes_equal_torch(sync_cls, torch_cls, shape, config):
    module, reference = sync_cls(4, **config), torch_cls(4, **config)
    got = {k: (v.dtype, v.shape) for k, v in module.state_dict().items()}
    assert got == {k: (v.dtype, v.shape) for k, v in reference.state_dict().items()}
    assert list(module.state_dict()) == list(reference.state_dict())


@pair_params
@config_params
def test_state_dict_loads_both_ways(sync_cls, torch_cls, shape, config, assert_state_equal):
    module, reference = make_pair(sync_cls, torch_cls, config)  # torch -> SyncBN (strict)
    assert_state_equal(module, reference)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.add_(1)
    fresh = torch_cls(4, **config)
    fresh.load_state_dict(module.state_dict(), strict=True)  # SyncBN -> torch (strict)
    assert_state_equal(fresh, module)


def test_old_state_dict_without_num_batches_tracked_loads_like_torch(assert_state_equal):
    old = nn.BatchNorm2d(3).state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1  # checkpoints from before num_batches_tracked existed
    module, reference = syncbn.SyncBatchNorm2d(3), nn.BatchNorm2d(3)
    module.load_state_dict(old, strict=True)
    reference.load_state_dict(old, strict=True)
    assert_state_equal(module, reference)


@pytest.mark.parametrize(
    "sync_cls, torch_cls, bad_dims",
    [
        (syncbn.SyncBatchNorm1d, nn.BatchNorm1d, [1, 4, 5]),
        (syncbn.SyncBatchNorm2d, nn.BatchNorm2d, [2, 3, 5]),
        (syncbn.SyncBatchNorm3d, nn.BatchNorm3d, [2, 3, 4, 6]),
        (syncbn.SyncBatchNorm, nn.SyncBatchNorm, [1, 0]),
    ],
)
def test_input_dimension_errors_equal_torch(sync_cls, torch_cls, bad_dims):
    for dims in bad_dims:
        x = torch.randn([2] * dims)
        with pytest.raises(ValueError) as expected:
            torch_cls(2)._check_input_dim(x)  # nn.SyncBatchNorm refuses CPU input in forward
        with pytest.raises(ValueError) as actual:
            sync_cls(2)(x)
        assert str(actual.value) == str(expected.value)
    with pytest.raises(ValueError, match=r"^expected 4D input \(got 3D input\)$"):
        syncbn.SyncBatchNorm2d(2)(torch.randn(2, 2, 2))


# --- outside a synchronized context: exactly nn.BatchNormNd ----------------------------


@pair_params
@config_params
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_unsynchronized_is_bit_identical_to_torch(sync_cls, torch_cls, shape, config, mode, run_step):
    module, reference = make_pair(sync_cls, torch_cls, config)
    module.train(mode == "train")
    reference.train(mode == "train")
    dtype = config.get("dtype", torch.float32)
    for _ in range(3):  # several steps: the running averages (and momentum=None's 1/n) evolve
        x = torch.randn(6, *shape, dtype=dtype)
        cotangent = torch.randn_like(x)
        assert_identical(run_step(module, x, cotangent), run_step(reference, x, cotangent))
        for (name, got), want in zip(module.state_dict().items(), reference.state_dict().values(), strict=True):
            assert torch.equal(got, want), name


@pair_params
def test_unsynchronized_zero_size_batch_is_identical(sync_cls, torch_cls, shape, run_step):
    module, reference = make_pair(sync_cls, torch_cls, {})
    x = torch.randn(0, *shape)
    assert_identical(run_step(module, x, torch.randn_like(x)), run_step(reference, x, torch.randn_like(x)))
    assert module.num_batches_tracked.item() == reference.num_batches_tracked.item() == 1
    assert torch.equal(module.running_mean, reference.running_mean)


@pytest.mark.parametrize("track_running_stats, training", [(True, True), (False, True), (False, False)])
def test_unsynchronized_single_value_per_channel_raises_like_torch(track_running_stats, training):
    x = torch.randn(1, 4)
    errors = []
    for cls in (nn.BatchNorm1d, syncbn.SyncBatchNorm1d):
        with pytest.raises(ValueError) as error:
            cls(4, track_running_stats=track_running_stats).train(training)(x)
        errors.append(str(error.value))
    assert errors[1] == errors[0]
    assert errors[0].startswith("Expected more than 1 value per channel when training")


def test_unsynchronized_channels_last_and_bfloat16_match_torch(run_step):
    module, reference = make_pair(syncbn.SyncBatchNorm2d, nn.BatchNorm2d, {})
    x = torch.randn(4, 4, 3, 5).to(memory_format=torch.channels_last)
    assert_identical(run_step(module, x, torch.ones_like(x)), run_step(reference, x, torch.ones_like(x)))
    x = x.bfloat16()
    assert_identical(run_step(module, x, torch.ones_like(x)), run_step(reference, x, torch.ones_like(x)))


def test_every_layer_and_every_copy_has_its_own_key():
    # The key is how the compiled processes way finds a layer (its name, its call counts):
    # a copy shares neither with its original.
    import pickle

    from syncbn.synchronized import LAYER_KEY_ATTRIBUTE, layer_key, layer_with_key

    net = syncbn.convert_model(nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3), syncbn.SyncBatchNorm2d(3)))
    copies = [copy.deepcopy(net), pickle.loads(pickle.dumps(net))]
    layers = [*net, *(layer for other in copies for layer in other)]
    keys = [layer_key(layer) for layer in layers]
    assert len(set(keys)) == len(layers) == 9 and 0 not in keys
    assert all(layer_with_key(key) is layer for key, layer in zip(keys, layers, strict=True))
    assert layer_key(None) == 0 and layer_with_key(0) is None
    assert all(LAYER_KEY_ATTRIBUTE not in layer.__dict__ for layer in syncbn.revert_model(copies[0]))
