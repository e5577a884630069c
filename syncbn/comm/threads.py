"""The threads way: R replicas of one forward, in threads, meeting at each SyncBN call.

Each replica posts what it brings to a rendezvous keyed by (layer, call index), and
the last one to arrive combines the posts for all. Replicas on different devices post
their local statistics, which are merged on the first replica's device and copied to
every other; replicas sharing a device (virtual CPU replicas) post their shards, which
are normalized at once as the full batch (see ``syncbn.functional``). Either way the
combination is made of ordinary differentiable tensor ops, so the backward pass needs
no rendezvous at all: autograd follows the graph across replicas by itself. That is
not only simpler, it is required: on the CPU the autograd engine runs every replica's
backward on *one* thread, so a blocking exchange inside a backward would wait for a
peer that can never run.

Replicas take turns: one replica runs at a time and hands the turn on when it waits at
a rendezvous or finishes; the last to arrive combines and runs on. Replicas that share a
device run as greenlets on the caller's own thread (``syncbn.parallel.replica_greenlets``),
where handing the turn on is a switch of about a microsecond; replicas on different
devices run in OS threads, where it is a wake-up. Why turns even with threads: R Python
threads running at once fight over the GIL at every tensor op (each op releases and
re-acquires it), which made a SyncBN call on a tiny tensor 10x slower than the work it
does. Taking turns, each replica's ops get every core, and the order of work, and so
the result, is the same on every run.

A rendezvous that cannot complete never hangs: waiting replicas raise
``SyncBNTimeoutError`` after ``timeout`` seconds, at once when a peer finished its
forward without making the call or when every live replica waits at a different call,
and ``SyncBNPeerError`` as soon as a peer raised. Greenlets cannot time out while a peer
runs; the scheduler fails the group when a replica held the turn longer than ``timeout``
(``check_turn_time``), as soon as it yields.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import greenlet
import torch
from torch import Tensor, nn

from syncbn.errors import SyncBNError, SyncBNPeerError, SyncBNTimeoutError
from syncbn.stats import BatchStatistics, merge_statistics

_PENDING = object()
# Replica modules carry their context in this attribute; master modules never have it.
REPLICA_ATTRIBUTE = "_syncbn_replica"


@dataclass
class _Slot:
    """One rendezvous: the values posted for one (layer, call index)."""

    values: dict[int, Any] = field(default_factory=dict)
    result: Any = _PENDING


@dataclass
class _Abort:
    """Why a group can no longer make progress; turned into one error per replica."""

    reason: str
    peer_error: BaseException | None = None


class ReplicaGroup:
    """The rendezvous of ``world_size`` replicas that run one forward in threads.

    A group lives for one forward: ``DataParallel`` makes a new one each call, so a
    failed forward leaves nothing behind for the next.

    Args:
        world_size: number of replicas.
        timeout: seconds a replica waits for its peers at one call before giving up.
        shared_device: every replica runs on one device, so SyncBN may normalize their
            shards at once and ``parallel_apply`` runs them as greenlets of the caller's
            thread (``DataParallel`` sets it for virtual CPU replicas).

    Example:
        >>> import threading
        >>> group = ReplicaGroup(2, timeout=5.0)
        >>> out = {}
        >>> def run(rank):
        ...     out[rank] = group.exchange(rank, "bn", rank + 1, sum)
        ...     group.finish(rank)
        >>> threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
        >>> for t in threads: t.start()
        >>> for t in threads: t.join()
        >>> dict(sorted(out.items()))
        {0: 3, 1: 3}
    """

    def __init__(self, world_size: int, timeout: float = 60.0, *, shared_device: bool = False) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1 (got {world_size})")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds (got {timeout})")
        self.world_size = world_size
        self.timeout = float(timeout)
        self.shared_device = shared_device
        # One condition per waiting rank, all on one lock: handing the turn on wakes exactly
        # the replica that gets it (notify_all would wake R-1 threads to go back to sleep).
        # Made when a thread first waits: greenlets never need one.
        self._lock = threading.Lock()
        self._wakeups: dict[int, threading.Condition] = {}
        self._slots: dict[tuple[str, int], _Slot] = {}
        self._calls: Counter[tuple[int, str]] = Counter()
        self._waiting: dict[int, tuple[str, int]] = {}
        self._finished: set[int] = set()
        self._abort: _Abort | None = None
        self._turn = 0  # the rank whose thread may run now
        # Set when replicas are greenlets of one thread: waiting switches to this one.
        self._scheduler: greenlet.greenlet | None = None

    def begin(self, rank: int) -> None:
        """Block until it is ``rank``'s turn to start its forward (rank 0 starts at once).

        Raises:
            SyncBNTimeoutError: no turn came within ``timeout`` (a peer is stuck), or the
                group was aborted.
        """
        with self._lock:
            self._wait_for_turn(rank, f"replica {rank} never got its turn to start")
            if self._abort is not None:
                raise self._error(("<start>", 0), _Slot())

    def exchange(self, rank: int, layer: str, value: Any, combine: Callable[[list[Any]], Any]) -> Any:
        """Post ``value`` for this rank's next call of ``layer``; return ``combine(all values)``.

        The last replica to arrive runs ``combine`` on the values in rank order; every
        replica returns the same result object.

        Raises:
            SyncBNTimeoutError: a peer never arrived, or can no longer arrive.
            SyncBNPeerError: a peer raised.
        """
        with self._lock:
            if len(self._finished) == self.world_size:
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
            # Last to arrive: keep the turn, merge, and run on.
        # Last to arrive: combine outside the lock so waiting threads are not blocked.
        try:
            result = combine([slot.values[r] for r in range(self.world_size)])
        except BaseException as error:
            self.fail(rank, error)
            raise
        with self._lock:
            slot.result = result  # the waiting replicas read it when their turn comes
        return result

    def finish(self, rank: int) -> None:
        """Record that ``rank`` returned from its forward: it will make no more calls."""
        with self._lock:
            self._finished.add(rank)
            self._check_progress()
            self._pass_turn(rank)

    def fail(self, rank: int, error: BaseException) -> None:
        """Record that ``rank`` raised ``error``; every waiting peer raises ``SyncBNPeerError``."""
        with self._lock:
            self._finished.add(rank)
            if self._abort is None:
                self._set_abort(_Abort(f"replica {rank} raised {type(error).__name__}: {error}", peer_error=error))
            self._pass_turn(rank)

    def run_as_greenlets(self, scheduler: greenlet.greenlet) -> None:
        """From now on replicas are greenlets of one thread that ``scheduler`` switches to.

        A replica that must wait switches back to ``scheduler``, which resumes
        ``next_to_run()`` (see ``syncbn.parallel.replica_greenlets``).
        """
        self._scheduler = scheduler

    def next_to_run(self) -> int | None:
        """The rank to resume next: the turn's, or after an abort each unfinished rank in order; None when all ended.

        Example:
            >>> group = ReplicaGroup(2)
            >>> group.next_to_run()
            0
            >>> group.finish(0); group.next_to_run()
            1
            >>> group.finish(1); group.next_to_run() is None
            True
        """
        with self._lock:
            if self._abort is not None:
                return next((r for r in range(self.world_size) if r not in self._finished), None)
            return None if self._turn in self._finished else self._turn

    def check_turn_time(self, rank: int, seconds: float) -> None:
        """Abort when ``rank`` held the turn for more than ``timeout`` seconds.

        For greenlets, whose peers cannot time out while one runs: what a waiting thread
        reports after ``timeout`` seconds, the scheduler reports when the turn comes back.
        """
        if seconds <= self.timeout:
            return
        with self._lock:
            if self._abort is None:
                reason = f"replica {rank} did not reach its next SyncBN call within {self.timeout:g} s"
                self._set_abort(_Abort(reason))

    def _park(self, rank: int, timeout: float) -> None:
        """Wait (lock held) until woken: on a condition as a thread, by switching away as a greenlet."""
        if self._scheduler is None:
            wakeup = self._wakeups.get(rank)
            if wakeup is None:
                wakeup = self._wakeups[rank] = threading.Condition(self._lock)
            wakeup.wait(timeout)
            return
        self._lock.release()
        try:
            self._scheduler.switch()
        finally:
            self._lock.acquire()

    def _wait(self, rank: int, key: tuple[str, int], slot: _Slot) -> Any:
        self._waiting[rank] = key
        try:
            self._check_progress()
            self._pass_turn(rank)
            deadline = time.monotonic() + self.timeout
            while slot.result is _PENDING and self._abort is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(self.world_size)) - set(slot.values))
                    self._set_abort(_Abort(f"replica(s) {missing} did not arrive within {self.timeout:g} s"))
                    break
                self._park(rank, remaining)
            if slot.result is not _PENDING:
                self._wait_for_turn(rank, f"replica {self._turn} did not reach its next SyncBN call")
            if slot.result is not _PENDING and self._abort is None:
                return slot.result
            raise self._error(key, slot)
        finally:
            del self._waiting[rank]

    def _wait_for_turn(self, rank: int, reason: str) -> None:
        deadline = time.monotonic() + self.timeout
        while self._turn != rank and self._abort is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._set_abort(_Abort(f"{reason} within {self.timeout:g} s"))
                return
            self._park(rank, remaining)

    def _pass_turn(self, rank: int) -> None:
        """Hand the turn from ``rank`` to the next replica that can run, in rank order."""
        if self._turn != rank:
            return
        for step in range(1, self.world_size + 1):
            other = (rank + step) % self.world_size
            waiting_at = self._waiting.get(other)
            blocked = waiting_at is not None and len(self._slots[waiting_at].values) < self.world_size
            if other not in self._finished and not blocked:
                self._turn = other
                if (wakeup := self._wakeups.get(other)) is not None:  # None: it never waited
                    wakeup.notify()
                return

    def _check_progress(self) -> None:
        """Abort at once when some waiting replica can provably never be joined."""
        if self._abort is not None:
            return
        # A replica still listed as waiting may already have its result (not yet woken):
        # only slots that some replica has not reached can be stuck.
        stuck = {r: key for r, key in self._waiting.items() if len(self._slots[key].values) < self.world_size}
        for key in stuck.values():
            gone = sorted(self._finished - set(self._slots[key].values))
            if gone:
                self._set_abort(
                    _Abort(
                        f"replica(s) {gone} finished the forward without making this call; "
                        "every replica must call each SyncBN layer the same number of times"
                    )
                )
                return
        live = set(range(self.world_size)) - self._finished
        if live and live <= set(stuck):
            where = ", ".join(f"replica {r} at '{layer}' call {call}" for r, (layer, call) in sorted(stuck.items()))
            self._set_abort(
                _Abort(
                    f"every replica waits at a different call ({where}); "
                    "every replica must call each SyncBN layer the same number of times"
                )
            )

    def _set_abort(self, abort: _Abort) -> None:
        self._abort = abort
        for wakeup in self._wakeups.values():
            wakeup.notify_all()

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


class ThreadModes(NamedTuple):
    """A thread's grad mode and autocast state (thread-local in torch), to enter on another thread.

    Example:
        >>> with torch.no_grad():
        ...     modes = ThreadModes.capture(["cpu"])
        >>> with modes.entered("cpu"):
        ...     torch.is_grad_enabled()
        False
    """

    grad_enabled: bool
    autocast: dict[str, tuple[bool, torch.dtype]]

    @classmethod
    def capture(cls, device_types: Iterable[str]) -> ThreadModes:
        """This thread's modes, with the autocast state of each of ``device_types``."""
        autocast = {kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in device_types}
        return cls(torch.is_grad_enabled(), autocast)

    def apply(self) -> None:
        """Make these this thread's modes, for good (greenlets of one thread share its modes).

        Example:
            >>> saved = ThreadModes.capture(["cpu"])
            >>> ThreadModes(False, {"cpu": (False, torch.bfloat16)}).apply()
            >>> torch.is_grad_enabled()
            False
            >>> saved.apply(); torch.is_grad_enabled()
            True
        """
        torch.set_grad_enabled(self.grad_enabled)
        for kind, (enabled, dtype) in self.autocast.items():
            torch.set_autocast_enabled(kind, enabled)
            torch.set_autocast_dtype(kind, dtype)

    @contextlib.contextmanager
    def entered(self, device_type: str) -> Iterator[None]:
        """Run the block in these modes, with ``device_type``'s autocast state."""
        enabled, dtype = self.autocast[device_type]
        with torch.set_grad_enabled(self.grad_enabled), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            yield


