"""Replicas on different devices run in pooled threads, one at a time, watched by the caller.

One replica runs at a time (R threads at once fight over the GIL at every op); the turn
passes, in rank order, when the replica holding it waits at a SyncBN call or ends.

The caller's thread watches the replica holding the turn. A replica that computes
(its thread keeps using the CPU, here or through torch's intra-op threads) is never given
up on, however long it takes. One that stays blocked without using the CPU (on a lock, a
queue, a sleep or I/O) for the rendezvous' ``timeout`` makes the forward fail: its peers
raise ``SyncBNTimeoutError``, and the thread, still blocked in user code, is abandoned.
Where a thread's CPU time cannot be read, time holding the turn counts instead.

Threads are parked between forwards (starting one costs ~0.1 ms, waking a parked one
~30 µs) and are daemons; a forked child starts with none.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from syncbn.comm.rendezvous import Rendezvous


class _ParkedThread:
    """One daemon thread that runs the functions handed to it, one at a time."""

    def __init__(self, name: str) -> None:
        self._ready = threading.Condition(threading.Lock())
        self._function: Callable[[], None] | None = None
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def start(self, function: Callable[[], None]) -> None:
        with self._ready:
            self._function = function
            self._ready.notify_all()

    def _loop(self) -> None:
        while True:
            with self._ready:
                while self._function is None:
                    self._ready.wait()
                function, self._function = self._function, None
            function()  # never raises: replica work catches everything itself
            del function  # parked, it must not keep the forward's inputs and outputs alive


class _Turns:
    """The ``Schedule`` of one forward's threads: turns in rank order, and the caller's watch."""

    def __init__(self, rendezvous: Rendezvous, count: int) -> None:
        self.rendezvous = rendezvous
        lock = rendezvous.lock
        self.turn = 0
        self.waiting: dict[int, Callable[[], bool]] = {}
        self.ended: set[int] = set()
        self.abandoned: set[int] = set()
        self.threads: list[int | None] = [None] * count  # each replica's thread id, for its CPU clock
        self.wakeups = [threading.Condition(lock) for _ in range(count)]
        self.caller = threading.Condition(lock)

    # Called in replica threads.

    def begin(self, rank: int) -> None:
        with self.rendezvous.lock:
            self.threads[rank] = threading.get_ident()
            self._await(rank, _always)

    def park(self, rank: int, ready: Callable[[], bool]) -> None:
        self.waiting[rank] = ready
        try:
            self._pass_turn(rank)
            self._await(rank, ready)
        finally:
            del self.waiting[rank]

    def end(self, rank: int) -> None:
        with self.rendezvous.lock:
            self.ended.add(rank)
            self._pass_turn(rank)
            self.caller.notify()

    def changed(self) -> None:
        if self.rendezvous.aborted:  # every waiting replica raises now; turns no longer matter
            for wakeup in self.wakeups:
                wakeup.notify()
            self.caller.notify()

    def _await(self, rank: int, ready: Callable[[], bool]) -> None:
        while not (self.rendezvous.aborted or (self.turn == rank and ready())):
            self.wakeups[rank].wait()

    def _pass_turn(self, rank: int) -> None:
        """Hand the turn from ``rank`` to the next replica, in rank order, that can run."""
        if self.turn != rank:
            return
        count = len(self.wakeups)
        for step in range(1, count + 1):
            other = (rank + step) % count
            ready = self.waiting.get(other)
            if other not in self.ended and (ready is None or ready()):
                self.turn = other
                self.wakeups[other].notify()
                return

    # Called in the caller's thread.

    def watch(self) -> None:
        """Return when every replica ended, or every one but those found blocked (abandoned)."""
        timeout = self.rendezvous.timeout
        poll = min(max(timeout / 10, 0.01), 1.0)
        holder, clock, since = None, None, 0.0
        with self.rendezvous.lock:
            while len(self.ended | self.abandoned) < len(self.wakeups):
                self.caller.wait(poll)
                turn = self.turn
                if self.rendezvous.aborted or turn in self.waiting or turn in self.ended:
                    holder = None  # nobody runs user code: the others raise, or wait for each other
                    continue
                if self.rendezvous.combining == turn:
                    holder = None  # in a collective, which has its process group's own timeout
                    continue
                now, used = time.monotonic(), _cpu_time(self.threads[turn])
                if turn != holder or (used is not None and used != clock):
                    holder, clock, since = turn, used, now  # a new holder, or one that computes
                    continue
                if now - since > timeout:
                    self._abandon(turn, readable=used is not None)

    def _abandon(self, rank: int, readable: bool) -> None:
        self.abandoned.add(rank)
        how = "without using the CPU" if readable else "holding its turn"
        reason = (
            f"replica {rank} has been blocked in its forward for over {self.rendezvous.timeout:g} s {how} "
            "(waiting on a lock, a queue, a sleep or I/O?); its thread is abandoned, still blocked"
        )
        self.rendezvous.lock.release()  # abort takes the lock itself
        try:
            self.rendezvous.abort(reason)
        finally:
            self.rendezvous.lock.acquire()


def _always() -> bool:
    return True


def _cpu_time(thread_id: int | None) -> float | None:
    """CPU seconds the thread has used, or None where that cannot be read (or it has not started)."""
    if thread_id is None or not hasattr(time, "pthread_getcpuclockid"):
        return None
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread_id))
    except OSError:
        return None


class ReplicaThreads:
    """A pool of parked threads, borrowed by the replicas of one forward.

    Example:
        >>> out = []
        >>> ReplicaThreads().run_replicas([lambda: out.append(1), lambda: out.append(2)], Rendezvous(2))
        [None, None]
        >>> sorted(out)
        [1, 2]
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_ParkedThread] = []
        self._created = 0

    def run_replicas(self, functions: list[Callable[[], None]], rendezvous: Rendezvous) -> list[None]:
        """Run ``functions[rank]`` (replica ``rank``) each on its own thread, in turns; return when done.

        The functions must not raise (catch inside) and must report to the rendezvous.

        Returns:
            One entry per replica: None, or for a replica abandoned blocked in its
            forward, the string ``"abandoned"``.
        """
        turns = _Turns(rendezvous, len(functions))
        rendezvous.schedule = turns
        threads = self._borrow(len(functions))

        def replica(rank: int, function: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                turns.begin(rank)
                try:
                    function()
                finally:
                    turns.end(rank)

            return run

        for rank, (thread, function) in enumerate(zip(threads, functions, strict=True)):
            thread.start(replica(rank, function))
        try:
            turns.watch()
        finally:
            rendezvous.schedule = None  # no cycle: the forward's tensors go with the last reference
            self._give_back([t for rank, t in enumerate(threads) if rank not in turns.abandoned])
        return ["abandoned" if rank in turns.abandoned else None for rank in range(len(functions))]

    def _borrow(self, count: int) -> list[_ParkedThread]:
        with self._lock:
            borrowed, self._idle = self._idle[:count], self._idle[count:]
            while len(borrowed) < count:
                self._created += 1
                borrowed.append(_ParkedThread(f"syncbn-replica-{self._created - 1}"))
        return borrowed

    def _give_back(self, threads: list[_ParkedThread]) -> None:
        with self._lock:  # first in line again: the next forward gets the threads the last one used
            self._idle = threads + self._idle

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._idle, self._created = [], 0


POOL = ReplicaThreads()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=POOL._forget)
