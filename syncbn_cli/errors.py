"""CLI failures and their exit codes, mapped in one place (``exits_cleanly``).

Exit codes: 0 success or pass, 1 verification mismatch, 2 bad input or usage.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """Input the user can fix: the message says what is wrong and what to do."""


def exits_cleanly(command: F) -> F:
    """Turn ``BadInput`` into one line on stderr (``error: ...``) and exit code 2.

    Example:
        >>> @exits_cleanly
        ... def command():
        ...     raise BadInput("model.pt: no such file")
    """

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BadInput as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return run  # type: ignore[return-value]


def require_positive(**options: int | None) -> None:
    """Refuse counts below 1, naming the option: ``require_positive(replicas=0)``.

    Example:
        >>> require_positive(replicas=2, steps=None)
        >>> require_positive(batch_size=0)
        Traceback (most recent call last):
        ...
        syncbn_cli.errors.BadInput: --batch-size must be at least 1 (got 0)
    """
    for name, value in options.items():
        if value is not None and value < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
