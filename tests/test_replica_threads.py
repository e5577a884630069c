"""Replica threads (replicas on different devices): pooled between forwards, never shared, in turns."""

from __future__ import annotations

import os
import threading
import weakref

import pytest
import torch

from syncbn.comm.rendezvous import Rendezvous
from syncbn.parallel.replica_threads import ReplicaThreads


def run(pool: ReplicaThreads, functions) -> list:
    return pool.run_replicas(list(functions), Rendezvous(len(functions)))


def record_threads(pool: ReplicaThreads, count: int) -> list[threading.Thread]:
    seen: list[threading.Thread] = []
    run(pool, [lambda: seen.append(threading.current_thread())] * count)
    return seen


def test_runs_reuse_the_same_daemon_threads_and_never_the_callers():
    pool = ReplicaThreads()
    first = record_threads(pool, 3)
    second = record_threads(pool, 3)
    assert set(first) == set(second) and len(set(first)) == 3
    assert threading.current_thread() not in first
    assert all(thread.daemon for thread in first)


def test_replicas_of_one_run_take_turns_in_rank_order():
    order: list[int] = []
    running = []

    def replica(rank: int) -> None:
        running.append(rank)
        assert len(running) == 1, "two replicas ran at once"
        order.append(rank)
        running.remove(rank)

    run(ReplicaThreads(), [lambda r=r: replica(r) for r in range(4)])
    assert order == [0, 1, 2, 3]


def test_runs_at_once_never_share_a_thread():
    pool = ReplicaThreads()
    barrier = threading.Barrier(2, timeout=30)  # one replica of each run at the same time
    owners: dict[str, set[threading.Thread]] = {"a": set(), "b": set()}

    def function(name: str) -> None:
        owners[name].add(threading.current_thread())
        barrier.wait()

    callers = [threading.Thread(target=run, args=(pool, [lambda n=name: function(n)] * 2)) for name in owners]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=30)
    assert len(owners["a"] | owners["b"]) == 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_threads():
    pool = ReplicaThreads()
    os.register_at_fork(after_in_child=pool._forget)
    record_threads(pool, 2)  # the parent's pool now has threads
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's threads do not exist here, so new ones must start
        try:
            seen = record_threads(pool, 2)
            os.write(write, b"ok" if len(set(seen)) == 2 and all(t.is_alive() for t in seen) else b"bad")
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 10) == b"ok" and status == 0


def test_parked_threads_keep_nothing_of_the_last_run_alive():
    pool = ReplicaThreads()
    batch = torch.randn(4, 3)
    alive = weakref.ref(batch)
    run(pool, [lambda batch=batch: batch.sum()] * 2)
    del batch
    assert alive() is None
