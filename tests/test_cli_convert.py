"""`syncbn convert`, `inspect` and `revert` through the CLI, checked through the library.

Each command runs in-process (typer's CliRunner); what it wrote is loaded back strictly
into the plain-BN and the SyncBN architecture and compared with the source weights.
Every bad input must exit 2 with one ``error: ...`` line on stderr and leave no file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

import syncbn
from sample_models.mixed import mixed_net
from sample_models.resnet import resnet_tiny
from syncbn_cli.io import read_syncbn_metadata
from syncbn_cli.main import app

RESNET = "sample_models.resnet:resnet_tiny"
MIXED = "sample_models.mixed:mixed_net"
RESNET_BN = [
    "stem.1",
    "layer1.bn1",
    "layer1.bn2",
    "layer2.bn1",
    "layer2.bn2",
    "layer2.shortcut.1",
    "layer3.bn1",
    "layer3.bn2",
    "layer3.shortcut.1",
]
# A user's own model file, used as a file-path factory (path/to/models.py:fn).
MODELS_PY = """
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def no_batch_norm():
    return nn.Sequential(nn.Linear(4, 2))


def raising():
    raise RuntimeError("weights server unreachable")


def not_a_module():
    return {"layers": 3}


NOT_CALLABLE = 3


def warns():
    import warnings

    warnings.warn("this factory is deprecated", UserWarning, stacklevel=1)
    return build()
"""
# Wide enough that rich never folds a name in a table cell.
runner = CliRunner(env={"COLUMNS": "200"})


def invoke(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def trained_state(factory) -> dict[str, torch.Tensor]:
    """The state dict of ``factory()`` after perturbed weights and one training forward: no defaults left."""
    torch.manual_seed(0)
    model = factory()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.train()
    model(torch.randn(4, *factory.input_shape))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    return trained_state(resnet_tiny)


@pytest.fixture
def work(tmp_path: Path, resnet_state) -> Path:
    """tmp_path with ``model.pt`` (resnet_tiny's state dict), ``models.py`` and an empty ``out/``."""
    torch.save(resnet_state, tmp_path / "model.pt")
    (tmp_path / "models.py").write_text(MODELS_PY)
    (tmp_path / "out").mkdir()
    return tmp_path


def assert_loads_strictly_everywhere(path: Path, source: dict[str, torch.Tensor], factory=resnet_tiny) -> None:
    """``path`` loads strictly into the plain and the converted model and equals ``source``."""
    written = load_file(str(path))
    assert sorted(written) == sorted(source)
    for key, tensor in source.items():
        assert written[key].dtype == tensor.dtype, key
        torch.testing.assert_close(written[key], tensor, rtol=0, atol=0, msg=key)
    factory().load_state_dict(written, strict=True)
    converted = syncbn.convert_model(factory())
    converted.load_state_dict(written, strict=True)
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in source.items())


