"""CLI failures and their exit codes, mapped in one place (``exits_cleanly``).

Exit codes: 0 success or pass, 1 verification mismatch, 2 bad input or usage, 130 interrupted
(Ctrl-C). Whatever goes wrong, stderr gets one line, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer

from syncbn.workload import NotEnoughMemoryError, is_out_of_memory

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


class BadInput(Exception):
    """Input the user can fix: the message says what is wrong and what to do."""


def exits_cleanly(command: F) -> F:
    """Turn ``BadInput`` into one line on stderr (``error: ...``) and exit code 2.

    Running out of memory is bad input too (the line says so); Ctrl-C prints
    ``interrupted`` and exits with 130. Python warnings print as one ``warning: ...`` line.

    Example:
        >>> @exits_cleanly
        ... def command():
        ...     raise BadInput("model.pt: no such file")
    """

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            try:
                return command(*args, **kwargs)
            except BadInput as error:
                typer.echo(f"error: {error}", err=True)
                raise typer.Exit(EXIT_BAD_INPUT) from None
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(EXIT_INTERRUPTED) from None
            except (MemoryError, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
                message = " ".join(str(error).split()) or type(error).__name__
                typer.echo(f"error: out of memory ({message}): use smaller inputs or batches", err=True)
                raise typer.Exit(EXIT_BAD_INPUT) from None

    return run  # type: ignore[return-value]


@contextlib.contextmanager
def library_errors(*, too_large: str) -> Iterator[None]:
    """The library's refusals as ``BadInput``: bad arguments as they are, a run too large with ``too_large``.

    The library checks every argument before it computes anything, so a ``ValueError`` or
    ``TypeError`` from it is the user's input, and its message already names the argument.

    Example:
        >>> with library_errors(too_large="use a smaller --batch-size"):
        ...     pass
    """
    try:
        yield
    except NotEnoughMemoryError as error:
        raise BadInput(f"{error}: {too_large}") from None
    except (ValueError, TypeError) as error:
        raise BadInput(" ".join(str(error).split())) from None


def show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """A warning as one line on stderr: its message, never the source line that raised it."""
    typer.echo(f"warning: {' '.join(str(message).split())}", err=True)


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


SHOWN = 8  # how many names an error lists before "and N more"


def listing(names: Any) -> str:
    """Up to ``SHOWN`` names, comma-separated, and how many more; ``(none)`` for none.

    Example:
        >>> listing(["a", "b"]), listing([])
        ('a, b', '(none)')
    """
    names = list(names)
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "") if names else "(none)"


def one_line(error: object) -> str:
    """An exception's message on one line (torch's messages span several)."""
    return " ".join(str(error).split())
