"""`syncbn inspect` (placeholder until implemented)."""

from syncbn_cli.errors import BadInput


def inspect() -> None:
    """Not implemented yet."""
    raise BadInput("syncbn inspect is not implemented yet")
