"""Every way a command can fail, tried as a user would: one line on stderr, the right exit code, nothing left.

Bad input exits 2 with one ``error: ...`` line; running out of memory too; Ctrl-C exits 130
with at most one line, from any backend, leaving no rank running and no temporary folder.
No command's stderr ever holds a traceback.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sample_models.resnet import resnet_tiny
from syncbn_cli.main import app

REPOSITORY = Path(__file__).resolve().parent.parent
runner = CliRunner(env={"COLUMNS": "200"})
MODELS_PY = """
import torch
from torch import nn

from sample_models import example_input


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(x) @ torch.ones(5, 5)


@example_input(4)
def broken():
    return Broken()


@example_input(4)
def no_batch_norm():
    return nn.Linear(4, 4)


NOT_CALLABLE = 3
"""


@pytest.fixture
def work(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(resnet_tiny().state_dict(), tmp_path / "model.pt")
    (tmp_path / "models.py").write_text(MODELS_PY)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (tmp_path / "out").mkdir()
    return tmp_path


def bad_inputs(d: Path) -> list[list[str]]:
    """About 50 wrong invocations of every command, with paths under ``d``."""
    resnet = ["--factory", "sample_models.resnet:resnet_tiny"]
    models = f"{d / 'models.py'}"
    return [
        ["convert"],
        ["convert", "missing.pt"],
        ["convert", str(d)],
        ["convert", str(d / "model.pt")],
        ["convert", str(d / "garbage.pt"), *resnet],
        ["convert", str(d / "garbage.safetensors"), *resnet],
        ["convert", str(d / "model.pt"), "--factory", "nowhere:build"],
        ["convert", str(d / "model.pt"), "--factory", f"{models}:NOT_CALLABLE"],
        ["convert", str(d / "model.pt"), "--factory", f"{models}:no_batch_norm"],
        ["convert", str(d / "model.pt"), *resnet, "-o", str(d / "model.pt")],
        ["convert", str(d / "model.pt"), *resnet, "-o", str(d / "nowhere" / "x.safetensors")],
        ["convert", str(d / "model.pt"), *resnet, "--key", "nope"],
        ["convert", str(d / "model.pt"), *resnet, "--trust-pickle"],
        ["convert", "--json", "true"],
        ["verify", "--replicas", "-1"],
        ["verify", "--replicas", "many"],
        ["verify", "--input-shape", "x"],
        ["verify", "--input-shape", "3x1000000x1000000"],
        ["verify", "--batch-size", "100000000000", "--input-shape", "3x1000x1000"],
        ["verify", "--dtype", "half"],
        ["verify", "--reference-dtype", "int8"],
        ["verify", "--backend", "mpi"],
        ["verify", "--devices", "tpu"],
        ["verify", "--max-ratio", "-1"],
        ["verify", "--rtol", "nan"],
        ["verify", "--factory", f"{models}:broken"],
        ["verify", "--factory", f"{models}:no_batch_norm"],
        ["verify", "--factory", "torch.nn:Identity", "--input-shape", "4"],
        ["verify", str(d / "garbage.pt"), *resnet],
        ["verify", "--json", "true"],
        ["bench", "--shapes", "1x1", "--model", "none"],
        ["bench", "--shapes", "32xx4"],
        ["bench", "--shapes", "100000x100000x100000", "--model", "none"],
        ["bench", "--model", f"{models}:broken", "--shapes", "8x3", "--no-processes", "--no-overhead"],
        ["bench", "--model", f"{models}:NOT_CALLABLE"],
        ["bench", "--model", "sample_models.mlp:mlp_bn1d", "--model-batch-size", "3", "--replicas", "4",
         "--shapes", "8x3", "--no-processes", "--no-overhead", "--repeats", "1", "--warmup", "0"],
        ["bench", "--suite", "perf", "--shapes", "4x3"],
        ["bench", "--dtype", "int8"],
        ["bench", "--json", "--csv"],
        ["inspect", "--json", "true"],
        ["inspect", "nope.safetensors"],
        ["inspect", str(d / "garbage.safetensors")],
        ["inspect", "--factory", "x:y"],
        ["revert", str(d / "model.pt")],
        ["revert", str(d / "model.pt"), "-o", str(d / "out" / "x.pt"), *resnet],
        ["revert", "missing.pt", "-o", str(d / "out" / "x.pt")],
        ["revert", str(d / "garbage.pt"), "-o", str(d / "out" / "x.pt"), "--trust-pickle"],
        ["frobnicate"],
    ]  # fmt: skip


def test_no_bad_input_gets_a_traceback(work):
    for args in bad_inputs(work):
        result = runner.invoke(app, args)
        assert isinstance(result.exception, SystemExit), (args, result.exception)
        assert result.exit_code == 2, (args, result.exit_code, result.output)
        assert "Traceback" not in result.output, (args, result.output)
        assert result.stdout == "", (args, result.stdout)
        if not result.stderr.startswith("Usage: "):  # click's own usage errors come as a box
            assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (args, result.stderr)
    assert os.listdir(work / "out") == []


def run_cli(*args: str, cwd: Path, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "COLUMNS": "200", **kwargs.pop("env", {})}
    command = [sys.executable, "-m", "syncbn_cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_a_real_process_prints_no_traceback(work):
    # `bench --model` turned library errors into a traceback: the whole process, start to exit.
    args = ["bench", "--model", f"{work / 'models.py'}:broken", "--shapes", "8x3", "--no-processes", "--no-overhead"]
    result = run_cli(*args, cwd=work)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.startswith("error: broken train step 32x4 failed: RuntimeError: ")
        and result.stderr.count("\n") == 1
    ), result.stderr


def test_bench_model_errors_are_one_line(work):
    result = runner.invoke(
        app, ["bench", "--model", f"{work / 'models.py'}:broken", "--shapes", "8x3", "--no-processes", "--no-overhead"]
    )
    assert result.exit_code == 2
    assert result.stderr == (
        "error: broken train step 32x4 failed: RuntimeError: mat1 and mat2 shapes cannot be multiplied (32x4 and 5x5)\n"
    )


def test_bench_suite_perf_refuses_the_options_it_ignores():
    result = runner.invoke(app, ["bench", "--suite", "perf", "--shapes", "4x3", "--dtype", "float64", "-r", "2"])
    assert result.exit_code == 2
    assert result.stderr == (
        "error: --suite perf measures fixed shapes, replicas and dtype (float32) and ignores --shapes, --replicas, "
        "--dtype: drop them, or leave out --suite perf\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["verify", "--input-shape", "3x1000000x1000000"], r"error: input 3x1000000x1000000 with batch 8 needs at "
         r"least \S+ PiB of memory; \S+ \w+ is available: use a smaller --input-shape or --batch-size\n"),
        (["bench", "--shapes", "100000x100000x100000", "--model", "none"], r"error: shape 100000x100000x100000 in "
         r"float32 needs at least \S+ PiB of memory; \S+ \w+ is available: use smaller --shapes or "
         r"--model-batch-size\n"),
    ],
)  # fmt: skip
def test_huge_inputs_are_refused_before_allocating(args, message):
    start = time.monotonic()
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and re.fullmatch(message, result.stderr), result.stderr
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    "failure",
    [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")],
    ids=["MemoryError", "torch"],
)
@pytest.mark.parametrize(("command", "target"), [("verify", "verify_model"), ("bench", "run_benchmark")])
def test_running_out_of_memory_at_run_time_is_one_line(monkeypatch, command, target, failure):
    import importlib

    def run_out(*args, **kwargs):
        raise failure

    monkeypatch.setattr(importlib.import_module(f"syncbn_cli.commands.{command}"), target, run_out)
    result = runner.invoke(app, [command, *(["--model", "none"] if command == "bench" else [])])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: out of memory (") and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.endswith("): use smaller inputs or batches\n")


@pytest.mark.slow
def test_a_bench_error_starts_the_line_it_is_on():
    # Piped: stderr holds the error alone.
    piped = runner.invoke(app, ["bench", "--shapes", "4x3", "--replicas", "4", "--model", "none"])
    assert piped.exit_code == 2 and piped.stderr.startswith("error: shape 4x3 split over 4 replicas"), piped.stderr
    # On a terminal: the progress bar's line is cleared and the error written over it, no blank line before.
    primary, secondary = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "COLUMNS": "120"}
    command = [sys.executable, "-m", "syncbn_cli", "bench", "--shapes", "4x3", "--replicas", "4", "--model", "none"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=secondary, env=env, cwd=REPOSITORY)
    os.close(secondary)
    shown = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        elif process.poll() is not None:
            break
    os.close(primary)
    assert process.wait(timeout=60) == 2
    last_screen_line = shown.decode().rsplit("\x1b[2K", 1)[-1]
    assert last_screen_line.startswith("error: shape 4x3 split over 4 replicas"), repr(shown[-300:])
    assert last_screen_line.count("\n") == 1


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank processes through /proc")
@pytest.mark.parametrize(
    "args",
    [
        ["verify", "--backend", "gloo", "--replicas", "2", "--factory", "sample_models.resnet:resnet_tiny",
         "--input-shape", "3x48x48", "--steps", "12"],
        ["bench", "--shapes", "8x4", "--replicas", "2", "--repeats", "400", "--warmup", "0", "--model", "none",
         "--no-overhead"],
    ],
    ids=["verify", "bench"],
)  # fmt: skip
def test_ctrl_c_during_the_gloo_ranks_exits_130_and_leaves_nothing(tmp_path, args):
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "TMPDIR": str(tmp_path), "COLUMNS": "200"}
    process = subprocess.Popen(
        [sys.executable, "-m", "syncbn_cli", *args],
        cwd=REPOSITORY,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("syncbn-ranks-*")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        assert list(tmp_path.glob("syncbn-ranks-*")), "the ranks never started"
        time.sleep(0.5)  # the ranks are running
        ranks = children_of(process.pid)
        assert ranks, "no rank process found"
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group gets it
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert stderr == "interrupted\n"
    assert list(tmp_path.glob("syncbn-ranks-*")) == []
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in ranks)


@pytest.mark.parametrize(("command", "target"), [("verify", "verify_model"), ("bench", "run_benchmark")])
def test_ctrl_c_in_any_command_exits_130_with_one_line(monkeypatch, command, target):
    import importlib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"syncbn_cli.commands.{command}"), target, interrupted)
    result = runner.invoke(app, [command, *(["--model", "none"] if command == "bench" else [])])
    assert result.exit_code == 130 and result.stderr == "interrupted\n" and result.stdout == ""
