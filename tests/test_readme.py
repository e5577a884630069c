"""The README's Python example runs and prints what the README says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_python_api_example_runs_and_shows_synchronization():
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    lines = dict(line.split(":", 1) for line in printed.getvalue().splitlines())
    assert float(lines["SyncBN vs full batch"]) < 1e-5
    assert lines["running_var equal"].strip() == "True"
    assert float(lines["plain per-replica BN"]) > 1e-2


def test_readme_shows_setup_and_test_commands():
    text = README.read_text()
    assert "pip install -e '.[test]'" in text and "python -m pytest" in text
    # The CPU build where the index serves only CUDA builds, and what happens to an installed torch.
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text
    assert "Any installed torch >= 2.1 is kept" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0" in ci  # the CPU build CI machines serve locally
    for command in ("verify", "convert", "inspect", "revert", "bench"):
        assert f"$ syncbn {command}" in text, f"no worked example of syncbn {command}"