@dataclass(frozen=True)
class ReplicaContext:
    """What one replica of a SyncBN layer needs to synchronize: its group, rank and layer name.

    Example:
        >>> import torch
        >>> from syncbn.kernels import batch_statistics
        >>> context = ReplicaContext(ReplicaGroup(1), rank=0, layer="bn")
        >>> context.all_reduce_statistics(batch_statistics(torch.ones(2, 3))).count
        2
    """

    group: ReplicaGroup
    rank: int
    layer: str

    @property
    def world_size(self) -> int:
        return self.group.world_size

    def all_reduce_statistics(self, local: BatchStatistics) -> BatchStatistics:
        """Merge ``local`` with every peer's statistics for this call; result on ``local``'s device."""
        merged = self.group.exchange(self.rank, self.layer, local, merge_replica_statistics)
        device = local.mean.device
        return BatchStatistics(merged.count, merged.mean.to(device), merged.m2.to(device))


def merge_replica_statistics(parts: list[BatchStatistics]) -> BatchStatistics:
    """Chan's merge of every replica's statistics, on the first one's device, differentiable."""
    device = parts[0].mean.device
    counts = tuple(p.count for p in parts)
    tensors = [p.mean.to(device) for p in parts] + [p.m2.to(device) for p in parts]
    mean, m2 = _MergeFunction.apply(counts, *tensors)
    return BatchStatistics(sum(counts), mean, m2)


