"""`syncbn bench` (placeholder until implemented)."""

from syncbn_cli.errors import BadInput


def bench() -> None:
    """Not implemented yet."""
    raise BadInput("syncbn bench is not implemented yet")
