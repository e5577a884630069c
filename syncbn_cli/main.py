"""The ``syncbn`` typer application: registers the commands; errors map to exit codes in errors.py."""

from __future__ import annotations

import warnings
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from syncbn_cli.commands.bench import bench
from syncbn_cli.commands.convert import convert
from syncbn_cli.commands.inspect import inspect
from syncbn_cli.commands.revert import revert
from syncbn_cli.commands.verify import verify
from syncbn_cli.errors import exits_cleanly, show_warning


def _as_flag(option: Any) -> Any:
    # typer shows every option's type; --help takes no value, so it shows none.
    if option is not None:
        option.metavar = ""
    return option


class _Command(TyperCommand):
    """A command whose ``--help`` reads as the flag it is."""

    def get_help_option(self, ctx: Any) -> Any:
        return _as_flag(super().get_help_option(ctx))


class _Group(TyperGroup):
    def get_help_option(self, ctx: Any) -> Any:
        return _as_flag(super().get_help_option(ctx))


app = typer.Typer(
    name="syncbn",
    help="Synchronized BatchNorm for PyTorch: convert a model's BatchNorm layers, verify that R replicas "
    "train exactly like one device on the whole batch, save the weights, and benchmark.",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (convert, verify, bench, inspect, revert):
    app.command(command.__name__, cls=_Command)(exits_cleanly(command))


def main() -> None:
    """Entry point of the ``syncbn`` console script and of ``python -m syncbn_cli``."""
    warnings.showwarning = show_warning  # also for warnings raised before a command runs
    app(prog_name="syncbn")
