"""Replica threads: pooled between forwards, pinned to one core, one intra-op thread each."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from torch import nn

import syncbn
from syncbn.parallel.parallel_apply import current_replica
from syncbn.parallel.replica_threads import ReplicaThreads


class RecordThreads(nn.Module):
    """Identity that records, per replica, its thread, core affinity and intra-op thread count."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, tuple[threading.Thread, set[int] | None, int]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self.seen[current_replica()] = (threading.current_thread(), affinity, torch.get_num_threads())
        return x


def test_forwards_reuse_the_same_threads():
    recorder = RecordThreads()
    model = syncbn.DataParallel(recorder, replicas=3)
    model(torch.randn(6, 2))
    first = {rank: thread for rank, (thread, _, _) in recorder.seen.items()}
    model(torch.randn(6, 2))
    assert set(first.values()) == {thread for thread, _, _ in recorder.seen.values()}
    assert threading.current_thread() not in first.values()
    assert all(thread.daemon for thread in first.values())


def test_replicas_run_on_one_core_with_one_intra_op_thread_and_the_caller_is_untouched():
    recorder = RecordThreads()
    before = (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None, torch.get_num_threads())
    syncbn.DataParallel(recorder, replicas=4)(torch.randn(8, 2))
    assert {threads for _, _, threads in recorder.seen.values()} == {1}
    if before[0] is not None:
        cores = [affinity for _, affinity, _ in recorder.seen.values()]
        assert all(len(c) == 1 and c == cores[0] for c in cores) and cores[0] <= before[0]
    after = (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None, torch.get_num_threads())
    assert after == before


def test_forwards_running_at_once_never_share_a_thread():
    pool = ReplicaThreads()
    barrier = threading.Barrier(4, timeout=30)  # all four functions run at the same time
    owners: dict[str, set[threading.Thread]] = {"a": set(), "b": set()}

    def function(name: str) -> None:
        owners[name].add(threading.current_thread())
        barrier.wait()

    callers = [threading.Thread(target=pool.run, args=([lambda n=name: function(n)] * 2,)) for name in owners]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=30)
    assert len(owners["a"] | owners["b"]) == 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_threads():
    model = syncbn.DataParallel(RecordThreads(), replicas=2)
    model(torch.randn(4, 2))  # the parent's pool now has threads
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's threads do not exist here
        try:
            out = model(torch.arange(4.0).view(4, 1))
            os.write(write, b"ok" if out.view(-1).tolist() == [0.0, 1.0, 2.0, 3.0] else b"bad")
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 10) == b"ok" and status == 0
