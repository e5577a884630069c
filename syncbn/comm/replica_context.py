"""Which replica a SyncBN layer is, and which replica's forward is running.

``DataParallel`` binds every synchronized layer of every replica to a
``ReplicaContext`` (the forward's rendezvous, the replica's rank, the layer's name);
master modules never carry one. While a replica's forward runs, ``current_replica()``
is its rank, per thread and per greenlet.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from torch import nn

from syncbn.comm.rendezvous import Rendezvous

_ATTRIBUTE = "_syncbn_replica"

# Per thread and per greenlet: the rank of the replica whose forward runs there.
running_replica: ContextVar[int | None] = ContextVar("syncbn_running_replica", default=None)
# How many replica forwards run in this process, on any thread. torch.compile cannot read
# a ContextVar (a graph break) but reads a module global and guards on it: while it is 0,
# no replica runs here either.
_running_replicas = 0
_running_lock = threading.Lock()


@dataclass(frozen=True)
class ReplicaContext:
    """What one replica of a SyncBN layer needs to synchronize: its rendezvous, rank and layer name.

    Example:
        >>> context = ReplicaContext(Rendezvous(2), rank=1, layer="bn")
        >>> context.world_size
        2
    """

    rendezvous: Rendezvous
    rank: int
    layer: str

    @property
    def world_size(self) -> int:
        return self.rendezvous.world_size


def bind_replica(module: nn.Module, context: ReplicaContext) -> None:
    """Attach ``context`` to a replica module (never to a master: replicas are discarded)."""
    module.__dict__[_ATTRIBUTE] = context


def replica_context(module: nn.Module) -> ReplicaContext | None:
    """The context of a replica module, or None outside a synchronized forward.

    Example:
        >>> replica_context(nn.BatchNorm2d(3)) is None
        True
    """
    return module.__dict__.get(_ATTRIBUTE)


@contextlib.contextmanager
def running_as(rank: int) -> Iterator[None]:
    """Run the body as replica ``rank``'s forward: ``current_replica()`` is ``rank`` in it.

    Example:
        >>> with running_as(1):
        ...     current_replica()
        1
    """
    global _running_replicas
    token = running_replica.set(rank)
    with _running_lock:
        _running_replicas += 1
    try:
        yield
    finally:
        with _running_lock:
            _running_replicas -= 1
        running_replica.reset(token)


def current_replica() -> int | None:
    """The rank of the replica running on this thread, or None outside a ``DataParallel`` forward.

    Lets forward hooks on a replicated model tell replicas apart (hooks registered on the
    master fire on every replica, with the replica's module).

    Example:
        >>> current_replica() is None
        True
    """
    if _running_replicas == 0:
        return None
    return running_replica.get()
