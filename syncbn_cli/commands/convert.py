"""`syncbn convert` (placeholder until implemented)."""

from syncbn_cli.errors import BadInput


def convert() -> None:
    """Not implemented yet."""
    raise BadInput("syncbn convert is not implemented yet")
