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
# Every test here starts gloo rank processes (seconds each): the quick subset leaves them out.
pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable"),
    pytest.mark.slow,
]


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
    outputs, input_grads, step_grads = [], [], []
    for _ in range(steps):
        xr = x.clone().requires_grad_()
        out = ref(xr)
        # DDP averages gradients over ranks: the full-batch equivalent is cotangent / world.
        out.backward(cotangent / world if steps > 1 else cotangent)
        outputs.append(out.detach())
        input_grads.append(xr.grad)
        step_grads.append({n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None})
        if optimizer is not None and steps > 1:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    return {
        "output": outputs,
        "input_grad": input_grads,
        "grads": {n: p.grad for n, p in ref.named_parameters() if p.grad is not None},
        "step_grads": step_grads,
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
    names = [*SINGLE_STEP, "offset_float32", "plain_float32", "offset_large", "plain_large", "bfloat16", "training"] + (
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


@pytest.mark.parametrize("name", ["offset_float32", "plain_float32", "offset_large", "plain_large"])
def test_as_accurate_as_torch_against_a_float64_truth(job, name):
    """float32 on R ranks vs nn.BatchNorm in float32 on one process, both against float64 math."""
    world, ranks = job
    model, x = cases.CASES[name]()
    cotangent = cases.cotangent_for(copy.deepcopy(model)(x))
    truth, plain = one_process_step(model, x.double(), cotangent.double()), one_process_step(model, x, cotangent)
    synced = {
        "output": joined(ranks, name, "output")[0],
        "input_grad": joined(ranks, name, "input_grad")[0],
        # DDP averages over ranks; the full batch's gradient is the sum
        **{f"grad {k}": g * world for k, g in ranks[0][name]["grads"].items()},
        **{f"buffer {k}": b for k, b in ranks[0][name]["buffers"].items() if b.is_floating_point()},
    }
    assert set(synced) == set(truth)
    for key, exact in truth.items():
        torch_error = (plain[key].double() - exact).abs().max().item()
        sync_error = (synced[key].double() - exact).abs().max().item()
        # Either may be the one that rounds its stored float32 result the unlucky way.
        one_rounding = torch.finfo(torch.float32).eps * exact.abs().max().item()
        assert sync_error <= 1.25 * torch_error + one_rounding, (key, sync_error, torch_error)


def one_process_step(model, x, cotangent):
    net = copy.deepcopy(model).to(x.dtype)
    leaf = x.clone().requires_grad_()
    out = net(leaf)
    out.backward(cotangent)
    return {
        "output": out.detach().double(),
        "input_grad": leaf.grad.double(),
        **{f"grad {k}": p.grad.double() for k, p in net.named_parameters()},
        **{f"buffer {k}": b.double() for k, b in net.named_buffers() if b.is_floating_point()},
    }


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


COMPILED = [
    "efficientnet",
    "mobilenet_v3",
    "silu_returned",
    "conv_bn_activation",
    "silu_cumulative",
    "silu_no_running_stats",
    "called_twice",
    "subclass_then_silu",
]


@pytest.fixture(scope="module")
def compiled_job(tmp_path_factory):
    """Every COMPILED case through DDP(torch.compile(convert_model(model))) on 2 ranks, 3 steps each."""
    out_dir = tmp_path_factory.mktemp("compiled")
    results = launch(2, out_dir, [f"compiled_{name}" for name in COMPILED])
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-3000:]}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", COMPILED)
def test_ddp_around_a_compiled_model_trains_like_one_device(compiled_job, name):
    # In-place SiLU/Hardswish right after BN (fused in a BatchNormAct2d, in a Sequential, or
    # F.silu(..., inplace=True) returned): the SyncBN layer is traced into the graph
    # (syncbn.processes_op), so the activation mutates an intermediate, not a graph input.
    ranks = [rank[f"compiled_{name}"] for rank in compiled_job]
    expected = reference_run(name, 2, steps=3)
    # Inductor's fused kernels round differently from eager's in the last bits (float64).
    close = {"rtol": 1e-9, "atol": 1e-11}
    for step, output in enumerate(expected["output"]):
        torch.testing.assert_close(torch.cat([r["output"][step] for r in ranks]), output, **close)
    for step, grad in enumerate(expected["input_grad"]):
        # each rank's loss is its shard's part of the full one; the reference's is divided by 2
        torch.testing.assert_close(torch.cat([r["input_grad"][step] for r in ranks]), grad * 2, **close)
    for rank in ranks:
        # Gradients of early layers gather the compiled graph's rounding: mobilenet_v3's
        # reach 3.5e-11 (of up to 1.8), an eagerly run SyncBN layer's too.
        torch.testing.assert_close(rank["step_grads"], expected["step_grads"], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(rank["params"], expected["params"], **close)
        torch.testing.assert_close(rank["buffers"], expected["buffers"], **close)


def test_compiled_ranks_keep_their_collectives_in_order_over_uneven_batches(tmp_path):
    # Ranks recompile at different steps (their shards differ), and a compiled graph may
    # order a block's two branches either way: syncbn.processes_op chains its ops by data.
    results = launch(2, tmp_path, ["compiled_uneven"])
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-3000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["compiled_uneven"] for r in range(2)]
    model, inputs, cotangents = cases.uneven_batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    close = {"rtol": 1e-9, "atol": 1e-11}
    for step, (x, cotangent) in enumerate(zip(inputs, cotangents, strict=True)):
        out = model(x)
        out.backward(cotangent / 2)  # DDP averages the ranks' gradients
        torch.testing.assert_close(torch.cat([r["output"][step] for r in ranks]), out.detach(), **close)
        optimizer.step()
        optimizer.zero_grad()
    for rank in ranks:
        torch.testing.assert_close(rank["state"], model.state_dict(), **close)


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
        2, tmp_path, ["bn2d"], SYNCBN_TEST_STALL_ON_RANK="1", SYNCBN_TEST_STALL_SECONDS="7", SYNCBN_TEST_TIMEOUT="3"
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


