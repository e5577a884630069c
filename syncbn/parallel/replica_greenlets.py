"""Replicas that share a device run as greenlets on the caller's own thread, one at a time.

Why not threads: one replica runs at a time anyway (threads fighting over the GIL at
every op made a SyncBN call on a small tensor 10x slower), and on one thread a hand-over
is a greenlet switch of about a microsecond, where waking another thread costs tens, and
every replica's ops run where ``nn.BatchNorm``'s would: on the caller's thread, with its
intra-op threads, allocator and caches.

What greenlets of one thread share that threads would not: torch's thread-local modes.
Grad mode and autocast are saved for each replica when it switches out and restored when
it switches in. Other thread-local state entered inside a replica's forward and held
across a SyncBN call (saved-tensor hooks, dispatch modes) is seen by the replicas that
run meanwhile. A replica blocked in user code blocks the caller's thread, as the same
code blocks a one-device forward: nothing else can run to notice it.

Greenlets are kept between forwards, per thread (a greenlet runs only on the thread
that made it): making and first entering fresh ones costs several times more.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import greenlet

from syncbn.comm.rendezvous import Rendezvous
from syncbn.parallel.thread_modes import ThreadModes

# What a parked greenlet hands back when its function has returned.
_DONE = object()
_idle = threading.local()


class _Turns:
    """The ``Schedule`` of one forward's greenlets: a replica that must wait switches back to the caller."""

    def __init__(self, rendezvous: Rendezvous, scheduler: greenlet.greenlet) -> None:
        self.rendezvous = rendezvous
        self.scheduler = scheduler
        self.waiting: dict[int, Callable[[], bool]] = {}

    def park(self, rank: int, ready: Callable[[], bool]) -> None:
        self.waiting[rank] = ready
        self.rendezvous.lock.release()
        try:
            self.scheduler.switch()
        finally:
            self.rendezvous.lock.acquire()
            del self.waiting[rank]

    def changed(self) -> None:
        """Nothing to wake: the caller's loop looks again after every switch."""

    def runnable(self, rank: int) -> bool:
        ready = self.waiting.get(rank)
        return ready is None or self.rendezvous.aborted or ready()


def run_greenlets(functions: list[Callable[[], None]], rendezvous: Rendezvous, device_types: Iterable[str]) -> None:
    """Run ``functions[rank]`` (replica ``rank`` of ``rendezvous``) as greenlets here; return when all ended.

    Each function must report to the rendezvous (``finish``/``fail``) and not raise. The
    caller switches to the next replica, in rank order, that can run (not started yet,
    or done waiting) until every one has returned.

    Example:
        >>> rendezvous, out = Rendezvous(2), []
        >>> def replica(rank):
        ...     out.append(rendezvous.exchange(rank, "bn", rank + 1, sum))
        ...     rendezvous.finish(rank)
        >>> run_greenlets([lambda: replica(0), lambda: replica(1)], rendezvous, ["cpu"])
        >>> out
        [3, 3]
    """
    device_types = list(device_types)
    scheduler = greenlet.getcurrent()
    turns = _Turns(rendezvous, scheduler)
    rendezvous.schedule = turns
    replicas = _borrow(len(functions))
    ended = [False] * len(replicas)
    callers = ThreadModes.capture(device_types)
    modes = [callers] * len(replicas)  # each replica starts in the caller's modes
    current, rank = callers, len(replicas) - 1
    try:
        while not all(ended):
            rank = _next_runnable(turns, ended, rank)
            if modes[rank] != current:
                modes[rank].apply()
            replica = replicas[rank]
            replica.parent = scheduler  # where it switches back to (a parked one knew another)
            # A parked greenlet takes its function; one waiting in the rendezvous ignores it.
            ended[rank] = replica.switch(functions[rank]) is _DONE
            current = modes[rank] = ThreadModes.capture(device_types)
            if not ended[rank] and rank not in turns.waiting:
                # User code switched greenlets: resumed later, it would find another's state.
                ended[rank] = replica.throw(
                    RuntimeError(
                        f"replica {rank}'s forward switched to another greenlet outside a SyncBN call; replicas "
                        "sharing a device run as greenlets of the caller's thread, which cannot mix with "
                        "greenlet-based code (gevent, eventlet) inside a forward"
                    )
                ) is _DONE
    finally:
        rendezvous.schedule = None  # no cycle: the forward's tensors go with the last reference
        if current != callers:
            callers.apply()
        _give_back([replica for replica, done in zip(replicas, ended, strict=True) if done])


def _next_runnable(turns: _Turns, ended: list[bool], last: int) -> int:
    """The first replica after ``last``, in rank order, that is not done and need not wait."""
    count = len(ended)
    for step in range(1, count + 1):
        rank = (last + step) % count
        if not ended[rank] and turns.runnable(rank):
            return rank
    # Every replica left waits for another: the rendezvous aborts such forwards itself.
    raise RuntimeError("syncbn: every replica waits and none can run (a bug in syncbn: please report it)")


def _serve() -> None:
    """A pooled greenlet's life: park, run the function it is given, park again.

    Functions arrive as what ``switch`` returns, never as arguments: the arguments of a
    greenlet's first switch stay alive as long as it runs, which here is forever.
    """
    while True:
        function = greenlet.getcurrent().parent.switch(_DONE)
        function()
        del function  # parked, it must not keep the forward's inputs, outputs and replicas alive


def _borrow(count: int) -> list[greenlet.greenlet]:
    idle: list[greenlet.greenlet] = _idle.__dict__.setdefault("greenlets", [])
    borrowed = [idle.pop() for _ in range(min(count, len(idle)))]
    while len(borrowed) < count:
        fresh = greenlet.greenlet(_serve)
        fresh.switch()  # to its first park
        borrowed.append(fresh)
    return borrowed


def _give_back(replicas: list[greenlet.greenlet]) -> None:
    # Only greenlets parked in _serve come back: one left inside a replica's forward (the
    # loop above was interrupted) is dropped, and greenlet ends it when it is collected.
    _idle.__dict__.setdefault("greenlets", []).extend(replicas)
