"""Replicas that share a device run as greenlets on the caller's own thread, in turns.

Why: replicas take turns anyway (one runs at a time, see ``syncbn.comm.threads``), so
OS threads bought no parallelism there, only costs. Handing the turn from one thread
to another is a wake-up through the kernel: 10-30 µs each on a quiet machine, several
times that on a busy virtual one, and R of them per SyncBN call plus 2R per forward;
the thread that wakes also finds cold caches, a malloc arena of its own (big blocks
returned to the system and page-faulted in again) and no warm OpenMP team. A greenlet
switch is about a microsecond, and every replica's ops run where ``nn.BatchNorm`` itself
would: on the caller's thread, with its intra-op threads, allocator and caches. Measured
on a 2-core VM: ``parallel_apply`` of four ``nn.Identity`` replicas 80-120 µs instead of
about 500 µs with pooled threads.

What greenlets of one thread share that threads did not: torch's thread-local modes.
Grad mode and autocast are saved for each replica when it switches out and restored
when it switches in, so a replica that waits at a SyncBN call inside ``torch.no_grad()``
or ``torch.autocast`` leaves them to itself. Python context variables are already per
greenlet. Other thread-local torch state entered inside a replica's forward and held
across a SyncBN call (saved-tensor hooks, dispatch modes) is seen by the replicas that
run meanwhile.

Greenlets are kept between forwards, per thread (a greenlet runs only on the thread that
made it): a new one costs little on warm caches, but right after a batch-sized kernel
making and first entering four of them took ~200 µs here (each new greenlet gets fresh
interpreter stack memory), against ~30 µs for four parked ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import greenlet

from syncbn.comm.threads import ReplicaGroup, ThreadModes

# What a parked greenlet hands back when its function has returned.
_DONE = object()
_parked = threading.local()


def run_in_turns(functions: list[Callable[[], None]], group: ReplicaGroup, device_types: Iterable[str]) -> None:
    """Run ``functions[rank]`` (replica ``rank`` of ``group``) as greenlets here; return when all ended.

    Each function must call ``group.begin(rank)`` first and ``group.finish``/``group.fail``
    last, and must not raise. This thread switches to the replica whose turn it is
    (``group.next_to_run()``) until none is left; a replica waiting at a rendezvous
    switches back here. A replica that holds the turn for more than the group's timeout
    fails the group (``ReplicaGroup.check_turn_time``), as waiting threads would.

    Example:
        >>> group, order = ReplicaGroup(2), []
        >>> def replica(rank):
        ...     group.begin(rank)
        ...     order.append(group.exchange(rank, "bn", rank + 1, sum))
        ...     group.finish(rank)
        >>> run_in_turns([lambda: replica(0), lambda: replica(1)], group, ["cpu"])
        >>> order
        [3, 3]
    """
    device_types = list(device_types)
    scheduler = greenlet.getcurrent()
    group.run_as_greenlets(scheduler)
    replicas = _borrow(len(functions))
    done = [False] * len(replicas)  # its function returned: the greenlet is parked again
    callers = ThreadModes.capture(device_types)
    modes = [callers] * len(replicas)  # each replica starts in the caller's modes
    current = callers
    try:
        while (rank := group.next_to_run()) is not None:
            if done[rank]:  # it returned without finish/fail: a bug, never a hang
                raise RuntimeError(f"syncbn: replica {rank} ended without reporting to its group")
            if modes[rank] != current:
                modes[rank].apply()
            replica = replicas[rank]
            replica.parent = scheduler  # where it switches back to (a parked one knew another)
            began = time.monotonic()
            # A parked greenlet takes its function; one waiting in the group ignores it.
            done[rank] = replica.switch(functions[rank]) is _DONE
            if (held := time.monotonic() - began) > group.timeout:
                group.check_turn_time(rank, held)
            current = modes[rank] = ThreadModes.capture(device_types)
            if not done[rank] and group.next_to_run() == rank:
                # It switched back while still holding the turn: it would be resumed forever.
                outcome = replica.throw(RuntimeError(f"syncbn: replica {rank} waited while holding its turn"))
                done[rank] = outcome is _DONE
    finally:
        if current != callers:
            callers.apply()
        _give_back([replica for replica, ended in zip(replicas, done, strict=True) if ended])


def _serve(function: Callable[[], None]) -> None:
    """A pooled greenlet's life: run a function, park, run the next one it is given."""
    while True:
        function()
        del function  # parked, it must not keep the forward's inputs, outputs and replicas alive
        function = greenlet.getcurrent().parent.switch(_DONE)


def _borrow(count: int) -> list[greenlet.greenlet]:
    idle: list[greenlet.greenlet] = _parked.__dict__.setdefault("idle", [])
    borrowed = [idle.pop() for _ in range(min(count, len(idle)))]
    return borrowed + [greenlet.greenlet(_serve) for _ in range(count - len(borrowed))]


def _give_back(replicas: list[greenlet.greenlet]) -> None:
    # Only greenlets parked in _serve come back: one left inside a replica's forward (the
    # scheduler was interrupted) is dropped, and greenlet ends it when it is collected.
    _parked.__dict__.setdefault("idle", []).extend(replicas)
