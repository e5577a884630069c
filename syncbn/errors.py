"""Errors raised by syncbn when replicas cannot synchronize.

Bad arguments raise the usual ``ValueError``/``TypeError``; everything here is a
*domain* failure: the replicas of one forward could not meet at a SyncBN layer.
"""

from __future__ import annotations


class SyncBNError(RuntimeError):
    """Base class of every synchronization failure raised by syncbn.

    Example:
        >>> import syncbn
        >>> issubclass(syncbn.SyncBNTimeoutError, syncbn.SyncBNError)
        True
    """


class SyncBNTimeoutError(SyncBNError):
    """A SyncBN rendezvous could not complete.

    Raised in every waiting replica when a peer did not arrive within the timeout,
    finished its forward without calling the layer (replicas called SyncBN layers a
    different number of times), or when the group was aborted. The message names the
    layer, the call index and which replicas arrived.

    Example:
        >>> import syncbn
        >>> try:
        ...     raise syncbn.SyncBNTimeoutError("layer 'bn' call 0: replicas [0] of 2 arrived")
        ... except syncbn.SyncBNError as error:
        ...     print(error)
        layer 'bn' call 0: replicas [0] of 2 arrived
    """


class SyncBNPeerError(SyncBNTimeoutError):
    """A peer replica raised, so the rendezvous this replica waits in can never complete.

    The peer's exception is attached as ``__cause__`` and as ``peer_error``.

    Example:
        >>> import syncbn
        >>> error = syncbn.SyncBNPeerError("replica 1 raised ValueError", peer_error=ValueError("boom"))
        >>> error.peer_error
        ValueError('boom')
    """

    def __init__(self, message: str, *, peer_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.peer_error = peer_error
