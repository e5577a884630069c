"""Run R replicas of one forward, tied together by a ``ReplicaGroup``.

Replicas that share a device (virtual CPU replicas, or several on one GPU) run as
greenlets on the caller's thread (``syncbn.parallel.replica_greenlets``); replicas on
different devices run in pooled OS threads (``syncbn.parallel.replica_threads``), each
with the caller's grad mode and autocast state (both are thread-local in torch) and its
device selected. When a replica raises, the group is told at once so that peers waiting
at a SyncBN rendezvous stop waiting; the error re-raised to the caller is the root
cause, never a peer's "somebody else failed", and it carries a note of what every
replica did.

Thread policy (R replicas on few cores, never oversubscribed): replicas take turns, one
running at a time (see ``syncbn.comm.threads``). Replicas sharing the CPU all run on the
caller's thread, so their ops use the caller's intra-op threads
(``torch.get_num_threads()``), exactly as ``nn.BatchNorm`` on the whole batch would,
and no other thread exists to compete for the cores.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import greenlet
import torch
from torch import nn

from syncbn.comm.threads import ReplicaGroup, ThreadModes, running_replica
from syncbn.comm.threads import current_replica as current_replica  # re-exported
from syncbn.errors import SyncBNPeerError, SyncBNTimeoutError
from syncbn.parallel.replica_greenlets import run_in_turns
from syncbn.parallel.replica_threads import POOL


def parallel_apply(
    replicas: Sequence[nn.Module],
    args: Sequence[tuple[Any, ...]],
    kwargs: Sequence[dict[str, Any]],
    devices: Sequence[torch.device],
    group: ReplicaGroup,
) -> list[Any]:
    """Call ``replicas[i](*args[i], **kwargs[i])`` for every i, each as its own thread or greenlet.

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
    # The group says whether its replicas share a device (DataParallel sets it so); a group
    # that does not (tests use one on the CPU) gets the threads that separate devices need.
    shared_device = group.shared_device and len(set(devices)) == 1
    # A thread enters the caller's modes and its own device; a greenlet runs in both already.
    modes = None if shared_device else ThreadModes.capture({device.type for device in devices})

    def work(rank: int) -> None:
        device = devices[rank]
        token = running_replica.set(rank)
        try:
            group.begin(rank)
            with contextlib.ExitStack() as entered:
                if modes is not None:
                    entered.enter_context(modes.entered(device.type))
                    if device.type == "cuda":
                        entered.enter_context(torch.cuda.device(device))
                results[rank] = replicas[rank](*args[rank], **kwargs[rank])
        except greenlet.GreenletExit:  # an abandoned greenlet being collected: just end
            raise
        except BaseException as error:  # noqa: BLE001 - handed to the caller below
            errors[rank] = error
            group.fail(rank, error)
        else:
            group.finish(rank)
        finally:
            running_replica.reset(token)

    functions = [functools.partial(work, rank) for rank in range(len(replicas))]
    if shared_device:
        device = devices[0]
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            run_in_turns(functions, group, [device.type])
    else:
        POOL.run(functions)
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
        _add_note(root, f"replica {other}: {outcome}")
    return root


def _add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``; Python 3.10 has no ``add_note``, only the ``__notes__`` convention."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]
