"""Run R replicas of one forward in threads, tied together by a ``ReplicaGroup``.

Each thread inherits the caller's grad mode and autocast state (both are
thread-local in torch) and, on CUDA, selects its replica's device. When a replica
raises, the group is told at once so that peers waiting at a SyncBN rendezvous stop
waiting; the error re-raised to the caller is the root cause, never a peer's
"somebody else failed", and it carries a note of what every replica did.

Thread policy for virtual CPU replicas (R replicas on few cores, never oversubscribed):

- replicas take turns (see ``syncbn.comm.threads``): one replica thread runs at a time;
- each replica thread runs its ops on one intra-op thread: an OpenMP team woken from a
  thread that has just taken its turn costs ~50 µs (~0.4 ms to create), more than most
  per-shard ops take;
- the replica threads share one core (Linux): handing the turn on is then a wake-up on
  the same core, ~10 µs, instead of one across cores, which on a virtual machine costs
  ~20 µs and slows the ops after it as much again;
- whole-batch work (a SyncBN layer normalizing every replica's shard at once) is handed
  to the caller's thread, which waits for the replicas anyway: it runs there on every
  intra-op thread, with warm buffers (``syncbn.comm.threads.CallerWork``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from syncbn.comm.threads import ReplicaGroup, ThreadModes
from syncbn.errors import SyncBNPeerError, SyncBNTimeoutError
from syncbn.parallel.replica_threads import POOL

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
    modes = ThreadModes.capture({d.type for d in devices})
    cpu = all(device.type == "cpu" for device in devices)
    caller_threads = torch.get_num_threads()
    # Replica threads are pooled: each forward sets their policy afresh (see the module doc).
    replica_threads, cores = (1, _replica_cores()) if cpu else (caller_threads, _all_cores())

    def work(rank: int) -> None:
        device = devices[rank]
        _current.rank = rank
        torch.set_num_threads(replica_threads)  # this thread's own setting
        _pin_to(cores)
        try:
            group.begin(rank)
            with (
                modes.entered(device.type),
                torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext(),
            ):
                results[rank] = replicas[rank](*args[rank], **kwargs[rank])
        except BaseException as error:  # noqa: BLE001 - handed to the caller below
            errors[rank] = error
            group.fail(rank, error)
        else:
            group.finish(rank)
        finally:
            _current.rank = None
            group.caller.thread_ended()

    # Replica threads set their own count; with OpenMP, a thread that never set its
    # count reads a shared one, so the caller sets its own first (and restores it).
    torch.set_num_threads(caller_threads)
    group.caller.open()
    try:
        POOL.run([functools.partial(work, rank) for rank in range(len(replicas))], wait=group.caller.serve)
    finally:
        torch.set_num_threads(caller_threads)
    if any(error is not None for error in errors):
        raise _root_cause(errors)
    return results


def _all_cores() -> set[int] | None:
    """The cores the caller may run on (Linux), or None where threads cannot be pinned."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return os.sched_getaffinity(0)


def _replica_cores() -> set[int] | None:
    """One core for every replica thread: the one the caller's thread runs on (Linux)."""
    cores = _all_cores()
    core = _current_core()
    return {core} if cores is not None and core in cores else cores


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _current_core() -> int | None:
    libc = _libc()
    if libc is None or not hasattr(libc, "sched_getcpu"):
        return None
    core = libc.sched_getcpu()
    return core if core >= 0 else None


def _pin_to(cores: set[int] | None) -> None:
    if cores is None:
        return
    with contextlib.suppress(OSError):  # a container may forbid it: then threads just float
        os.sched_setaffinity(0, cores)


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
