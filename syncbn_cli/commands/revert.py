"""`syncbn revert` (placeholder until implemented)."""

from syncbn_cli.errors import BadInput


def revert() -> None:
    """Not implemented yet."""
    raise BadInput("syncbn revert is not implemented yet")