# Double backward: a gradient penalty on R ranks equals the full-batch one.

PENALTY = ["penalty", "penalty_unconverted", "penalty_detached"]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def penalty_job(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"penalty{world}")
    results = launch(world, out_dir, PENALTY)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-3000:]}"
    return world, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def penalty_reference() -> dict[str, object]:
    model, x = cases.CASES["smooth"]()
    cotangent = cases.cotangent_for(copy.deepcopy(model)(x))
    return cases.penalty_step(copy.deepcopy(model), x, cotangent)


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_gradient_penalty_matches_full_batch(penalty_job):
    world, ranks = penalty_job
    expected = penalty_reference()
    for key in ("output", "first_grad", "input_grad"):
        torch.testing.assert_close(joined(ranks, "penalty", key)[0], expected[key][0], **FLOAT64)
    for key in ("first_param_grads", "grads"):
        assert set(ranks[0]["penalty"][key]) == set(expected[key])
        for rank in ranks:
            for name, grad in expected[key].items():
                torch.testing.assert_close(rank["penalty"][key][name], grad, **FLOAT64)


def test_gradient_penalty_negative_controls_are_off(penalty_job):
    world, ranks = penalty_job
    expected = penalty_reference()
    # Global sums without gradients: first-order gradients exact, second-order ones wrong.
    torch.testing.assert_close(joined(ranks, "penalty_detached", "first_grad")[0], expected["first_grad"][0], **FLOAT64)
    assert max_error(joined(ranks, "penalty_detached", "input_grad")[0], expected["input_grad"][0]) > 1e-2
    assert max_error(ranks[0]["penalty_detached"]["grads"]["conv1.weight"], expected["grads"]["conv1.weight"]) > 1e-2
    # Per-rank statistics: wrong already at first order.
    assert max_error(joined(ranks, "penalty_unconverted", "first_grad")[0], expected["first_grad"][0]) > 1e-2
    assert max_error(joined(ranks, "penalty_unconverted", "input_grad")[0], expected["input_grad"][0]) > 1e-2


# Mismatched collectives: named on every rank, never paired silently, never an abort.


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def mismatch_job(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"mismatch{world}")
    start = time.monotonic()
    results = launch(world, out_dir, [*cases.MISMATCHES, "call_indices"], SYNCBN_TEST_TIMEOUT="30")
    for rank, result in enumerate(results):
        # A backend abort (SIGABRT) or a crash would show here; every fault was raised and caught.
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-3000:]}"
    assert time.monotonic() - start < 200
    return world, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def places(world: int, healthy: str, faulty: str) -> str:
    others = "rank 0 is" if world == 2 else f"ranks {', '.join(map(str, range(world - 1)))} are"
    return f"SyncBNError: SyncBN ranks are out of step: {others} in {healthy}; rank {world - 1} is in {faulty}."


