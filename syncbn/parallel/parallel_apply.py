"""Run R replicas of one forward, tied together by a ``Rendezvous``.

Replicas that share a device (virtual CPU replicas, or several on one GPU) run as
greenlets on the caller's thread (``replica_greenlets``); replicas on different devices
run in pooled threads (``replica_threads``), each with the caller's grad mode and
autocast state and its own device selected. Either way one replica runs at a time, so
R replicas never oversubscribe the cores: on a CPU, every replica's ops run on the
caller's thread with its intra-op threads, as ``nn.BatchNorm`` on the whole batch would.

When a replica raises, the rendezvous is told at once so that its peers stop waiting;
the error re-raised to the caller is the root cause, never a peer's "somebody else
failed", with a note of how every replica ended.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import greenlet
import torch
from torch import nn

from syncbn.comm.rendezvous import Rendezvous
from syncbn.comm.replica_context import current_replica as current_replica  # re-exported
from syncbn.comm.replica_context import running_as
from syncbn.errors import SyncBNPeerError, SyncBNTimeoutError
from syncbn.parallel.replica_greenlets import run_greenlets
from syncbn.parallel.replica_threads import POOL
from syncbn.parallel.thread_modes import ThreadModes


# Replicas run eagerly under torch.compile. Dynamo would compile a greenlet replica's
# frames with a graph break at each SyncBN (it meets the other replicas there), and a
# compiled graph that gets that output as input and changes it in place
# (F.silu(bn(x), inplace=True)) fails in backward (torch 2.13). Threads are never compiled.
@torch.compiler.disable
def parallel_apply(
    replicas: Sequence[nn.Module],
    args: Sequence[tuple[Any, ...]],
    kwargs: Sequence[dict[str, Any]],
    devices: Sequence[torch.device],
    rendezvous: Rendezvous,
) -> list[Any]:
    """Call ``replicas[i](*args[i], **kwargs[i])`` for every i, as greenlets or threads (see above).

    Returns:
        The outputs in replica order.

    Raises:
        The first root-cause error (a replica's own exception; else a rendezvous
        timeout), with one note per replica saying how it ended.

    Example:
        >>> cpu = torch.device("cpu")
        >>> outs = parallel_apply([nn.Identity()] * 2, [(torch.ones(1),), (torch.zeros(1),)],
        ...                       [{}, {}], [cpu, cpu], Rendezvous(2))
        >>> [o.item() for o in outs]
        [1.0, 0.0]
    """
    results: list[Any] = [None] * len(replicas)
    errors: list[BaseException | None] = [None] * len(replicas)
    in_threads = runs_in_threads(devices)
    # A thread enters the caller's modes and its own device; a greenlet runs in both already.
    modes = ThreadModes.capture({device.type for device in devices}) if in_threads else None

    def work(rank: int) -> None:
        device = devices[rank]
        with running_as(rank):
            try:
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
                rendezvous.fail(rank, error)
            else:
                rendezvous.finish(rank)

    functions = [functools.partial(work, rank) for rank in range(len(replicas))]
    try:
        if in_threads:
            outcomes = POOL.run_replicas(functions, rendezvous)
        else:
            device = devices[0]
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                run_greenlets(functions, rendezvous, [device.type])
            outcomes = [None] * len(replicas)
    finally:
        rendezvous.close()  # the posts hold replica layers, which hold the rendezvous: no cycle
    for rank, outcome in enumerate(outcomes):
        if outcome == "abandoned":  # blocked in user code: it has no error of its own to raise
            errors[rank] = SyncBNTimeoutError(rendezvous.abort_reason or f"replica {rank} was abandoned")
    if any(error is not None for error in errors):
        raise _root_cause(errors, outcomes)
    return results


def runs_in_threads(devices: Sequence[torch.device]) -> bool:
    """Whether replicas on ``devices`` run in threads (several devices) rather than greenlets (one).

    Example:
        >>> runs_in_threads([torch.device("cpu")] * 4)
        False
    """
    return len(set(devices)) > 1


def _root_cause(errors: list[BaseException | None], outcomes: list[str | None]) -> BaseException:
    """Pick the error to raise: a replica's own error beats a timeout beats a peer notice."""

    def rank_of(error: BaseException) -> int:
        if isinstance(error, SyncBNPeerError):
            return 2
        if isinstance(error, SyncBNTimeoutError):
            return 1
        return 0

    failed = [(rank, error) for rank, error in enumerate(errors) if error is not None]
    _, root = min(failed, key=lambda item: rank_of(item[1]))
    for other, (error, outcome) in enumerate(zip(errors, outcomes, strict=True)):
        if outcome == "abandoned":
            ended = "still blocked in its forward; its thread was abandoned"
        else:
            ended = "finished" if error is None else f"{type(error).__name__}: {error}"
        _add_note(root, f"replica {other}: {ended}")
    return root


def _add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``; Python 3.10 has no ``add_note``, only the ``__notes__`` convention."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]
