"""A user's whole path: save a checkpoint, convert it, load it both ways, verify it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import syncbn
from sample_models.mixed import mixed_net
from syncbn_cli.main import app

FACTORY = "sample_models.mixed:mixed_net"
runner = CliRunner()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    original = mixed_net()
    torch.save({"epoch": 3, "state_dict": original.state_dict()}, folder / "model.pt")
    result = runner.invoke(app, ["convert", str(folder / "model.pt"), "--factory", FACTORY])
    assert result.exit_code == 0, result.stderr
    return original, folder / "model.syncbn.safetensors"


def test_converted_weights_load_strictly_into_both_architectures(converted):
    original, path = converted
    weights = load_file(str(path))
    plain, synced = mixed_net(), syncbn.convert_model(mixed_net())
    plain.load_state_dict(weights, strict=True)
    synced.load_state_dict(weights, strict=True)
    for key, value in original.state_dict().items():
        assert torch.equal(weights[key], value), key


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_verify_passes_on_the_converted_file_and_unsynced_is_worse(converted, replicas):
    _, path = converted
    result = runner.invoke(app, ["verify", str(path), "--factory", FACTORY, "--replicas", str(replicas), "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["replicas"] == replicas
    synced = max(check["max_rel_err"] for check in report["checks"])
    unsynced = max(check["max_rel_err"] for check in report["unsynced"]["checks"])
    assert unsynced > 100 * synced