EXPECTED_PLACES = {
    "mismatch_skip": ("layer 'bn_a' (forward, call 0)", "layer 'bn_b' (forward, call 0)"),
    "mismatch_order": ("layer 'bn_a' (forward, call 0)", "layer 'bn_b' (forward, call 0)"),
    "mismatch_wide": ("layer 'bn_a' (forward, call 0)", "layer 'bn_b' (forward, call 0)"),
    "mismatch_extra_call": ("layer 'bn_b' (backward, call 0)", "layer 'bn_b' (forward, call 1)"),
    "mismatch_backward": ("layer 'bn_a' (backward, call 0)", "layer 'bn_a' (forward, call 1)"),
    "compiled_mismatch_skip": ("layer 'bn_a' (forward, call 0)", "layer 'bn_b' (forward, call 0)"),
    "compiled_mismatch_extra_call": ("layer 'bn_b' (backward, call 0)", "layer 'bn_b' (forward, call 1)"),
}


@pytest.mark.parametrize("name", list(EXPECTED_PLACES))
def test_mismatch_raises_the_same_named_error_on_every_rank(mismatch_job, name):
    world, ranks = mismatch_job
    errors = [rank[name]["error"] for rank in ranks]
    assert errors[0] is not None and all(error == errors[0] for error in errors), errors
    assert errors[0].startswith(places(world, *EXPECTED_PLACES[name])), errors[0]
    assert "same SyncBN layers in the same order and the same number of times" in errors[0]
    assert all(rank[name]["seconds"] < 30 for rank in ranks)


def two_layers_reference(name: str, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    (first, second), _ = cases.MISMATCHES[name]
    cases.seeded()
    model = cases.TwoLayers(first, second).double()
    x = torch.randn(4 * world, 3, 5, 5, dtype=torch.float64)
    return model(x).detach(), x


@pytest.mark.parametrize("name", list(cases.MISMATCHES))
def test_ranks_stay_in_step_after_a_mismatch(mismatch_job, name):
    world, ranks = mismatch_job
    expected, _ = two_layers_reference(name, world)
    torch.testing.assert_close(torch.cat([rank[name]["healthy"] for rank in ranks]), expected, **FLOAT64)


def test_negative_control_without_distinct_tags_pairs_layers_silently(mismatch_job):
    world, ranks = mismatch_job
    expected, _ = two_layers_reference("mismatch_unchecked", world)
    assert all(rank["mismatch_unchecked"]["error"] is None for rank in ranks)
    rows = expected.shape[0] // world
    assert (ranks[0]["mismatch_unchecked"]["output"] - expected[:rows]).abs().max() > 1e-2


def test_call_index_counts_training_forwards_and_checkpoint_recomputations(mismatch_job):
    world, ranks = mismatch_job
    # no_grad training forward: 1; eval forward: still 1; checkpointed step (forward + recomputation): 3
    assert all(rank["call_indices"]["calls"] == [1, 1, 3] for rank in ranks)
    assert len({rank["call_indices"]["tag"] for rank in ranks}) == 1
    assert ranks[0]["call_indices"]["tag"][0] == "bn"


def test_layer_names_travel_in_the_header():
    from syncbn.comm.distributed import _decode_name, _name_slots

    for name in ["bn", "backbone.layer4.2.bn3", "stage.ü.norm", "a" * 60]:
        length, slots = _name_slots(name)
        header = [0.0] * 6 + [float(length), *slots]
        expected = name if len(name.encode()) <= 48 else name.encode()[:48].decode() + "..."
        assert _decode_name(header) == expected


def test_sync_cost_measurement_reports_rows():
    from syncbn.bench_processes import measure_sync_cost

    rows = measure_sync_cost([(8, 4, 5, 5), (6, 3)], 2, repeats=3, warmup=1, extra={"plain again": lambda bn: bn})
    assert [(row.shape, row.replicas, row.rounds) for row in rows] == [("8x4x5x5", 2, 3), ("6x3", 2, 3)]
    for row in rows:
        assert row.bn_ms > 0 and row.syncbn_ms > 0 and row.collectives_ms > 0
        assert row.ratio_q1 <= row.ratio <= row.ratio_q3
        assert set(row.fwd_ms) == set(row.bwd_ms) == {"nn.BatchNorm", "SyncBN", "plain again"}
        assert set(row.extra_ms) == set(row.vs_extra) == {"plain again"}
        assert set(row.as_dict()) >= {"shape", "replicas", "sync_cost_ms", "collectives_ms", "ratio"}


@pytest.mark.parametrize(
    ("shapes", "replicas", "match"),
    [([(8, 4)], 1, "at least 2"), ([(1, 4)], 2, "at least 2 samples"), ([(8,)], 2, "2 to 5 dimensions")],
)
def test_sync_cost_measurement_rejects_bad_arguments(shapes, replicas, match):
    from syncbn.bench_processes import measure_sync_cost

    with pytest.raises(ValueError, match=match):
        measure_sync_cost(shapes, replicas, repeats=1)


# --- syncbn.DataParallel inside a torch.distributed job --------------------------------------


@pytest.fixture(scope="module")
def hybrid_job(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("hybrid")
    results = launch(2, out_dir, list(cases.HYBRID))
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-3000:]}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def full_batch_with_summed_gradients(case_name: str, rows: torch.Tensor | None = None) -> dict[str, object]:
    """nn.BatchNorm on one process, on the whole batch (or on ``rows`` of it)."""
    model, x = cases.CASES[case_name]()
    cotangent = cases.cotangent_for(copy.deepcopy(model)(x))
    if rows is not None:
        x, cotangent = x[rows], cotangent[rows]
    xr = x.clone().requires_grad_()
    out = model(xr)
    out.backward(cotangent)
    return {
        "output": out.detach(),
        "input_grad": xr.grad,
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "buffers": dict(model.named_buffers()),
    }


