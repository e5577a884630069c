"""Output for people (rich tables on stdout, progress and diagnostics on stderr) and machines.

``--json`` output is written with ``json.dumps`` straight to stdout, never through rich,
which would wrap long lines and swallow ``[...]`` as markup.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

# Piped output (CI logs, files) gets a wide page instead of rich's 80 columns, so tables
# with many columns stay readable; a terminal keeps its own width.
_PIPED_WIDTH = 160
console = Console(highlight=False, width=None if sys.stdout.isatty() else _PIPED_WIDTH)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else _PIPED_WIDTH)


def print_json(document: Any) -> None:
    """Write ``document`` as one JSON document on stdout."""
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    sys.stdout.flush()


def print_csv(rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts with the same keys) as CSV with a header on stdout."""
    if not rows:
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def make_table(title: str | None, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    """A rich table with the given column headers; cells are shown with ``format_cell``."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(format_cell(cell) for cell in row))
    return table


def format_cell(value: Any) -> str:
    """How one value reads in a table: floats in short scientific form, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if value != 0 else "0"
    return str(value)


def layer_count(count: int, kind: str = "") -> str:
    """``"1 BatchNorm layer"``, ``"9 BatchNorm layers"``.

    Example:
        >>> layer_count(1, "BatchNorm"), layer_count(9)
        ('1 BatchNorm layer', '9 layers')
    """
    return f"{count} {kind}{' ' if kind else ''}layer{'' if count == 1 else 's'}"


def note(message: str) -> None:
    """A diagnostic line on stderr (never mixed into results on stdout)."""
    err_console.print(message, markup=False, soft_wrap=True)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int, str], None] | None]:
    """A transient progress bar on stderr, and the ``progress(done, total, description)`` callback that moves it.

    Only on a terminal: piped stderr gets no bar, so that it holds diagnostics alone
    (an error is then the first line, not one after the bar's last frame).
    """
    if not err_console.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def advance(done: int, total: int, text: str) -> None:
            bar.update(task, completed=done, total=total, description=text)

        yield advance
