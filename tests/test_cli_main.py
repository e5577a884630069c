"""Every command is registered, documented with an example, and reachable both ways."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from syncbn_cli.main import app

COMMANDS = ["convert", "verify", "bench", "inspect", "revert"]
runner = CliRunner()


def test_top_level_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_an_example(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert f"syncbn {command}" in result.stdout, f"`syncbn {command} --help` shows no example"
    assert "Not implemented" not in result.stdout


def test_unknown_command_is_a_usage_error():
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2


@pytest.mark.slow
def test_python_dash_m_is_the_same_program():
    result = subprocess.run(
        [sys.executable, "-m", "syncbn_cli", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0
    assert "Usage: syncbn" in result.stdout
    for command in COMMANDS:
        assert command in result.stdout
