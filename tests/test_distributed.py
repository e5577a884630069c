"""The processes way: R gloo processes on 127.0.0.1 match nn.BatchNorm on the full batch."""

from __future__ import annotations

import copy
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_cases.py")
spec = importlib.util.spec_from_file_location("distributed_cases", WORKER)
cases = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cases)

FLOAT64 = {"rtol": 1e-10, "atol": 1e-12}
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world: int, out_dir: Path, names: list[str], **env: str) -> list[subprocess.CompletedProcess]:
    """Start `world` ranks of distributed_cases.py like torchrun would; wait at most 240 s."""
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    base["OMP_NUM_THREADS"] = "1"  # R processes on a 2-core machine
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out_dir), *names],
            env={**base, **env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    done = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def reference_run(name: str, world: int, steps: int = 1) -> dict[str, object]:
    """The same case on one process, full batch, plain nn.BatchNorm."""
    model, x = cases.CASES[name]()
    cotangent = cases.cotangent_for(copy.deepcopy(model)(x))
    ref = copy.deepcopy(model)
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.1) if list(ref.parameters()) else None
    outputs, input_grads = [], []
    for _ in range(steps):
        xr = x.clone().requires_grad_()
        out = ref(xr)
        # DDP averages gradients over ranks: the full-batch equivalent is cotangent / world.
        out.backward(cotangent / world if steps > 1 else cotangent)
        outputs.append(out.detach())
        input_grads.append(xr.grad)
        if optimizer is not None and steps > 1:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    return {
        "output": outputs,
        "input_grad": input_grads,
        "grads": {n: p.grad for n, p in ref.named_parameters() if p.grad is not None},
        "params": {n: p.detach() for n, p in ref.named_parameters()},
        "buffers": dict(ref.named_buffers()),
    }


SINGLE_STEP = [
    "bn1d_2d",
    "bn1d_3d",
    "bn2d",
    "bn3d",
    "uneven",
    "variants",
    "called_twice",
    "channels_last",
    "checkpointed",
]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def job(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"gloo{world}")
    names = [*SINGLE_STEP, "offset_float32", "bfloat16", "training"] + (
        ["empty_shards", "subgroups"] if world == 4 else []
    )
    results = launch(world, out_dir, names)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-3000:]}"
    return world, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def joined(ranks: list[dict], name: str, key: str) -> list[torch.Tensor]:
    """Per step, the ranks' shards concatenated back into the full batch."""
    return [torch.cat([r[name][key][step] for r in ranks]) for step in range(len(ranks[0][name][key]))]


@pytest.mark.parametrize("name", [*SINGLE_STEP, "empty_shards"])
def test_matches_full_batch(job, name):
    world, ranks = job
    if name not in ranks[0]:
        pytest.skip("empty shards need more ranks than samples")
    expected = reference_run(name, world)
    for got, want in zip(joined(ranks, name, "output"), expected["output"], strict=True):
        torch.testing.assert_close(got, want, **FLOAT64)
    for got, want in zip(joined(ranks, name, "input_grad"), expected["input_grad"], strict=True):
        torch.testing.assert_close(got, want, **FLOAT64)
    for rank in ranks:
        # after DDP's all-reduce every rank holds the mean of the ranks' gradients
        for key, grad in expected["grads"].items():
            torch.testing.assert_close(rank[name]["grads"][key] * world, grad, **FLOAT64)
        for key, buffer in expected["buffers"].items():
            torch.testing.assert_close(rank[name]["buffers"][key], buffer, **FLOAT64)
    if name == "channels_last":
        assert all(rank[name]["channels_last"] for rank in ranks)


