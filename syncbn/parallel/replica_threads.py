"""Parked threads that replicas run on, kept between forwards.

Why not a new thread per replica per forward: starting a thread costs ~0.1 ms, and up
to a few milliseconds right after a parallel op, while torch's OpenMP workers spin on
the cores waiting for more work; waking a parked thread costs ~30 µs either way.

Each forward borrows as many threads as it has replicas and gives them back when they
are done, so forwards running at once (from different threads of the caller) never
share one. Threads are daemons: an idle one never keeps the interpreter alive. A forked
child starts with an empty pool (the parent's threads do not exist in it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


class _ParkedThread:
    """One daemon thread that runs the functions handed to it, one at a time."""

    def __init__(self, name: str) -> None:
        self._ready = threading.Condition(threading.Lock())
        self._function: Callable[[], None] | None = None
        self._done = True
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def start(self, function: Callable[[], None]) -> None:
        with self._ready:
            self._function, self._done = function, False
            self._ready.notify_all()

    def join(self) -> None:
        with self._ready:
            while not self._done:
                self._ready.wait()

    def _loop(self) -> None:
        while True:
            with self._ready:
                while self._function is None:
                    self._ready.wait()
                function, self._function = self._function, None
            try:
                function()  # never raises: replica work catches everything itself
            finally:
                del function  # parked, it must not keep the forward's inputs and outputs alive
                with self._ready:
                    self._done = True
                    self._ready.notify_all()


class ReplicaThreads:
    """A pool of parked threads, borrowed by the replicas of one forward.

    Example:
        >>> pool = ReplicaThreads()
        >>> out = []
        >>> pool.run([lambda: out.append(1), lambda: out.append(2)])
        >>> sorted(out)
        [1, 2]
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_ParkedThread] = []
        self._created = 0

    def run(self, functions: list[Callable[[], None]], wait: Callable[[], None] | None = None) -> None:
        """Run each function on its own thread; call ``wait`` (if given) here meanwhile; return when all ended.

        The functions must not raise (catch inside): an escaping error would be lost.
        """
        threads = self._borrow(len(functions))
        started = []
        try:
            for thread, function in zip(threads, functions, strict=True):
                thread.start(function)
                started.append(thread)
            if wait is not None:
                wait()
        finally:
            for thread in started:
                thread.join()
            self._give_back(threads)

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
