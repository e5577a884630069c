"""Replicas sharing a device: greenlets on the caller's thread, each with its own modes and rank."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref

import greenlet
import pytest
import torch
from torch import nn

import syncbn
from syncbn.comm.rendezvous import Rendezvous
from syncbn.parallel.parallel_apply import current_replica
from syncbn.parallel.replica_greenlets import run_greenlets


class RecordAroundBatchNorm(nn.Module):
    """BatchNorm between two records of (rank, thread, intra-op threads, grad mode, autocast).

    Replica 0 calls its BatchNorm inside ``context``, so it waits there, inside it, while
    the other replicas run up to the same call.
    """

    def __init__(self, context=contextlib.nullcontext) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.context = context
        self.seen: list[tuple] = []

    def record(self, where: str) -> None:
        state = (torch.get_num_threads(), torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))
        self.seen.append((where, current_replica(), threading.current_thread(), *state))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.record("before")
        with self.context() if current_replica() == 0 else contextlib.nullcontext():
            y = self.bn(x)
            self.record("inside")
        self.record("after")
        return y.float()


def run_replicas(context=contextlib.nullcontext, replicas: int = 3) -> tuple[RecordAroundBatchNorm, torch.Tensor]:
    recorder = RecordAroundBatchNorm(context)
    model = syncbn.DataParallel(syncbn.convert_model(recorder), replicas=replicas)
    return model.module, model(torch.randn(2 * replicas, 3))


def test_replicas_run_in_turns_on_the_callers_thread_with_its_intra_op_threads():
    caller = (threading.current_thread(), torch.get_num_threads(), torch.is_grad_enabled())
    recorder, _ = run_replicas()
    # Each replica runs until its BatchNorm call; the last to arrive normalizes and runs
    # on to the end, then the others in turn.
    order = [(where, rank) for where, rank, *_ in recorder.seen]
    assert order == [("before", 0), ("before", 1), ("before", 2)] + [
        (where, rank) for rank in (2, 0, 1) for where in ("inside", "after")
    ]
    assert {(thread, threads, grad) for _, _, thread, threads, grad, _ in recorder.seen} == {caller}
    assert current_replica() is None and torch.get_num_threads() == caller[1]


def test_a_replica_waiting_inside_no_grad_keeps_it_to_itself():
    recorder, out = run_replicas(torch.no_grad)
    grad_mode = {(where, rank): grad for where, rank, _, _, grad, _ in recorder.seen}
    assert grad_mode[("inside", 0)] is False and grad_mode[("after", 0)] is True
    assert all(grad for (where, rank), grad in grad_mode.items() if rank != 0)
    assert torch.is_grad_enabled() and out.requires_grad


def test_a_replica_waiting_inside_autocast_keeps_it_to_itself():
    def bfloat16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    recorder, _ = run_replicas(bfloat16)
    autocast = {(where, rank): enabled for where, rank, *_, enabled in recorder.seen}
    assert autocast[("inside", 0)] is True and autocast[("after", 0)] is False
    assert not any(enabled for (where, rank), enabled in autocast.items() if rank != 0)
    assert not torch.is_autocast_enabled("cpu")


def test_the_callers_modes_come_back_even_when_a_replica_raises():
    class RaiseInsideNoGrad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.set_grad_enabled(False)  # left off: the raise skips any restore
            raise ValueError(f"replica {current_replica()} broke")

    with pytest.raises(ValueError, match="replica 0 broke"):
        syncbn.DataParallel(RaiseInsideNoGrad(), replicas=2)(torch.randn(4, 3))
    assert torch.is_grad_enabled()


def test_nested_data_parallel_replicas_see_their_own_ranks():
    class Inner(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.size(0), 1), float(current_replica()))

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = syncbn.DataParallel(Inner(), replicas=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rank = current_replica()
            inner = self.inner(x)
            assert current_replica() == rank  # the inner forward gave this replica its rank back
            return torch.cat([inner, torch.full_like(inner, float(rank))], dim=1)

    out = syncbn.DataParallel(Outer(), replicas=2)(torch.zeros(8, 1))
    # Column 0: the inner replica's rank; column 1: the outer one's.
    assert out.tolist() == [[inner, outer] for outer in (0.0, 1.0) for inner in (0.0, 0.0, 1.0, 1.0)]


def test_a_replica_switching_greenlets_in_its_forward_gets_an_error_not_a_loop():
    rendezvous = Rendezvous(2, timeout=5.0)
    errors = {}

    def replica(rank: int) -> None:
        try:
            if rank == 0:
                greenlet.getcurrent().parent.switch()  # as gevent-style code inside a forward would
            rendezvous.finish(rank)
        except BaseException as error:  # noqa: BLE001 - what a replica does
            errors[rank] = error
            rendezvous.fail(rank, error)

    run_greenlets([lambda: replica(0), lambda: replica(1)], rendezvous, ["cpu"])
    assert "replica 0's forward switched to another greenlet outside a SyncBN call" in str(errors[0])
    assert 1 not in errors


def test_replicas_that_can_never_run_are_an_error_not_a_loop():
    # Replica 0 waits at a call that replica 1 never makes, and replica 1 ends without
    # telling the rendezvous (which parallel_apply always does): nobody can run.
    rendezvous = Rendezvous(2, timeout=5.0)
    with pytest.raises(RuntimeError, match="every replica waits and none can run"):
        run_greenlets([lambda: rendezvous.exchange(0, "bn", 0, tuple), lambda: None], rendezvous, ["cpu"])


class RecordGreenlet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, greenlet.greenlet] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen[current_replica()] = greenlet.getcurrent()
        return x


def test_forwards_reuse_parked_greenlets_and_recover_from_a_failed_one():
    recorder = RecordGreenlet()
    model = syncbn.DataParallel(recorder, replicas=3)
    model(torch.randn(6, 2))
    first = set(recorder.seen.values())
    model(torch.randn(6, 2))
    assert set(recorder.seen.values()) == first and len(first) == 3
    assert greenlet.getcurrent() not in first

    class FailOnce(nn.Module):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            FailOnce.calls += 1
            if FailOnce.calls == 2:
                raise ValueError("replica 1 fails once")
            return x * 2

    failing = syncbn.DataParallel(FailOnce(), replicas=3)
    with pytest.raises(ValueError, match="fails once"):
        failing(torch.ones(3, 1))
    assert failing(torch.ones(3, 1)).tolist() == [[2.0], [2.0], [2.0]]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_replicas_too():
    model = syncbn.DataParallel(syncbn.convert_model(nn.BatchNorm1d(2)), replicas=2)
    x = torch.randn(4, 2)
    expected = nn.BatchNorm1d(2)(x)
    model(x)  # the parent's thread now has parked greenlets
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a copy of the parent's parked greenlets
        try:
            torch.set_num_threads(1)  # torch's OpenMP pool does not survive a fork
            out = model(x)
            os.write(write, b"ok" if torch.allclose(out, expected) else b"bad")
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            os.write(write, repr(error).encode()[:500])
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 60  # a hung child is a failure, not a hung test run
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if ended[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert (os.read(read, 600), ended[1]) == (b"ok", 0)


def test_parked_greenlets_keep_nothing_of_the_last_forward_alive():
    model = syncbn.DataParallel(syncbn.convert_model(nn.BatchNorm1d(3)), replicas=3)
    x = torch.randn(6, 3, requires_grad=True)
    alive = weakref.ref(x)
    out = model(x)
    out.sum().backward()
    del x, out
    assert alive() is None