def assert_bad_input(result, message: str | None = None, *, contains: tuple[str, ...] = ()) -> None:
    """Exit 2, one ``error: ...`` line on stderr (equal to ``message`` if given), no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    if message is not None:
        assert result.stderr == f"error: {message}\n"
    for text in contains:
        assert text in result.stderr, (text, result.stderr)


def files_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# ------------------------------------------------------------------------------- convert


def test_convert_writes_safetensors_that_load_into_both_architectures(work, resnet_state):
    out = work / "out" / "resnet.safetensors"
    result = invoke("convert", work / "model.pt", "--factory", RESNET, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stderr == f"wrote 56 tensors to {out}; 9 layers converted\n"
    assert f"9 BatchNorm layers converted ({work / 'model.pt'})" in result.stdout
    assert "│ layer2.shortcut.1 │ BatchNorm2d │ SyncBatchNorm2d │ 16       │ 1e-05 │ 0.1      │ yes    │ yes" in (
        result.stdout
    )
    assert files_in(work / "out") == ["resnet.safetensors"]
    assert_loads_strictly_everywhere(out, resnet_state)
    assert read_syncbn_metadata(out) == {
        "syncbn_version": syncbn.__version__,
        "source": "model.pt",
        "factory": RESNET,
        "model_class": "sample_models.resnet.ResNetTiny",
        "converted_layers": [{"name": name, "from": "BatchNorm2d", "to": "SyncBatchNorm2d"} for name in RESNET_BN],
    }


def test_convert_default_output_is_next_to_the_source(work, resnet_state):
    result = invoke("convert", work / "model.pt", "--factory", RESNET)
    assert result.exit_code == 0, result.output
    assert_loads_strictly_everywhere(work / "model.syncbn.safetensors", resnet_state)


def test_convert_keeps_every_kind_of_batch_norm(work):
    """BN1d/2d, momentum=None, affine=False, bias=False and a fused-activation subclass."""
    state = trained_state(mixed_net)
    torch.save(state, work / "mixed.pt")
    out = work / "out" / "mixed.safetensors"
    result = invoke("convert", work / "mixed.pt", "--factory", MIXED, "-o", out)
    assert result.exit_code == 0, result.output
    assert "│ bn_act        │ BatchNormAct2d │ SynchronizedBatchNormAct2d │" in result.stdout
    assert "│ cumulative_bn │ BatchNorm2d    │ SyncBatchNorm2d            │ 8        │ 1e-05 │ None     │" in (
        result.stdout
    )
    assert_loads_strictly_everywhere(out, state, factory=mixed_net)
    converted = {layer["name"]: layer["to"] for layer in read_syncbn_metadata(out)["converted_layers"]}
    assert converted["bn_act"] == "SynchronizedBatchNormAct2d"
    assert converted["head_bn"] == "SyncBatchNorm1d"


def test_convert_json_is_one_document(work):
    out = work / "out" / "resnet.safetensors"
    result = invoke("convert", work / "model.pt", "--factory", RESNET, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["output"] == str(out)
    assert document["factory"] == RESNET
    assert document["tensors"] == 56
    assert [layer["name"] for layer in document["layers"]] == RESNET_BN
    assert document["layers"][0] == {
        "name": "stem.1",
        "from": "BatchNorm2d",
        "to": "SyncBatchNorm2d",
        "num_features": 8,
        "eps": 1e-05,
        "momentum": 0.1,
        "affine": True,
        "track_running_stats": True,
    }


def test_convert_reads_safetensors_input(work, resnet_state):
    save_file(resnet_state, str(work / "model.safetensors"))
    out = work / "out" / "resnet.safetensors"
    result = invoke("convert", work / "model.safetensors", "--factory", RESNET, "-o", out)
    assert result.exit_code == 0, result.output
    assert_loads_strictly_everywhere(out, resnet_state)


@pytest.fixture(scope="module")
def optimizer() -> torch.optim.Optimizer:
    """An SGD optimizer with momentum buffers, as a training checkpoint saves it beside the weights."""
    model = resnet_tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize(
    "layout, args",
    [
        ("state_dict", ()),
        ("model", ()),
        ("model_state_dict", ()),
        ("weights", ("--key", "weights")),
        ("module.", ()),
        ("model + module.", ()),
    ],
)
def test_convert_real_training_checkpoints(work, resnet_state, optimizer, layout, args):
    prefixed = {f"module.{k}": v for k, v in resnet_state.items()}
    checkpoint = {
        "state_dict": {"state_dict": resnet_state, "optimizer": optimizer.state_dict(), "epoch": 7},
        "model": {"model": resnet_state, "optimizer": optimizer.state_dict(), "epoch": 7, "best_acc": 0.5},
        "model_state_dict": {"model_state_dict": resnet_state, "optimizer_state_dict": optimizer.state_dict()},
        "weights": {"weights": resnet_state, "ema": {"decay": 0.999}, "epoch": 7},
        "module.": prefixed,
        "model + module.": {"model": prefixed, "optimizer": optimizer.state_dict(), "epoch": 7},
    }[layout]
    torch.save(checkpoint, work / "checkpoint.pt")
    out = work / "out" / "converted.safetensors"
    result = invoke("convert", work / "checkpoint.pt", "--factory", RESNET, "-o", out, *args)
    assert result.exit_code == 0, result.output
    assert_loads_strictly_everywhere(out, resnet_state)


def test_convert_file_path_factory(work):
    spec = importlib.util.spec_from_file_location("user_models", work / "models.py")
    user_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user_models)
    user_models.build.input_shape = (4,)
    state = trained_state(user_models.build)
    torch.save(state, work / "mlp.pt")
    out = work / "out" / "mlp.safetensors"
    result = invoke("convert", work / "mlp.pt", "--factory", f"{work / 'models.py'}:build", "-o", out)
    assert result.exit_code == 0, result.output
    assert_loads_strictly_everywhere(out, state, factory=user_models.build)
    assert read_syncbn_metadata(out)["converted_layers"] == [
        {"name": "1", "from": "BatchNorm1d", "to": "SyncBatchNorm1d"}
    ]


def test_convert_pickled_model_only_with_trust_pickle(work, resnet_state):
    model = resnet_tiny()
    model.load_state_dict(resnet_state)
    torch.save(model, work / "whole.pt")
    out = work / "out" / "whole.safetensors"

    refused = invoke("convert", work / "whole.pt", "-o", out)
    assert_bad_input(
        refused,
        f"{work / 'whole.pt'} holds a pickled sample_models.resnet.ResNetTiny (a whole object, not a state dict); "
        "it was not loaded because unpickling runs arbitrary code. If you trust the file, pass --trust-pickle; "
        "safer, save model.state_dict() and pass --factory MOD:FN",
    )
    assert files_in(work / "out") == []

    trusted = invoke("convert", work / "whole.pt", "-o", out, "--trust-pickle")
    assert trusted.exit_code == 0, trusted.output
    assert_loads_strictly_everywhere(out, resnet_state)
    metadata = read_syncbn_metadata(out)
    assert metadata["factory"] is None
    assert metadata["model_class"] == "sample_models.resnet.ResNetTiny"


def test_convert_pickled_data_parallel_model_saves_the_inner_keys(work, resnet_state):
    model = resnet_tiny()
    model.load_state_dict(resnet_state)
    torch.save({"model": nn.DataParallel(model), "epoch": 3}, work / "whole.pt")
    out = work / "out" / "whole.safetensors"
    result = invoke("convert", work / "whole.pt", "-o", out, "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert_loads_strictly_everywhere(out, resnet_state)


def test_output_exists_needs_force(work, resnet_state):
    out = work / "out" / "resnet.safetensors"
    out.write_bytes(b"precious")
    refused = invoke("convert", work / "model.pt", "--factory", RESNET, "-o", out)
    assert_bad_input(refused, f"{out} exists; pass --force to overwrite it")
    assert out.read_bytes() == b"precious"
    assert files_in(work / "out") == ["resnet.safetensors"]

    forced = invoke("convert", work / "model.pt", "--factory", RESNET, "-o", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert files_in(work / "out") == ["resnet.safetensors"]
    assert_loads_strictly_everywhere(out, resnet_state)


@pytest.mark.slow
def test_python_dash_m_converts_like_the_console_script(work, resnet_state):
    out = work / "out" / "resnet.safetensors"
    command = [sys.executable, "-m", "syncbn_cli", "convert", "model.pt", "--factory", RESNET, "-o", str(out)]
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"wrote 56 tensors to {out}; 9 layers converted\n"
    assert "layer3.shortcut.1" in result.stdout
    assert_loads_strictly_everywhere(out, resnet_state)

    command[4] = "nothing.pt"
    missing = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 2
    assert missing.stderr == "error: nothing.pt: no such file\n"


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory, resnet_state) -> Path:
    """A directory with one file for each way a checkpoint can be wrong."""
    directory = tmp_path_factory.mktemp("bad_sources")
    torch.save(resnet_state, directory / "good.pt")
    whole = (directory / "good.pt").read_bytes()
    (directory / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (directory / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    (directory / "random.safetensors").write_bytes(random.Random(0).randbytes(4096))
    (directory / "empty.pt").write_bytes(b"")
    (directory / "text.pt").write_text("root:x:0:0:root:/root:/bin/bash\n")  # no pickle at all
    save_file(resnet_state, str(directory / "good.safetensors"))
    whole = (directory / "good.safetensors").read_bytes()
    (directory / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    torch.save([1, 2, 3], directory / "list.pt")
    torch.save({"epoch": 3, "lr": 0.1}, directory / "no_tensors.pt")
    torch.save({}, directory / "empty_dict.pt")
    missing = {k: v for k, v in resnet_state.items() if not k.startswith("layer3.bn2.")}
    torch.save(missing, directory / "missing.pt")
    torch.save({**resnet_state, "extra.weight": torch.zeros(2)}, directory / "unexpected.pt")
    torch.save({**resnet_state, "head.weight": torch.zeros(5, 32)}, directory / "misshapen.pt")
    (directory / "a_directory.pt").mkdir()
    return directory


BAD_SOURCES = [
    ("nothing.pt", (), "{d}/nothing.pt: no such file"),
    ("a_directory.pt", (), "{d}/a_directory.pt is not a file"),
    (
        "truncated.pt",
        (),
        "cannot read {d}/truncated.pt as a PyTorch checkpoint: the file is truncated or not a torch.save file",
    ),
    (
        "random.pt",
        (),
        "cannot read {d}/random.pt as a PyTorch checkpoint: the file is truncated or not a torch.save file",
    ),
    (
        "empty.pt",
        (),
        "cannot read {d}/empty.pt as a PyTorch checkpoint: the file is truncated or not a torch.save file",
    ),
    (
        "text.pt",
        (),
        "cannot read {d}/text.pt as a PyTorch checkpoint: the file is truncated or not a torch.save file",
    ),
    (
        "random.safetensors",
        (),
        "cannot read {d}/random.safetensors as safetensors (Error while deserializing header: header too large): "
        "the file is truncated or not a safetensors file",
    ),
    (
        "truncated.safetensors",
        (),
        "cannot read {d}/truncated.safetensors as safetensors (Error while deserializing header: incomplete "
        "metadata, file not fully covered): the file is truncated or not a safetensors file",
    ),
    ("list.pt", (), "{d}/list.pt is not a checkpoint: it holds a list, not a state dict"),
    (
        "no_tensors.pt",
        (),
        "{d}/no_tensors.pt is not a state dict and none of its keys (epoch, lr) holds one; "
        "pass --key NAME to say where the weights are",
    ),
    ("empty_dict.pt", (), "{d}/empty_dict.pt is not a checkpoint: it holds an empty dict"),
    ("no_tensors.pt", ("--key", "weights"), "{d}/no_tensors.pt has no key 'weights'; its keys: epoch, lr"),
    ("no_tensors.pt", ("--key", "epoch"), "{d}/no_tensors.pt: 'epoch' does not hold a state dict of tensors"),
    (
        "missing.pt",
        (),
        "{d}/missing.pt does not fit the factory's model: missing keys: layer3.bn2.weight, layer3.bn2.bias, "
        "layer3.bn2.running_mean, layer3.bn2.running_var. Is --factory the right architecture?",
    ),
    (
        "unexpected.pt",
        (),
        "{d}/unexpected.pt does not fit the factory's model: unexpected keys: extra.weight. "
        "Is --factory the right architecture?",
    ),
    (
        "misshapen.pt",
        (),
        "{d}/misshapen.pt does not fit the factory's model: shape mismatches (file vs model): "
        "head.weight (5, 32) vs (10, 32). Is --factory the right architecture?",
    ),
]


@pytest.mark.parametrize("command", ["convert", "revert"])
@pytest.mark.parametrize("name, args, message", BAD_SOURCES, ids=[f"{n}{' '.join(a)}" for n, a, _ in BAD_SOURCES])
def test_bad_sources(bad_sources, tmp_path, command, name, args, message):
    before = files_in(bad_sources)
    result = invoke(command, bad_sources / name, "--factory", RESNET, "-o", tmp_path / "converted.safetensors", *args)
    assert_bad_input(result, message.format(d=bad_sources))
    assert files_in(tmp_path) == []
    assert files_in(bad_sources) == before


def test_state_dict_without_architecture(work):
    result = invoke("convert", work / "model.pt")
    assert_bad_input(
        result,
        f"{work / 'model.pt'} holds a state dict (56 tensors) but no architecture: "
        "pass --factory MOD:FN naming a function that builds the model",
    )
    assert files_in(work) == ["model.pt", "models.py", "out"]


@pytest.mark.parametrize(
    "factory, message",
    [
        (
            "sample_models.resnet",
            "--factory expects MOD:FN, e.g. sample_models.resnet:resnet_tiny (got 'sample_models.resnet')",
        ),
        (":resnet_tiny", None),
        ("no_such_package.models:build", None),
        ("sample_models.resnet:resnet_huge", None),
        ("{d}/models.py:raising", "factory {d}/models.py:raising raised RuntimeError: weights server unreachable"),
        ("{d}/models.py:not_a_module", "factory {d}/models.py:not_a_module returned dict, expected a torch.nn.Module"),
        ("{d}/nowhere.py:build", "factory file {d}/nowhere.py does not exist"),
        (
            "{d}/models.py:NOT_CALLABLE",
            "{d}/models.py:NOT_CALLABLE is not callable (it is a int): "
            "--factory names a function that builds the model",
        ),
    ],
)
def test_bad_factories(work, factory, message):
    factory = factory.format(d=work)
    result = invoke("convert", work / "model.pt", "--factory", factory, "-o", work / "out" / "x.safetensors")
    assert_bad_input(result, None if message is None else message.format(d=work))
    assert files_in(work / "out") == []


def test_missing_module_names_what_to_do(work):
    result = invoke("inspect", "--factory", "no_such_package.models:build")
    assert_bad_input(
        result,
        "cannot import no_such_package.models (No module named 'no_such_package'); run from the directory that "
        "contains it, or pass a file path such as path/to/models.py:build",
    )


def test_missing_function_lists_what_is_there(work):
    result = invoke("inspect", "--factory", "sample_models.resnet:resnet_huge")
    assert_bad_input(result, contains=("sample_models.resnet has no function 'resnet_huge'", "resnet_tiny"))


def test_model_without_batch_norm_is_refused(work):
    torch.save(nn.Sequential(nn.Linear(4, 2)).state_dict(), work / "linear.pt")
    result = invoke("convert", work / "linear.pt", "--factory", f"{work / 'models.py'}:no_batch_norm")
    assert_bad_input(result, f"{work / 'linear.pt'} has no BatchNorm layers: nothing to convert, no file written")
    assert not (work / "linear.syncbn.safetensors").exists()


def test_already_synchronized_model_is_refused(work):
    torch.save(syncbn.convert_model(resnet_tiny()), work / "synced.pt")
    result = invoke("convert", work / "synced.pt", "--trust-pickle", "-o", work / "out" / "x.safetensors")
    assert_bad_input(
        result,
        f"all 9 BatchNorm layers of {work / 'synced.pt'} already synchronize: nothing to convert, no file written",
    )
    assert files_in(work / "out") == []


@pytest.mark.parametrize(
    "output, message",
    [
        (
            "missing_dir/x.safetensors",
            "cannot write {d}/missing_dir/x.safetensors: directory {d}/missing_dir does not exist",
        ),
        ("out", "{d}/out is a directory; name the output file, e.g. {d}/out/model.syncbn.safetensors"),
        ("out/x.pt", "convert writes safetensors: name the output *.safetensors (got {d}/out/x.pt)"),
        # The suffix is checked first: asking for --force would not have helped.
        ("model.pt", "convert writes safetensors: name the output *.safetensors (got {d}/model.pt)"),
    ],
)
def test_bad_outputs(work, output, message):
    result = invoke("convert", work / "model.pt", "--factory", RESNET, "-o", work / output)
    assert_bad_input(result, message.format(d=work))
    assert files_in(work / "out") == []
    assert not (work / "missing_dir").exists()


def test_factory_and_trust_pickle_exclude_each_other(work):
    result = invoke("convert", work / "model.pt", "--factory", RESNET, "--trust-pickle")
    assert_bad_input(result, "--factory and --trust-pickle exclude each other: a factory builds the model itself")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_source(work):
    (work / "model.pt").chmod(0)
    result = invoke("convert", work / "model.pt", "--factory", RESNET)
    assert_bad_input(result, f"cannot open {work / 'model.pt'}: Permission denied")


# ------------------------------------------------------------------------------- inspect


def test_inspect_lists_layers_and_what_they_convert_to(work):
    result = invoke("inspect", work / "model.pt", "--factory", RESNET)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"BatchNorm layers of {RESNET} with")
    assert "│ layer2.shortcut.1 │ BatchNorm2d │ 16       │ 1e-05 │ 0.1      │ yes    │ yes     │ SyncBatchNorm2d │" in (
        result.stdout
    )
    assert result.stdout.endswith("9 BatchNorm layers, 9 convert\n")


def test_inspect_without_source_shows_the_factory_model(work):
    result = invoke("inspect", "--factory", MIXED, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["source"] is None
    assert document["model_class"] == "sample_models.mixed.MixedNet"
    layers = {layer["name"]: layer for layer in document["layers"]}
    assert layers["bn_act"]["converts_to"] == "SynchronizedBatchNormAct2d"
    assert layers["cumulative_bn"]["momentum"] is None
    assert layers["plain_bn"]["affine"] is False
    assert layers["no_bias_bn"]["bias"] is False


def test_inspect_with_nothing_shows_the_bundled_sample(work):
    result = invoke("inspect")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"no SRC or --factory given: inspecting the bundled sample model {MIXED}")
    assert "7 BatchNorm layers, 7 convert" in result.stdout


def test_inspect_shows_already_synchronized_layers(work):
    torch.save(syncbn.convert_model(resnet_tiny()), work / "synced.pt")
    result = invoke("inspect", work / "synced.pt", "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert (
        "│ stem.1            │ SyncBatchNorm2d │ 8        │ 1e-05 │ 0.1      │ yes    │ yes     │ already synchronized"
        in (result.stdout)
    )
    assert "9 BatchNorm layers, 0 convert, 9 already synchronized" in result.stdout


def test_inspect_reads_what_convert_recorded(work):
    out = work / "out" / "resnet.safetensors"
    assert invoke("convert", work / "model.pt", "--factory", RESNET, "-o", out).exit_code == 0

    alone = invoke("inspect", out)
    assert alone.exit_code == 0, alone.output
    assert alone.stdout.startswith(
        f"{out}: converted by syncbn {syncbn.__version__} from model.pt (model {RESNET}); 9 layers converted\n"
        "Layers converted, as recorded in"
    )
    assert "│ layer3.shortcut.1 │ BatchNorm2d │ SyncBatchNorm2d │" in alone.stdout
    assert alone.stderr == "pass --factory MOD:FN to see each layer's configuration\n"

    with_factory = invoke("inspect", out, "--factory", RESNET, "--json")
    assert with_factory.exit_code == 0, with_factory.output
    document = json.loads(with_factory.stdout)
    assert document["syncbn_metadata"] == read_syncbn_metadata(out)
    assert [layer["name"] for layer in document["layers"]] == RESNET_BN


def test_inspect_shows_frozen_layers_and_layers_kept_in_eval_mode(work):
    # The detection backbone: a FrozenBatchNorm2d stem and layer1, layer2 kept in eval mode.
    result = invoke("inspect", "--factory", "sample_models.zoo:detection_backbone", "--json")
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert [name for name, layer in layers.items() if layer["frozen"]] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    assert layers["bn1"]["kind"] == "FrozenBatchNorm2d" and layers["bn1"]["converts_to"] is None
    assert [name for name, layer in layers.items() if layer["eval_mode"]] == [
        "layer2.0.bn1",
        "layer2.0.bn2",
        "layer2.0.downsample.1",
    ]
    table = invoke("inspect", "--factory", "sample_models.zoo:detection_backbone")
    assert "│ bn1                   │ FrozenBatchNorm2d │ 4        │ 1e-05 │ -        │" in table.stdout
    assert "SyncBatchNorm2d (kept in eval mode: no sync)" in table.stdout
    assert table.stdout.endswith(
        "6 BatchNorm layers, 6 convert, 3 kept in eval mode while the model trains (running statistics: no sync), "
        "and 3 frozen (fixed statistics, left as they are)\n"
    )


def test_inspect_marks_no_layer_of_a_training_model_frozen_or_in_eval(work):
    result = invoke("inspect", "--factory", RESNET, "--json")
    layers = json.loads(result.stdout)["layers"]
    assert [layer["name"] for layer in layers] == RESNET_BN
    assert not any(layer["frozen"] or layer["eval_mode"] for layer in layers)


def test_convert_leaves_frozen_layers_out_of_its_layer_list():
    from sample_models.zoo import detection_backbone

    model = detection_backbone()
    assert [layer.name for layer in syncbn.inventory.batch_norm_layers(model)][:1] == ["layer2.0.bn1"]
    assert len(syncbn.inventory.batch_norm_layers(model, frozen=True)) == 9


def test_inspect_bad_input(work):
    assert_bad_input(invoke("inspect", work / "nothing.pt"), f"{work / 'nothing.pt'}: no such file")


# -------------------------------------------------------------------------------- revert


def test_revert_converted_file_to_a_torch_state_dict(work, resnet_state):
    converted = work / "out" / "resnet.safetensors"
    assert invoke("convert", work / "model.pt", "--factory", RESNET, "-o", converted).exit_code == 0
    out = work / "out" / "plain.pt"
    result = invoke("revert", converted, "--factory", RESNET, "-o", out)
    assert result.exit_code == 0, result.output
    assert "│ layer3.shortcut.1 │ SyncBatchNorm2d │ BatchNorm2d │ 32       │" in result.stdout
    assert result.stderr == f"wrote 56 tensors to {out}; 9 layers reverted to plain BatchNorm\n"
    reverted = torch.load(out, weights_only=True)
    plain = resnet_tiny()
    plain.load_state_dict(reverted, strict=True)
    for key, tensor in resnet_state.items():
        assert torch.equal(plain.state_dict()[key], tensor), key


def test_revert_pickled_syncbn_model_to_safetensors(work, resnet_state):
    model = syncbn.convert_model(resnet_tiny())
    model.load_state_dict(resnet_state)
    torch.save(model, work / "synced.pt")
    out = work / "out" / "plain.safetensors"
    result = invoke("revert", work / "synced.pt", "--trust-pickle", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["layers"][0] == {
        "name": "stem.1",
        "from": "SyncBatchNorm2d",
        "to": "BatchNorm2d",
        "num_features": 8,
    }
    assert_loads_strictly_everywhere(out, resnet_state)
    metadata = read_syncbn_metadata(out)
    assert "converted_layers" not in metadata
    assert len(metadata["reverted_layers"]) == 9


def test_revert_plain_model_has_nothing_to_revert(work):
    result = invoke("revert", work / "model.pt", "--factory", RESNET, "-o", work / "out" / "plain.pt")
    assert_bad_input(
        result,
        f"nothing to revert: no BatchNorm layer of {work / 'model.pt'} synchronizes, nor does the file record a "
        "conversion by `syncbn convert`; no file written",
    )
    assert files_in(work / "out") == []


def test_revert_needs_an_output(work):
    result = invoke("revert", work / "model.pt", "--factory", RESNET)
    assert result.exit_code == 2
    assert "Missing option '--output' / '-o'" in result.stderr


def test_revert_output_exists_needs_force(work):
    (work / "out" / "plain.pt").write_bytes(b"precious")
    result = invoke("revert", work / "model.pt", "--factory", RESNET, "-o", work / "out" / "plain.pt")
    assert_bad_input(result, f"{work / 'out' / 'plain.pt'} exists; pass --force to overwrite it")
    assert (work / "out" / "plain.pt").read_bytes() == b"precious"


def test_convert_and_revert_keep_each_tensors_dtype(work):
    half = {
        key: value.half() if value.is_floating_point() else value for key, value in trained_state(resnet_tiny).items()
    }
    half["head.bias"] = half["head.bias"].double()  # mixed dtypes stay mixed
    torch.save(half, work / "half.pt")
    result = invoke("convert", work / "half.pt", "--factory", RESNET, "-o", work / "out" / "half.safetensors")
    assert result.exit_code == 0, result.output
    written = load_file(str(work / "out" / "half.safetensors"))
    assert {key: value.dtype for key, value in written.items()} == {key: value.dtype for key, value in half.items()}
    assert all(torch.equal(written[key], value) for key, value in half.items())
    result = invoke("revert", work / "out" / "half.safetensors", "--factory", RESNET, "-o", work / "out" / "plain.pt")
    assert result.exit_code == 0, result.output
    reverted = torch.load(work / "out" / "plain.pt", weights_only=True)
    assert {key: value.dtype for key, value in reverted.items()} == {key: value.dtype for key, value in half.items()}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_honour_the_umask_and_force_keeps_the_mode(work, umask):
    out = work / "out" / "resnet.safetensors"
    previous = os.umask(umask)
    try:
        result = invoke("convert", work / "model.pt", "--factory", RESNET, "-o", out)
        assert result.exit_code == 0, result.output
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask
        reverted = work / "out" / "plain.pt"
        result = invoke("revert", out, "--factory", RESNET, "-o", reverted)
        assert result.exit_code == 0, result.output
        assert reverted.stat().st_mode & 0o777 == 0o666 & ~umask
        out.chmod(0o640)
        result = invoke("convert", work / "model.pt", "--factory", RESNET, "-o", out, "--force")
        assert result.exit_code == 0, result.output
        assert out.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)


DISK_FULL = [
    OSError(28, "No space left on device"),
    # What safetensors and torch.save raise when the disk fills under them.
    pytest.param("SafetensorError", id="SafetensorError"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: file write failed"),
]


@pytest.mark.parametrize("failure", DISK_FULL, ids=["OSError", "SafetensorError", "torch.save RuntimeError"])
@pytest.mark.parametrize("command", ["convert", "revert"])
def test_a_full_disk_is_one_line_and_no_file(work, monkeypatch, command, failure):
    from safetensors import SafetensorError

    from syncbn_cli import io

    if failure == "SafetensorError":
        failure = SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    def write_half_then_fail(*args, **kwargs):
        target = args[1] if len(args) > 1 else kwargs.get("filename", kwargs.get("f"))
        Path(target).write_bytes(b"half a file")
        raise failure

    torch.save(syncbn.convert_model(resnet_tiny()), work / "synced.pt")
    monkeypatch.setattr(io, "save_file", write_half_then_fail)
    monkeypatch.setattr(io.torch, "save", write_half_then_fail)
    if command == "convert":
        out = work / "out" / "resnet.safetensors"
        result = invoke("convert", work / "model.pt", "--factory", RESNET, "-o", out)
    else:
        out = work / "out" / ("plain.pt" if isinstance(failure, RuntimeError) else "plain.safetensors")
        result = invoke("revert", work / "synced.pt", "--trust-pickle", "-o", out)
    assert_bad_input(result, contains=(f"cannot write {out}: ", "; no file written"))
    assert files_in(work / "out") == []


def test_inspect_json_true_says_flags_take_no_value(work):
    result = invoke("inspect", "--json", "true")
    assert_bad_input(result, "true: no such file; flags take no value (write --json, not --json true)")


def test_warnings_print_one_line_without_source(work):
    result = invoke("inspect", "--factory", f"{work / 'models.py'}:warns")
    assert result.exit_code == 0, result.output
    assert "warning: this factory is deprecated\n" in result.stderr
    assert "warnings.warn" not in result.stderr and "models.py" not in result.stderr