@pytest.mark.parametrize("name", [n for n, spec in cases.HYBRID.items() if spec[3] and "penalty" not in n])
def test_data_parallel_in_a_job_reduces_over_every_replica_of_every_process(hybrid_job, name):
    # 2 processes x R virtual replicas each, both ways replicas meet, against one process
    # on the whole global batch.
    expected = full_batch_with_summed_gradients(cases.HYBRID[name][0])
    torch.testing.assert_close(torch.cat([r[name]["output"][0] for r in hybrid_job]), expected["output"], **FLOAT64)
    got_grad = torch.cat([r[name]["input_grad"][0] for r in hybrid_job])
    torch.testing.assert_close(got_grad, expected["input_grad"], **FLOAT64)
    for rank in hybrid_job:
        torch.testing.assert_close(rank[name]["grads"], expected["grads"], **FLOAT64)
        torch.testing.assert_close(rank[name]["buffers"], expected["buffers"], **FLOAT64)


def test_data_parallel_in_a_job_can_keep_statistics_within_each_process(hybrid_job):
    # across_processes=False: each process's replicas meet only each other, so each
    # process computes what one device computes on that process's batch.
    name = "hybrid_local_only"
    for rank in hybrid_job:
        expected = full_batch_with_summed_gradients("bn2d", rank[name]["shard"])
        torch.testing.assert_close(rank[name]["output"][0], expected["output"], **FLOAT64)
        torch.testing.assert_close(rank[name]["input_grad"][0], expected["input_grad"], **FLOAT64)
    # ... which is not the global batch's (the comparison above can fail).
    everything = full_batch_with_summed_gradients("bn2d")
    got = torch.cat([r[name]["output"][0] for r in hybrid_job])
    assert not torch.allclose(got, everything["output"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["hybrid_penalty", "hybrid_penalty_statistics"])
def test_a_gradient_penalty_through_data_parallel_in_a_job(hybrid_job, name):
    expected = penalty_reference()
    for key in ("output", "first_grad", "input_grad"):
        torch.testing.assert_close(joined(hybrid_job, name, key)[0], expected[key][0], **FLOAT64)
    for key in ("first_param_grads", "grads"):
        for rank in hybrid_job:
            torch.testing.assert_close(rank[name][key], expected[key], **FLOAT64)
