"""`syncbn verify` (placeholder until implemented)."""

from syncbn_cli.errors import BadInput


def verify() -> None:
    """Not implemented yet."""
    raise BadInput("syncbn verify is not implemented yet")
