"""Where the replicas of one forward meet at each SyncBN call.

Each replica posts what it brings to a slot keyed by (layer, call index); the last to
arrive combines the posts of all, and every replica returns that combination. Combining
is done with differentiable tensor ops, so the backward needs no meeting: autograd
follows the graph across replicas by itself (on the CPU it runs every replica's backward
on one thread, where a meeting would wait forever).

A rendezvous never hangs. Every waiting replica raises, naming the layer, the call and
the replicas that arrived, as soon as a peer raised (``SyncBNPeerError``), a peer
finished its forward without making the call, every replica still running waits at a
different call, or the runner reports a peer blocked in its forward
(``SyncBNTimeoutError``). How replicas run and wait is the runner's business
(``syncbn.parallel``): it attaches a ``Schedule``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from syncbn.errors import SyncBNError, SyncBNPeerError, SyncBNTimeoutError

_PENDING = object()


class Schedule(Protocol):
    """How the replicas of a rendezvous wait; implemented by the runners in ``syncbn.parallel``."""

    def park(self, rank: int, ready: Callable[[], bool]) -> None:
        """Suspend replica ``rank`` until ``ready()`` or an abort; called and returning with ``lock`` held."""

    def changed(self) -> None:
        """The rendezvous changed (a result, an end, an abort): parked replicas may be ready; ``lock`` held."""


@dataclass
class _Slot:
    """One meeting: the values posted for one (layer, call index)."""

    values: dict[int, Any] = field(default_factory=dict)
    result: Any = _PENDING


@dataclass
class _Abort:
    """Why the replicas can no longer meet; turned into one error per waiting replica."""

    reason: str
    peer_error: BaseException | None = None


class Rendezvous:
    """The meetings of ``world_size`` replicas running one forward.

    A rendezvous lives for one forward: ``DataParallel`` makes a new one each call, so a
    failed forward leaves nothing behind for the next.

    Args:
        world_size: number of replicas.
        timeout: seconds a replica may stay blocked in its forward (not computing)
            before its peers give up on it; the runner measures it.
        one_device: every replica runs on one device, so SyncBN may join their shards
            and normalize them at once (``syncbn.functional``).
        across_processes: in a torch.distributed job, SyncBN also reduces the replicas'
            statistics across the processes of its group.

    Example:
        >>> from syncbn.parallel.replica_threads import ReplicaThreads
        >>> rendezvous = Rendezvous(2, timeout=5.0)
        >>> out = {}
        >>> def replica(rank):
        ...     out[rank] = rendezvous.exchange(rank, "bn", rank + 1, sum)
        >>> ReplicaThreads().run_replicas([lambda: replica(0), lambda: replica(1)], rendezvous)
        [None, None]
        >>> sorted(out.items())
        [(0, 3), (1, 3)]
    """

    def __init__(
        self, world_size: int, timeout: float = 60.0, *, one_device: bool = False, across_processes: bool = True
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1 (got {world_size})")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds (got {timeout})")
        self.world_size = world_size
        self.timeout = float(timeout)
        self.one_device = one_device
        self.across_processes = across_processes
        self.lock = threading.Lock()
        self.schedule: Schedule | None = None
        self.combining: int | None = None  # the rank combining a slot's posts, if any
        self._slots: dict[tuple[str, int], _Slot] = {}
        self._calls: Counter[tuple[int, str]] = Counter()
        self._waiting: dict[int, tuple[str, int]] = {}
        self._blocked = 0  # replicas waiting at meetings not complete yet
        self._ended: set[int] = set()
        self._abort: _Abort | None = None

    @property
    def aborted(self) -> bool:
        return self._abort is not None

    @property
    def abort_reason(self) -> str | None:
        """Why the replicas can no longer meet, or None while they can."""
        return None if self._abort is None else self._abort.reason

    def exchange(self, rank: int, layer: str, value: Any, combine: Callable[[list[Any]], Any]) -> Any:
        """Post ``value`` for this rank's next call of ``layer``; return ``combine`` of every rank's value.

        The last replica to arrive runs ``combine`` on the values in rank order; every
        replica returns the same result object.

        Raises:
            SyncBNTimeoutError: a peer can no longer arrive.
            SyncBNPeerError: a peer raised.
        """
        with self.lock:
            if len(self._ended) == self.world_size:
                raise SyncBNError(
                    f"SyncBN layer '{layer}' was called after its DataParallel forward ended, as when "
                    "torch.utils.checkpoint recomputes it during backward: replicas in one process cannot "
                    "meet again there; keep SyncBN layers outside checkpointed segments, or run one replica "
                    "per process (torchrun), where the recomputation reduces again"
                )
            call = self._calls[(rank, layer)]
            self._calls[(rank, layer)] += 1
            key = (layer, call)
            slot = self._slots.setdefault(key, _Slot())
            slot.values[rank] = value
            if self._abort is not None:
                raise self._error(key, slot)
            if len(slot.values) < self.world_size:
                return self._wait(rank, key, slot)
            self.combining = rank
        # Last to arrive: combine outside the lock, so that other threads are not held up.
        try:
            result = combine([slot.values[r] for r in range(self.world_size)])
        except BaseException as error:
            self.fail(rank, error)
            raise
        finally:
            self.combining = None
        with self.lock:
            slot.result = result
            self._blocked -= len(slot.values) - 1  # everyone but this replica waited here
            self._changed()
        return result

    def finish(self, rank: int) -> None:
        """Record that ``rank`` returned from its forward: it will make no more calls."""
        with self.lock:
            self._ended.add(rank)
            self._check_progress()
            self._changed()

    def fail(self, rank: int, error: BaseException) -> None:
        """Record that ``rank`` raised ``error``; every waiting peer raises ``SyncBNPeerError``."""
        with self.lock:
            self._ended.add(rank)
            if self._abort is None:
                self._set_abort(_Abort(f"replica {rank} raised {type(error).__name__}: {error}", peer_error=error))
            self._changed()

    def close(self) -> None:
        """Drop what the replicas posted (their tensors and layers) once the forward is over."""
        with self.lock:
            self._slots.clear()

    def abort(self, reason: str) -> None:
        """Give up on the forward (the runner found a replica blocked): every waiting replica raises."""
        with self.lock:
            if self._abort is None:
                self._set_abort(_Abort(reason))
            self._changed()

    def _wait(self, rank: int, key: tuple[str, int], slot: _Slot) -> Any:
        self._waiting[rank] = key
        self._blocked += 1
        try:
            if self._ended or self._blocked == self.world_size:
                self._check_progress()  # a replica ended, or none can run: either may be final
            self.schedule.park(rank, lambda: slot.result is not _PENDING)
            if self._abort is None:
                return slot.result
            raise self._error(key, slot)
        finally:
            del self._waiting[rank]

    def waits(self, rank: int) -> bool:
        """Whether ``rank`` is parked at a meeting that is not complete yet (lock held)."""
        key = self._waiting.get(rank)
        return key is not None and self._slots[key].result is _PENDING

    def _check_progress(self) -> None:
        """Abort at once when some waiting replica can provably never be joined."""
        if self._abort is not None:
            return
        stuck = {rank: key for rank, key in self._waiting.items() if self._slots[key].result is _PENDING}
        for key in stuck.values():
            gone = sorted(self._ended - set(self._slots[key].values))
            if gone:
                self._set_abort(
                    _Abort(
                        f"replica(s) {gone} finished the forward without making this call; "
                        "every replica must call each SyncBN layer the same number of times"
                    )
                )
                return
        running = set(range(self.world_size)) - self._ended
        if running and running <= set(stuck):
            where = ", ".join(f"replica {r} at '{layer}' call {call}" for r, (layer, call) in sorted(stuck.items()))
            self._set_abort(
                _Abort(
                    f"every replica waits at a different call ({where}); "
                    "every replica must call each SyncBN layer the same number of times"
                )
            )

    def _set_abort(self, abort: _Abort) -> None:
        self._abort = abort

    def _changed(self) -> None:
        if self.schedule is not None:
            self.schedule.changed()

    def _error(self, key: tuple[str, int], slot: _Slot) -> SyncBNTimeoutError:
        layer, call = key
        abort = self._abort
        arrived = sorted(slot.values)
        message = f"SyncBN layer '{layer}' call {call}: replicas {arrived} of {self.world_size} arrived; {abort.reason}"
        if abort.peer_error is not None:
            error = SyncBNPeerError(message, peer_error=abort.peer_error)
            error.__cause__ = abort.peer_error
            return error
        return SyncBNTimeoutError(message)
