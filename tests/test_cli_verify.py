"""`syncbn verify` through typer's CliRunner: exit codes, tables, JSON, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sample_models import SAMPLES
from sample_models.resnet import resnet_tiny
from syncbn_cli.main import app

runner = CliRunner()


def verify(*args: str) -> object:
    return runner.invoke(app, ["verify", *args])


def verify_json(*args: str) -> dict:
    result = verify(*args, "--json")
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def test_default_run_passes_on_the_bundled_model() -> None:
    result = verify()
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("syncbn verify  sample_models.mixed:mixed_net (the bundled sample model)\n")
    assert "SyncBN on 4 replicas (threads, virtual replicas on the CPU) vs one device on the full batch" in out
    assert "batch 8 (2 per replica) · input 3x16x16 · float32 · 1 step" in out
    assert "a check passes when ratio ≤ 2 or SyncBN err ≤ atol 0.0001" in out
    assert "Checks: SyncBN and one device (float32) against the float64 truth" in out
    header = next(line for line in out.splitlines() if line.startswith("┃") and "SyncBN err" in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == [
        "check",
        "SyncBN err",
        "one device err",
        "ratio",
        "unsynced err",
        "status",
    ]
    for row in ("output", "input_grad", "parameter grads (18)", "buffer running_var (7)", "shared_bn (call 2)"):
        assert row in out
    assert "FAIL" not in out
    verdict = out.splitlines()[-1]
    assert verdict.startswith("PASS: SyncBN on 4 replicas matches one device on the full batch (worst ratio ")
    assert "to one device's error against the float64 truth, at most 2); unsynced BN's error is up to" in verdict
    assert result.stderr == ""


def test_float64_runs_keep_the_tolerance_table() -> None:
    result = verify("--dtype", "float64", "--replicas", "3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "a tensor passes when rel err ≤ rtol 1e-07" in out and "Checks: SyncBN vs one device" in out
    header = next(line for line in out.splitlines() if line.startswith("┃") and "abs err" in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == [
        "check",
        "abs err",
        "rel err",
        "tolerance",
        "unsynced BN",
        "status",
    ]
    assert out.splitlines()[-1].startswith("PASS: SyncBN on 3 replicas matches one device on the full batch (max rel")


@pytest.mark.parametrize(
    ("dtype", "split"),
    [
        ("float32", ["--batch-size", "3", "--replicas", "4"]),  # fewer samples than replicas
        ("bfloat16", []),
        ("float16", ["--replicas", "3", "--steps", "2"]),
        ("float64", ["--replicas", "2"]),
    ],
)
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_sample_passes_from_the_command_line(name: str, dtype: str, split: list[str]) -> None:
    document = verify_json("--factory", SAMPLES[name], "--dtype", dtype, *split)
    assert document["passed"] is True, [c for c in document["checks"] + document["layers"] if not c["passed"]]
    assert document["dtype"] == dtype
    assert document["unsynced"]["passed"] is False or document["unsynced"]["error"] is not None


def test_json_document() -> None:
    document = verify_json("--replicas", "3", "--steps", "2", "--seed", "7", "--reference-dtype", "float64")
    assert document["passed"] is True
    assert {k: document[k] for k in ("replicas", "backend", "device", "batch_size", "steps", "seed")} == {
        "replicas": 3,
        "backend": "threads",
        "device": "cpu",
        "batch_size": 6,
        "steps": 2,
        "seed": 7,
    }
    assert (document["dtype"], document["reference_dtype"], document["rtol"], document["atol"]) == (
        "float32",
        "float64",
        1e-4,
        1e-4,
    )
    assert (document["judged_by"], document["max_ratio"]) == ("truth", 2.0)
    for check in document["checks"] + document["layers"]:
        assert check["passed"] is True
        assert check["ratio"] is None or check["ratio"] <= 2 or check["truth_err"] <= document["atol"], check
    assert document["factory"] == "sample_models.mixed:mixed_net" and document["source"] is None
    assert document["first_diverging_layer"] is None
    names = [c["name"] for c in document["checks"]]
    assert names[:2] == ["output", "input_grad"]
    assert "grad/stem.weight" in names and "buffer/head_bn.num_batches_tracked" in names
    keys = {"name", "max_abs_err", "max_rel_err", "tolerance", "truth_err", "one_device_truth_err", "ratio", "passed"}
    assert all(set(c) == keys for c in document["checks"])
    output = document["checks"][0]
    assert output["truth_err"] > 0 and output["one_device_truth_err"] > 0
    assert 0 < output["ratio"] <= document["max_ratio"]  # the worst over the steps' ratios
    assert [layer["name"] for layer in document["layers"]][:4] == [
        "stem_bn",
        "bn_act",
        "shared_bn (call 1)",
        "shared_bn (call 2)",
    ]
    assert [c["name"] for c in document["unsynced"]["checks"]] == names


def test_broken_sync_exits_1_and_names_the_first_diverging_layer(broken_sync: None) -> None:
    result = verify("--replicas", "2")
    assert result.exit_code == 1, result.output
    row = next(line for line in result.stdout.splitlines() if "FIRST DIVERGENCE" in line)
    assert "stem_bn" in row
    verdict = next(line for line in result.stdout.splitlines() if line.startswith("FAIL"))
    assert verdict.startswith("FAIL: SyncBN on 2 replicas does not match one device: first divergence at layer stem_bn")
    assert "times one device's, at most 2 or atol 0.0001" in verdict
    assert "hint: SyncBN's errors are those of unsynced BN" in result.stdout
    document = verify_json("--replicas", "2")
    assert document["passed"] is False and document["first_diverging_layer"] == "stem_bn"
    assert document["layers"][0]["passed"] is False


def test_broken_sync_on_resnet(broken_sync: None) -> None:
    document = verify_json("--factory", "sample_models.resnet:resnet_tiny", "--replicas", "3")
    assert document["passed"] is False and document["first_diverging_layer"] == "stem.1"


def test_saved_state_dict_end_to_end(tmp_path: Path) -> None:
    torch.manual_seed(1)
    torch.save(resnet_tiny().state_dict(), tmp_path / "model.pt")
    result = verify(str(tmp_path / "model.pt"), "--factory", "sample_models.resnet:resnet_tiny", "--replicas", "2")
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'model.pt'} (sample_models.resnet:resnet_tiny)" in result.stdout
    assert "PASS: SyncBN on 2 replicas" in result.stdout


def test_input_shape_option_and_pickled_model(tmp_path: Path) -> None:
    torch.save(resnet_tiny(), tmp_path / "whole.pt")
    result = verify(str(tmp_path / "whole.pt"), "--trust-pickle", "--input-shape", "3x16x16", "--replicas", "2")
    assert result.exit_code == 0, result.output
    assert "input 3x16x16" in result.stdout


def test_fewer_samples_than_replicas_warns() -> None:
    result = verify("--factory", "sample_models.resnet:resnet_tiny", "--replicas", "4", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert "warning: batch size 2 is smaller than 4 replicas: replica(s) 2, 3 get empty shards" in result.stderr


def test_bfloat16_with_fewer_samples_than_replicas_passes() -> None:
    # Both exited 1 on rounding before verify judged against the float64 truth.
    for args in (["-b", "3", "-r", "4"], ["--dtype", "bfloat16"], ["--dtype", "float16", "-b", "3", "-r", "4"]):
        result = verify(*args)
        assert result.exit_code == 0, (args, result.output)


def test_max_ratio_decides(broken_sync: None) -> None:
    document = verify_json("--replicas", "2", "--dtype", "bfloat16")
    assert document["passed"] is False and document["max_ratio"] == 2.0
    worst = document["worst_ratio"]
    lenient = verify_json("--replicas", "2", "--dtype", "bfloat16", "--max-ratio", str(2 * worst), "--atol", "1")
    assert lenient["passed"] is True and lenient["max_ratio"] == 2 * worst


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input-shape", "3x"], "error: --input-shape: malformed shape '3x': expected integers joined by 'x'"),
        (["--input-shape", "3x0x4"], "error: --input-shape: malformed shape '3x0x4': sizes must be positive integers"),
        (
            ["--input-shape", "3x1000000x1000000"],
            "error: input 3x1000000x1000000 with batch 8 needs at least",
        ),
        (
            ["--input-shape", "5x8x8"],
            "error: the model failed on one device with input of shape (8, 5, 8, 8) (step 1): RuntimeError:",
        ),
        (["--backend", "nccl", "--devices", "cpu"], "error: backend nccl needs one CUDA device per replica (4)"),
        (["--backend", "mpi"], "error: --backend must be one of threads, gloo, nccl (got 'mpi')"),
        (["--devices", "tpu"], "error: --devices must be cpu or cuda (got 'tpu')"),
        (["--dtype", "int8"], "error: --dtype must be one of float32, float64, bfloat16, float16 (got 'int8')"),
        (["--max-ratio", "0"], "error: --max-ratio must be a number > 0 (got 0.0)"),
        (["--reference-dtype", "double"], "error: --reference-dtype must be one of"),
        (["--rtol", "-1"], "error: --rtol must be a number >= 0 (got -1.0)"),
        (["--factory", "torch.nn:Identity", "--input-shape", "4"], "error: the model has no BatchNorm layers"),
        (["missing.pt"], "error: missing.pt: no such file"),
        (["--factory", "sample_models.nowhere:build"], "error: cannot import sample_models.nowhere"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = verify(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert result.stdout == ""


def test_state_dict_without_factory_and_factory_without_shape(tmp_path: Path) -> None:
    torch.save(resnet_tiny().state_dict(), tmp_path / "model.pt")
    result = verify(str(tmp_path / "model.pt"))
    assert result.exit_code == 2 and "but no architecture: pass --factory MOD:FN" in result.stderr
    (tmp_path / "models.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n"
    )
    result = verify("--factory", f"{tmp_path / 'models.py'}:build")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: the model does not declare its input shape: pass --input-shape, e.g. 3x32x32 "
        "(one sample, without the batch dimension)\n"
    )
    result = verify("--factory", f"{tmp_path / 'models.py'}:build", "--input-shape", "3x5x5", "--replicas", "2")
    assert result.exit_code == 0, result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda() -> None:
    result = verify("--devices", "cuda")
    assert result.exit_code == 2
    assert result.stderr == "error: --devices cuda: CUDA is not available on this machine; use --devices cpu\n"


@pytest.mark.parametrize("option", ["--replicas", "--steps", "--batch-size"])
def test_counts_below_one_get_one_line(option: str) -> None:
    result = verify(option, "0")
    assert result.exit_code == 2
    assert result.stderr == f"error: {option} must be at least 1 (got 0)\n"


def test_help_documents_the_command_with_an_example() -> None:
    result = runner.invoke(app, ["verify", "--help"])
    assert result.exit_code == 0
    assert "Prove that SyncBN on R replicas trains exactly like one device" in result.stdout
    assert "syncbn verify --replicas 3 --steps 3" in result.stdout
    for option in ("--reference-dtype", "--input-shape", "--backend", "--rtol", "--atol", "--max-ratio", "--json"):
        assert option in result.stdout
    help_text = " ".join(result.stdout.replace("│", " ").split())
    assert "dtype to run in: float32, float64, bfloat16, float16." in help_text
    assert "<bool>" not in help_text  # flags read as flags: --json, not --json <bool>
    assert "times one device's" in help_text and "ratio of two noises means nothing" in help_text


def test_sync_batch_norm_that_raises_is_a_failure_not_a_crash(failing_sync: None) -> None:
    result = verify("--replicas", "2")
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[-1] == "FAIL: SyncBN on 2 replicas raised RuntimeError: rendezvous lost"
    assert "Traceback" not in result.output
    document = verify_json("--replicas", "2")
    assert document["passed"] is False and document["error"] == "RuntimeError: rendezvous lost"