class _MergeFunction(torch.autograd.Function):
    """Chan's merge as one autograd node (a dozen small ops would each cost a node).

    forward: ``merge_statistics``. backward, with n = sum n_i:
    dmean_i = n_i / n * dmean + 2 n_i (mean_i - mean) * dM2, and dM2_i = dM2
    (the mean's own dependence on mean_i cancels: sum n_i (mean_i - mean) = 0).
    """

    @staticmethod
    def forward(ctx: Any, counts: tuple[int, ...], *tensors: Tensor) -> tuple[Tensor, Tensor]:
        half = len(counts)
        means, m2s = tensors[:half], tensors[half:]
        merged = merge_statistics([BatchStatistics(n, m, q) for n, m, q in zip(counts, means, m2s, strict=True)])
        ctx.counts = counts
        ctx.save_for_backward(*means, merged.mean)
        return merged.mean, merged.m2

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor | None, grad_m2: Tensor | None) -> tuple[Tensor | None, ...]:
        *means, mean = ctx.saved_tensors
        total = max(sum(ctx.counts), 1)
        grad_mean = grad_mean if grad_mean is not None else torch.zeros_like(mean)
        grad_m2 = grad_m2 if grad_m2 is not None else torch.zeros_like(mean)
        grad_means = [
            n / total * grad_mean + 2 * n * (m - mean) * grad_m2 for n, m in zip(ctx.counts, means, strict=True)
        ]
        return (None, *grad_means, *(grad_m2 for _ in means))


# Per thread and per greenlet: the rank of the replica whose forward runs there.
running_replica: ContextVar[int | None] = ContextVar("syncbn_running_replica", default=None)


def current_replica() -> int | None:
    """The rank of the replica running on this thread, or None outside a ``DataParallel`` forward.

    Lets forward hooks on a replicated model tell replicas apart (hooks registered on the
    master fire on every replica, with the replica's module).

    Example:
        >>> current_replica() is None
        True
    """
    return running_replica.get()


def bind_replica(module: nn.Module, context: ReplicaContext) -> None:
    """Attach ``context`` to a replica module (never to a master: replicas are discarded)."""
    module.__dict__[REPLICA_ATTRIBUTE] = context


def replica_context(module: nn.Module) -> ReplicaContext | None:
    """The context of a replica module, or None outside a synchronized forward.

    Example:
        >>> replica_context(nn.BatchNorm2d(3)) is None
        True
    """
    return module.__dict__.get(REPLICA_ATTRIBUTE)
