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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import greenlet

from syncbn.comm.threads import ReplicaGroup, ThreadModes


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
    group.run_as_greenlets(greenlet.getcurrent())
    replicas = [greenlet.greenlet(function) for function in functions]
    callers = ThreadModes.capture(device_types)
    modes = [callers] * len(replicas)  # each replica starts in the caller's modes
    current = callers
    try:
        while (rank := group.next_to_run()) is not None:
            replica = replicas[rank]
            if replica.dead:  # it ended without finish/fail: a bug, never a hang
                raise RuntimeError(f"syncbn: replica {rank} ended without reporting to its group")
            if modes[rank] != current:
                modes[rank].apply()
            started = time.monotonic()
            replica.switch()
            if (held := time.monotonic() - started) > group.timeout:
                group.check_turn_time(rank, held)
            current = modes[rank] = ThreadModes.capture(device_types)
            if not replica.dead and group.next_to_run() == rank:
                # It switched back while still holding the turn: it would be resumed forever.
                replica.throw(RuntimeError(f"syncbn: replica {rank} waited while holding its turn"))
    finally:
        if current != callers:
            callers.apply()
