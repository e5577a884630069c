"""syncbn_cli.io: reading checkpoints and factories, writing weights atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sample_models.mlp import mlp_bn1d
from syncbn_cli import factories, io
from syncbn_cli.errors import BadInput

USER_MODELS = """
import dataclasses

from torch import nn


@dataclasses.dataclass
class Config:  # needs its module in sys.modules
    width: int = 6


def build():
    return nn.Sequential(nn.Linear(4, Config().width), nn.BatchNorm1d(Config().width))


build.input_shape = [4]
"""


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_model_from_a_factory_alone():
    loaded = io.load_model(None, "sample_models.mlp:mlp_bn1d")
    assert isinstance(loaded.model, nn.Sequential)
    assert (loaded.source, loaded.factory, loaded.input_shape) == (None, "sample_models.mlp:mlp_bn1d", (32,))


def test_load_model_needs_something():
    with pytest.raises(BadInput, match="no model given: pass a checkpoint file, --factory MOD:FN, or both"):
        io.load_model(None, None)


def test_file_factory_runs_as_a_registered_module(tmp_path):
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    model, input_shape = factories.build_from_factory(f"{tmp_path / 'user_models.py'}:build")
    assert isinstance(model[1], nn.BatchNorm1d)
    assert input_shape == (4,)


def test_factory_module_that_fails_to_import(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_models.py").write_text("raise ImportError('torchvision is too old\\nupgrade it')\n")
    (tmp_path / "needy_models.py").write_text("import no_such_dependency\n")
    with pytest.raises(BadInput) as raised:
        factories.resolve_factory("broken_models:build")
    assert str(raised.value) == "importing broken_models raised ImportError: torchvision is too old upgrade it"
    with pytest.raises(BadInput) as raised:
        factories.resolve_factory("needy_models:build")
    assert (
        str(raised.value)
        == "importing needy_models failed: it needs module 'no_such_dependency', which is not installed"
    )


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    state = state_of(mlp_bn1d())
    torch.save({"model": {prefix + k: v for k, v in state.items()}, "epoch": 1}, tmp_path / "ckpt.pt")
    read = io.read_checkpoint(tmp_path / "ckpt.pt")
    assert list(read) == list(state)


def test_checkpoint_without_num_batches_tracked_loads(tmp_path):
    """Old checkpoints and some exporters lack it; torch fills in 0, and so do we."""
    state = {k: v for k, v in state_of(mlp_bn1d()).items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "old.safetensors"))
    loaded = io.load_model(tmp_path / "old.safetensors", "sample_models.mlp:mlp_bn1d")
    assert loaded.model[1].num_batches_tracked.item() == 0


def test_legacy_torch_save_format(tmp_path):
    state = state_of(mlp_bn1d())
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert list(io.read_checkpoint(tmp_path / "legacy.pt")) == list(state)


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickled_model_is_named_without_unpickling(tmp_path, protocol):
    from sample_models.resnet import resnet_tiny

    torch.save({"model": resnet_tiny(), "epoch": 3}, tmp_path / "whole.pt", pickle_protocol=protocol)
    with pytest.raises(BadInput, match=r"holds a pickled sample_models\.resnet\.ResNetTiny \(a whole object"):
        io.read_checkpoint(tmp_path / "whole.pt")


def test_pickle_protocols_torch_can_and_cannot_read_safely(tmp_path, recwarn):
    state = state_of(mlp_bn1d())
    torch.save(state, tmp_path / "p3.pt", pickle_protocol=3)
    assert list(io.read_checkpoint(tmp_path / "p3.pt")) == list(state)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)], "torch's warning reached the user"
    torch.save(state, tmp_path / "p4.pt", pickle_protocol=4)
    with pytest.raises(BadInput) as raised:
        io.read_checkpoint(tmp_path / "p4.pt")
    assert str(raised.value) == (
        f"{tmp_path / 'p4.pt'} was saved with pickle protocol 4, which torch.load(weights_only=True) cannot read; "
        "save it again with torch.save and the default protocol"
    )


def test_trusted_pickle_that_needs_missing_code(tmp_path):
    (tmp_path / "vanishing.py").write_text("from torch import nn\n\nclass Net(nn.Linear):\n    pass\n")
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("vanishing", tmp_path / "vanishing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vanishing"] = module
    try:
        spec.loader.exec_module(module)
        torch.save(module.Net(2, 2), tmp_path / "net.pt")
    finally:
        del sys.modules["vanishing"]
    with pytest.raises(BadInput) as raised:
        io.read_checkpoint(tmp_path / "net.pt", trust_pickle=True)
    assert str(raised.value) == (
        f"cannot unpickle {tmp_path / 'net.pt'}: No module named 'vanishing'; run where the model's code is "
        "importable, or save model.state_dict() and pass --factory MOD:FN"
    )


def test_save_weights_makes_tensors_savable(tmp_path):
    """Tied (storage-sharing) and non-contiguous tensors, which safetensors refuses as they are."""
    weight = torch.randn(4, 6)
    state = {"a.weight": weight, "b.weight": weight, "c.weight": weight.t()}
    io.save_weights(state, tmp_path / "w.safetensors", {"note": "tied"}, force=False)
    written = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(written[k], v) for k, v in state.items())
    assert io.read_syncbn_metadata(tmp_path / "w.safetensors") == {"note": "tied"}


def test_save_weights_writes_a_torch_state_dict_for_other_suffixes(tmp_path):
    state = state_of(mlp_bn1d())
    io.save_weights(state, tmp_path / "w.pt", {}, force=False)
    written = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(torch.equal(written[k], v) for k, v in state.items())


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, failure):
    (tmp_path / "w.safetensors").write_bytes(b"old")

    def write_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise failure

    monkeypatch.setattr(io, "save_file", write_half_then_fail)
    expected = BadInput if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as raised:
        io.save_weights(state_of(mlp_bn1d()), tmp_path / "w.safetensors", {}, force=True)
    if expected is BadInput:
        assert (
            str(raised.value) == f"cannot write {tmp_path / 'w.safetensors'}: No space left on device; no file written"
        )
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert (tmp_path / "w.safetensors").read_bytes() == b"old"


def test_metadata_of_other_files_is_none(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"syncbn": "not json"})
    assert io.read_syncbn_metadata(tmp_path / "plain.safetensors") is None
    assert io.read_syncbn_metadata(tmp_path / "foreign.safetensors") is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_directory(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(BadInput, match="directory .* is not writable"):
        io.check_writable(tmp_path / "ro" / "w.safetensors", force=False)