def test_sub_groups_synchronize_only_within_themselves(job):
    world, ranks = job
    if world != 4:
        pytest.skip("needs 4 ranks for two pairs")
    model, x = cases.CASES["bn2d"]()
    cotangent = cases.cotangent_for(copy.deepcopy(model)(x))
    for pair in ranks[0]["subgroups"]["pairs"]:
        rows = torch.cat([ranks[r]["subgroups"]["shard"] for r in pair])
        xr = x[rows].clone().requires_grad_()
        out = copy.deepcopy(model)(xr)
        out.backward(cotangent[rows])
        torch.testing.assert_close(torch.cat([ranks[r]["subgroups"]["output"][0] for r in pair]), out, **FLOAT64)
        torch.testing.assert_close(
            torch.cat([ranks[r]["subgroups"]["input_grad"][0] for r in pair]), xr.grad, **FLOAT64
        )


def test_offset_inputs_are_as_accurate_as_torch(job):
    world, ranks = job
    model, x = cases.CASES["offset_float32"]()
    exact = reference_run_in(model, x.double())
    plain = reference_run_in(model, x)
    got = joined(ranks, "offset_float32", "output")[0]
    torch_error = (plain["output"] - exact["output"]).abs().max()
    sync_error = (got.double() - exact["output"]).abs().max()
    assert sync_error <= 2 * torch_error
    for key in ("running_mean", "running_var"):
        torch_error = (plain["buffers"][f"0.{key}"].double() - exact["buffers"][f"0.{key}"]).abs().max()
        sync_error = (
            (ranks[0]["offset_float32"]["buffers"][f"0.{key}"].double() - exact["buffers"][f"0.{key}"]).abs().max()
        )
        assert sync_error <= 2 * torch_error + 1e-7, key


def reference_run_in(model, x):
    ref = copy.deepcopy(model).to(x.dtype)
    return {"output": ref(x).detach().double(), "buffers": {k: v.double() for k, v in ref.state_dict().items()}}


def test_bfloat16_input_matches_float32_reference(job):
    world, ranks = job
    model, x = cases.CASES["bfloat16"]()
    expected = copy.deepcopy(model)(x.float())
    got = joined(ranks, "bfloat16", "output")[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_three_step_ddp_training_matches_single_device(job):
    world, ranks = job
    expected = reference_run("training", world, steps=3)
    for rank in ranks:
        for key, param in expected["params"].items():
            torch.testing.assert_close(rank["training"]["params"][key], param, rtol=1e-9, atol=1e-11)
        for key, buffer in expected["buffers"].items():
            torch.testing.assert_close(rank["training"]["buffers"][key], buffer, rtol=1e-9, atol=1e-11)


def test_rank_that_raises_mid_forward_does_not_hang_the_others(tmp_path):
    start = time.monotonic()
    results = launch(2, tmp_path, ["bn2d"], SYNCBN_TEST_RAISE_ON_RANK="1", SYNCBN_TEST_TIMEOUT="60")
    assert results[1].returncode != 0 and "raised on purpose" in results[1].stderr
    # rank 0 waits in SyncBN's all_gather; the peer's exit closes the connection at once
    assert results[0].returncode != 0, "rank 0 finished although its peer never joined"
    assert "Connection closed by peer" in results[0].stderr
    assert time.monotonic() - start < 60


def test_rank_that_never_arrives_fails_the_others_within_the_group_timeout(tmp_path):
    start = time.monotonic()
    results = launch(
        2, tmp_path, ["bn2d"], SYNCBN_TEST_STALL_ON_RANK="1", SYNCBN_TEST_STALL_SECONDS="20", SYNCBN_TEST_TIMEOUT="4"
    )
    assert results[0].returncode != 0, "rank 0 finished although its peer never joined"
    assert "timed out" in results[0].stderr.lower() or "timeout" in results[0].stderr.lower()
    assert time.monotonic() - start < 90


def test_torchrun_example_trains_like_one_device():
    example = Path(__file__).parent.parent / "examples" / "torchrun_train.py"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            str(example),
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split(" vs ")[0].strip(): line for line in result.stdout.splitlines() if " vs one device" in line}
    synced = float(lines["SyncBN"].split("max |param diff| ")[1].split(",")[0])
    unsynced = float(lines["plain BN"].split("max |param diff| ")[1].split(",")[0])
    assert synced < 1e-12 < 1e-4 < unsynced
