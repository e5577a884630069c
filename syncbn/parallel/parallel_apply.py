"""Run R replicas of one forward in threads, tied together by a ``ReplicaGroup``.

Each thread inherits the caller's grad mode and autocast state (both are
thread-local in torch) and, on CUDA, selects its replica's device. When a replica
raises, the group is told at once so that peers waiting at a SyncBN rendezvous stop
waiting; the error re-raised to the caller is the root cause, never a peer's
"somebody else failed", and it carries a note of what every replica did.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from syncbn.comm.threads import ReplicaGroup
from syncbn.errors import SyncBNPeerError, SyncBNTimeoutError

_current = threading.local()


def current_replica() -> int | None:
    """The rank of the replica running on this thread, or None outside ``parallel_apply``.

    Lets forward hooks on a replicated model tell replicas apart (hooks registered on the
    master fire on every replica, with the replica's module).

    Example:
        >>> current_replica() is None
        True
    """
    return getattr(_current, "rank", None)


def parallel_apply(
    replicas: Sequence[nn.Module],
    args: Sequence[tuple[Any, ...]],
    kwargs: Sequence[dict[str, Any]],
    devices: Sequence[torch.device],
    group: ReplicaGroup,
) -> list[Any]:
    """Call ``replicas[i](*args[i], **kwargs[i])`` for every i, each in its own thread.

    Returns:
        The outputs in replica order.

    Raises:
        The first root-cause error (a replica's own exception; else a rendezvous
        timeout), with one note per replica saying how it ended.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> cpu = torch.device("cpu")
        >>> outs = parallel_apply([nn.Identity()] * 2, [(torch.ones(1),), (torch.zeros(1),)],
        ...                       [{}, {}], [cpu, cpu], ReplicaGroup(2))
        >>> [o.item() for o in outs]
        [1.0, 0.0]
    """
    results: list[Any] = [None] * len(replicas)
    errors: list[BaseException | None] = [None] * len(replicas)
    grad_enabled = torch.is_grad_enabled()
    autocast = {
        device_type: (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        for device_type in {d.type for d in devices}
    }

    def work(rank: int) -> None:
        device = devices[rank]
        enabled, dtype = autocast[device.type]
        _current.rank = rank
        try:
            group.begin(rank)
            with (
                torch.set_grad_enabled(grad_enabled),
                torch.autocast(device.type, dtype=dtype, enabled=enabled),
                torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext(),
            ):
                results[rank] = replicas[rank](*args[rank], **kwargs[rank])
        except BaseException as error:  # noqa: BLE001 - handed to the caller below
            errors[rank] = error
            group.fail(rank, error)
        else:
            group.finish(rank)

    threads = [
        threading.Thread(target=work, args=(rank,), name=f"syncbn-replica-{rank}") for rank in range(len(replicas))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(error is not None for error in errors):
        raise _root_cause(errors)
    return results


def _root_cause(errors: list[BaseException | None]) -> BaseException:
    """Pick the error to raise: a replica's own error beats a timeout beats a peer notice."""

    def rank_of(error: BaseException) -> int:
        if isinstance(error, SyncBNPeerError):
            return 2
        if isinstance(error, SyncBNTimeoutError):
            return 1
        return 0

    failed = [(rank, error) for rank, error in enumerate(errors) if error is not None]
    _, root = min(failed, key=lambda item: rank_of(item[1]))
    for other, error in enumerate(errors):
        outcome = "finished" if error is None else f"{type(error).__name__}: {error}"
        root.add_note(f"replica {other}: {outcome}")
    return root
