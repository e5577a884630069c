"""`syncbn verify --backend gloo`: R local processes, merged into one report."""

from __future__ import annotations

import json
import textwrap
import time

import pytest
import torch
from typer.testing import CliRunner

from syncbn.launch import ProcessGroupFailure, run_on_processes
from syncbn.verify import verify_model
from syncbn_cli.main import app

runner = CliRunner()
pytestmark = pytest.mark.slow  # gloo rank processes, seconds each


@pytest.mark.parametrize("replicas", [2, 3])
def test_gloo_verify_passes_and_unsynced_differs(replicas):
    result = runner.invoke(
        app,
        ["verify", "--backend", "gloo", "--replicas", str(replicas), "--dtype", "float64", "--steps", "2", "--json"],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["backend"] == "gloo" and report["replicas"] == replicas
    worst_synced = max(check["max_rel_err"] for check in report["checks"])
    worst_unsynced = max(check["max_rel_err"] for check in report["unsynced"]["checks"])
    assert worst_synced < 1e-9 < 1e-3 < worst_unsynced
    assert {layer["name"] for layer in report["layers"]} >= {"stem_bn", "head_bn"}


def test_gloo_verify_with_empty_shards_matches():
    from sample_models.resnet import resnet_tiny

    torch.manual_seed(0)
    report = verify_model(
        resnet_tiny(), (3, 8, 8), replicas=4, batch_size=3, device="cpu", backend="gloo", dtype="float64"
    )
    assert report.passed, report.synced.error
    assert any("empty shards" in warning for warning in report.warnings)


FAILING_FACTORY = """
    import torch
    import torch.distributed as dist
    from torch import nn


    class FailsOnRankOne(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn1 = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            x = self.bn1(self.conv(x))
            if dist.is_initialized() and dist.get_rank() == 1:
                raise RuntimeError("rank 1 fails mid-forward on purpose")
            return self.bn2(x)


    def build():
        return FailsOnRankOne()
"""


def test_rank_raising_mid_forward_exits_nonzero_in_bounded_time(tmp_path):
    factory = tmp_path / "failing.py"
    factory.write_text(textwrap.dedent(FAILING_FACTORY))
    start = time.monotonic()
    result = runner.invoke(
        app,
        ["verify", "--factory", f"{factory}:build", "--input-shape", "3x6x6", "--backend", "gloo", "--replicas", "2"],
    )
    assert time.monotonic() - start < 120
    assert result.exit_code == 1
    assert "rank 1 of 2: RuntimeError: rank 1 fails mid-forward on purpose" in result.stdout
    assert "rank 0 of 2" in result.stdout  # its peer failed too, instead of waiting


def test_run_on_processes_reports_a_stalled_rank():
    def stall(rank, world):
        if rank == 1:
            time.sleep(60)
        torch.distributed.barrier()

    start = time.monotonic()
    with pytest.raises(ProcessGroupFailure) as caught:
        run_on_processes(stall, 2, timeout=3)
    assert time.monotonic() - start < 60
    assert 0 in caught.value.errors and 1 in caught.value.errors


def test_run_on_processes_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend must be one of gloo, nccl"):
        run_on_processes(print, 2, backend="mpi")
    with pytest.raises(ValueError, match="world_size must be at least 1"):
        run_on_processes(print, 0)


SPAWNED_MODULE = """
from torch import nn

from sample_models import example_input


class Doubler(nn.Module):  # a class a fresh interpreter finds only by loading this file
    def forward(self, x):
        return 2 * x


@example_input(3, 6, 6)
def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Doubler())
"""


def test_spawn_refuses_what_cannot_be_pickled():
    class Local(torch.nn.Module):  # defined inside a function: a fresh interpreter cannot find it
        pass

    with pytest.raises(ValueError, match="define the model's classes and functions at module level"):
        run_on_processes(print, 2, args=(Local(),), start_method="spawn")
    with pytest.raises(ValueError, match="start_method must be one of fork, spawn"):
        run_on_processes(print, 2, start_method="forkserver")


def test_spawned_ranks_load_classes_from_a_factory_file(tmp_path):
    import sys

    from syncbn_cli.io import build_from_factory

    (tmp_path / "spawned.py").write_text(textwrap.dedent(SPAWNED_MODULE))
    model, _ = build_from_factory(f"{tmp_path / 'spawned.py'}:build")  # loaded by file path, as --factory does
    doubler = model[2]
    assert type(doubler).__module__ in sys.modules and not type(doubler).__module__.startswith("spawned")
    assert run_on_processes(_doubled_sum, 2, args=(doubler,), start_method="spawn", timeout=60) == [6.0, 6.0]


def _doubled_sum(rank, world, doubler):
    value = doubler(torch.tensor([rank + 1.0]))
    torch.distributed.all_reduce(value)
    return value.item()


def test_verify_starts_nccl_ranks_with_spawn_and_what_it_sends_them_pickles(tmp_path, monkeypatch):
    from syncbn.launch import _Pickled
    from syncbn.verify import processes
    from syncbn_cli.io import build_from_factory

    assert processes.rank_start_method("nccl") == "spawn"
    if not torch.cuda.is_initialized():
        assert processes.rank_start_method("gloo") == "fork"
    sent = []

    def spawn(function, world_size, *, backend, timeout, args, start_method):
        # What the ranks would receive: pickled, then loaded as a fresh interpreter loads it.
        function, args = _Pickled.pack(function, args).unpack()
        sent.append((start_method, function, args))
        raise ProcessGroupFailure({0: "not started by this test"}, world_size)

    monkeypatch.setattr(processes, "rank_start_method", lambda backend: "spawn")
    monkeypatch.setattr(processes, "run_on_processes", spawn)
    (tmp_path / "spawned.py").write_text(textwrap.dedent(SPAWNED_MODULE))
    model, shape = build_from_factory(f"{tmp_path / 'spawned.py'}:build")
    report = verify_model(model, shape, replicas=2, backend="gloo", device="cpu")
    assert report.synced.error == "rank 0 of 2: not started by this test"
    assert [start for start, _, _ in sent] == ["spawn", "spawn"]
    assert sent[0][1] is processes.train_shards and type(sent[0][2][0][-1]).__name__ == "Doubler"
