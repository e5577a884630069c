"""`syncbn bench` and ``syncbn.bench``: rows, ratios, shape parsing, output formats, bad input."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from sample_models.mlp import mlp_bn1d
from syncbn.bench import (
    OVERHEAD_LAYERS,
    OVERHEAD_WORKLOAD,
    REFERENCE,
    SYNCBN,
    SYNCBN_GLOO,
    UNSYNCED,
    UNSYNCED_GLOO,
    parse_shape,
    parse_shapes,
    run_benchmark,
)
from syncbn_cli.main import app

ROW_KEYS = {"impl", "shape", "replicas", "dtype", "device", "fwd_ms", "bwd_ms", "ratio"}
# Tiny workloads and a tiny model keep every CLI run well under a second.
FAST = [
    "--shapes", "4x3x5x5,8x6", "--repeats", "1", "--warmup", "0", "--model", "sample_models.mlp:mlp_bn1d",
    "--no-processes", "--no-overhead",
]  # fmt: skip


@pytest.fixture(scope="module")
def report():
    return run_benchmark(
        [(4, 3, 5, 5), (8, 6), (6, 4, 3), (2, 3, 2, 3, 3)],
        replicas=2,
        repeats=2,
        warmup=1,
        model=mlp_bn1d(),
        model_input_shape=mlp_bn1d.input_shape,
        model_name="mlp_bn1d",
        model_batch_size=8,
        processes=False,
        overhead=False,
    )


def test_rows_for_every_impl_and_workload(report):
    workloads = [(row.workload, row.shape) for row in report.rows if row.impl == REFERENCE]
    assert workloads == [
        ("BatchNorm2d", "4x3x5x5"),
        ("BatchNorm1d", "8x6"),
        ("BatchNorm1d", "6x4x3"),
        ("BatchNorm3d", "2x3x2x3x3"),
        ("mlp_bn1d train step", "8x32"),
    ]
    for workload, shape in workloads:
        rows = [row for row in report.rows if (row.workload, row.shape) == (workload, shape)]
        assert [(row.impl, row.replicas) for row in rows] == [(REFERENCE, 1), (SYNCBN, 1), (SYNCBN, 2), (UNSYNCED, 2)]
        assert {(row.dtype, row.device) for row in rows} == {("float32", "cpu")}


def test_times_positive_and_ratios_against_the_reference(report):
    reference = {}
    for row in report.rows:
        assert math.isfinite(row.fwd_ms) and row.fwd_ms > 0
        assert math.isfinite(row.bwd_ms) and row.bwd_ms > 0
        if row.impl == REFERENCE:
            assert row.ratio == 1.0
            reference[row.workload, row.shape] = row.total_ms
        else:
            assert row.ratio == pytest.approx(row.total_ms / reference[row.workload, row.shape], rel=1e-12)


def test_report_document(report):
    document = report.as_dict()
    assert json.loads(json.dumps(document)) == document
    assert {"torch", "threads", "platform", "date"} <= set(document["machine"])
    assert document["machine"]["torch"] == torch.__version__
    assert document["settings"]["replicas"] == 2
    assert all(ROW_KEYS <= set(row) for row in document["rows"])


def test_one_replica_omits_the_duplicate_syncbn_row():
    report = run_benchmark([(4, 3)], replicas=1, repeats=1, warmup=0, processes=False, overhead=False)
    assert [(row.impl, row.replicas) for row in report.rows] == [(REFERENCE, 1), (SYNCBN, 1), (UNSYNCED, 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_and_channels_last(dtype):
    report = run_benchmark(
        [(4, 3, 5, 5)],
        replicas=2,
        dtype=dtype,
        channels_last=True,
        repeats=1,
        warmup=0,
        processes=False,
        overhead=False,
    )
    assert {row.dtype for row in report.rows} == {str(dtype).removeprefix("torch.")}
    assert report.settings["channels_last"] is True


def test_progress_reports_every_round():
    calls = []
    run_benchmark(
        [(4, 3)],
        replicas=2,
        repeats=2,
        warmup=1,
        progress=lambda *args: calls.append(args),
        overhead=False,
        processes=False,
    )
    assert [(done, total) for done, total, _ in calls] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert "warmup 1/1" in calls[0][2] and "repeat 2/2" in calls[2][2]


@pytest.mark.parametrize(
    ("text", "shape"),
    [("32x64x56x56", (32, 64, 56, 56)), ("256x1024", (256, 1024)), (" 8X64x8x28x28 ", (8, 64, 8, 28, 28))],
)
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("32", "2 to 5 dimensions"),
        ("1x2x3x4x5x6", "2 to 5 dimensions"),
        ("32x0x4", "positive"),
        ("32xx4", "integers joined by 'x'"),
        ("32x-4", "integers joined by 'x'"),
        ("a x b", "integers joined by 'x'"),
        ("", "integers joined by 'x'"),
    ],
)
def test_parse_shape_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_shape(text)


def test_parse_shapes():
    assert parse_shapes("4x3x5x5, 8x6,") == [(4, 3, 5, 5), (8, 6)]
    with pytest.raises(ValueError, match="no shapes"):
        parse_shapes(" , ")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"replicas": 0}, "replicas must be a positive integer"),
        ({"repeats": 0}, "repeats must be at least 1"),
        ({"warmup": -1}, "warmup must be at least 0"),
        ({"device": "tpu"}, "device must be 'cpu' or 'cuda'"),
        ({"dtype": torch.int64}, "floating"),
    ],
)
def test_library_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_benchmark([(4, 3)], **kwargs)


def test_library_rejects_a_shape_too_small_for_the_replicas():
    with pytest.raises(ValueError, match="4x3 split over 4 replicas leaves a replica with 1 value per channel"):
        run_benchmark([(4, 3)], replicas=4)


def invoke(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


def test_cli_json():
    result = invoke(*FAST, "--replicas", "2", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert {"torch", "threads", "platform", "date"} <= set(document["machine"])
    rows = document["rows"]
    assert len(rows) == 3 * 4
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0
    assert [row["ratio"] for row in rows if row["impl"] == REFERENCE] == [1.0, 1.0, 1.0]
    assert {row["shape"] for row in rows} == {"4x3x5x5", "8x6", "32x32"}  # mlp_bn1d: batch 32, 32 features
    assert {row["replicas"] for row in rows if row["impl"] == UNSYNCED} == {2}


def test_cli_csv():
    result = invoke(*FAST, "--model", "none", "--csv", "--dtype", "float64")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert ROW_KEYS <= set(rows[0])
    assert len(rows) == 2 * 4
    assert {row["dtype"] for row in rows} == {"float64"}
    assert {row["replicas"] for row in rows if row["impl"] == UNSYNCED} == {"4"}  # the CPU default
    for row in rows:
        assert float(row["fwd_ms"]) > 0 and float(row["ratio"]) > 0


def test_cli_table():
    result = invoke(*FAST, "--replicas", "2")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert f"torch {torch.__version__}, {torch.get_num_threads()} threads" in out
    assert "R = 2 replicas" in out
    for title in ("BatchNorm2d 4x3x5x5", "BatchNorm1d 8x6", "mlp_bn1d train step 32x32"):
        assert title in out
    for impl in (REFERENCE, SYNCBN, UNSYNCED, "1.00x"):
        assert impl in out


def test_cli_help_has_an_example():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "syncbn bench --shapes" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shapes", "32x"], "error: --shapes: malformed shape '32x'"),
        (["--shapes", "4x3x2x2x2x2"], "error: --shapes: malformed shape"),
        (["--json", "--csv"], "error: --json and --csv exclude each other"),
        (["--replicas", "0"], "error: --replicas must be at least 1 (got 0)"),
        (["--dtype", "int8"], "error: --dtype must be one of float32, float64, bfloat16, float16 (got 'int8')"),
        (["--devices", "tpu"], "error: --devices must be cpu or cuda"),
        (["--repeats", "0"], "error: --repeats must be at least 1 and --warmup at least 0 (got 0 and 2)"),
        (["--warmup", "-1"], "error: --repeats must be at least 1"),
        (["--model-batch-size", "1"], "error: --model-batch-size must be at least 2 (got 1)"),
        (["--shapes", "2x3", "--model", "none"], "error: shape 2x3 split over 4 replicas"),
        (["--model", "no_such_module:build"], "error: "),
    ],
)
def test_cli_bad_input(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_cuda_without_cuda():
    result = invoke("--devices", "cuda", "--shapes", "4x3", "--model", "none")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: device 'cuda' was asked for but CUDA is not available here: use device 'cpu'"
    ]


def test_the_model_is_measured_on_copies():
    model = mlp_bn1d()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    report = run_benchmark(
        [],
        replicas=2,
        repeats=1,
        warmup=0,
        model=model,
        model_input_shape=(32,),
        model_batch_size=4,
        processes=False,
        overhead=False,
    )
    assert [(row.workload, row.shape) for row in report.rows] == [("Sequential train step", "4x32")] * 4
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert all(type(m).__module__.startswith("torch.") for m in model.modules())


@pytest.mark.slow
def test_gloo_rows_and_synchronization_overhead():
    report = run_benchmark([(4, 3, 5, 5)], replicas=2, repeats=2, warmup=1)
    rows = {(row.workload, row.impl): row for row in report.rows}
    for workload in ("BatchNorm2d", OVERHEAD_WORKLOAD):
        for impl in (SYNCBN_GLOO, UNSYNCED_GLOO):
            row = rows[workload, impl]
            assert row.replicas == 2 and row.fwd_ms > 0 and row.bwd_ms > 0
            reference = rows[workload, REFERENCE]
            assert row.ratio == pytest.approx(row.total_ms / reference.total_ms, rel=1e-12)
    overhead = {entry["backend"]: entry for entry in report.overhead}
    assert set(overhead) == {"threads", "gloo"}
    synced, unsynced = rows[OVERHEAD_WORKLOAD, SYNCBN_GLOO], rows[OVERHEAD_WORKLOAD, UNSYNCED_GLOO]
    expected = (synced.total_ms - unsynced.total_ms) * 1e3 / OVERHEAD_LAYERS
    assert overhead["gloo"]["total_us_per_layer"] == pytest.approx(expected)
    assert report.as_dict()["overhead"] == report.overhead
    # The processes way's sync cost per layer call, beside its bare collectives, same run.
    (cost,) = report.sync_cost
    assert (cost.shape, cost.replicas, cost.rounds) == ("4x3x5x5", 2, 2)
    assert cost.collectives_ms > 0 and cost.syncbn_ms > 0 and cost.bn_ms > 0
    assert report.as_dict()["sync_cost"] == [cost.as_dict()]


@pytest.mark.slow
def test_cli_reports_overhead_per_layer():
    result = invoke("--shapes", "4x3", "--replicas", "2", "--repeats", "1", "--warmup", "0", "--model", "none")
    assert result.exit_code == 0, result.stderr
    assert "synchronization overhead per BatchNorm layer call (threads, R = 2):" in result.stdout
    assert "synchronization overhead per BatchNorm layer call (gloo, R = 2):" in result.stdout
    assert "processes way (gloo, R = 2), 4x3: sync cost" in result.stdout
    assert "its two collectives alone" in result.stdout
    assert SYNCBN_GLOO in result.stdout


@pytest.mark.slow
def test_perf_suite_reports_every_target_against_nn_batch_norm():
    result = invoke("--suite", "perf", "--repeats", "1", "--warmup", "0", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    targets = {target["name"]: target for target in document["targets"]}
    for name in (
        "1 replica, BatchNorm2d 32x64x56x56 NCHW",
        "1 replica, BatchNorm2d 32x256x14x14 channels_last",
        "R=4 threads, BatchNorm2d 32x64x56x56 NCHW",
        "1 replica, BatchNorm1d 256x1024",
        "sync overhead per layer call, threads R=4",
        "sync overhead per layer call, gloo 2 processes",
        "peak memory, R=1, BatchNorm2d 32x64x56x56",
    ):
        target = targets[name]
        if name.startswith("sync overhead"):
            # SyncBN minus unsynced BN: below zero where one whole-batch pass beats R shard passes.
            assert math.isfinite(target["measured"])
        else:
            assert target["measured"] > 0
        assert target["passed"] == (None if target["target"] is None else target["measured"] <= target["target"])
    assert {"torch", "threads", "platform", "date"} <= set(document["machine"])


def test_unknown_suite_is_bad_input():
    result = invoke("--suite", "fast")
    assert result.exit_code == 2
    assert result.stderr == "error: --suite must be default or perf (got 'fast')\n"
