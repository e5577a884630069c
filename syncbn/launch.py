"""Run one function on R local processes joined by a torch.distributed group.

For ``syncbn verify --backend gloo`` and the gloo rows of ``syncbn bench``: the
processes way, on one machine, without torchrun. Each rank is a forked child that joins
a process group on 127.0.0.1 (a free port), calls ``function(rank, world_size, *args)``
and hands its return value back through a file. Nothing can hang: a rank that raises
writes its error and exits, which closes its connections so its peers fail at once; a
rank that stalls makes its peers fail at the group's timeout; and the parent stops
waiting after the timeout plus a grace period and kills what is left.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from syncbn.errors import SyncBNError

BACKENDS = ("gloo", "nccl")


class ProcessGroupFailure(SyncBNError):
    """Some ranks of a local process-group run failed; ``errors`` maps rank to its error line.

    Example:
        >>> str(ProcessGroupFailure({1: "RuntimeError: boom"}, 2))
        'rank 1 of 2: RuntimeError: boom'
    """

    def __init__(self, errors: dict[int, str], world_size: int) -> None:
        self.errors = errors
        # Root causes first; a peer that only saw the failure follows, in short.
        ordered = sorted(errors.items(), key=lambda item: (_is_consequence(item[1]), item[0]))
        super().__init__("; ".join(f"rank {rank} of {world_size}: {_short(text)}" for rank, text in ordered))


_CONSEQUENCES = {
    "Connection closed by peer": "lost its connection to a failed peer",
    "Connection reset by peer": "lost its connection to a failed peer",
    "Timed out waiting": "timed out waiting for a peer",
}


def _is_consequence(text: str) -> bool:
    return any(marker in text for marker in _CONSEQUENCES)


def _short(text: str) -> str:
    for marker, meaning in _CONSEQUENCES.items():
        if marker in text:
            return f"{meaning} ({text.split(':', 1)[0]})"
    return text


def run_on_processes(
    function: Callable[..., Any],
    world_size: int,
    *,
    backend: str = "gloo",
    timeout: float = 60.0,
    args: Sequence[Any] = (),
) -> list[Any]:
    """Call ``function(rank, world_size, *args)`` on ``world_size`` processes in one group.

    ``function`` and ``args`` reach the children by ``fork`` (no pickling, so models
    built from any factory work); return values come back through ``torch.save`` and
    must be tensors, numbers, strings and lists/tuples/dicts of them.

    Args:
        function: run on every rank, with the process group initialized.
        world_size: number of processes (ranks).
        backend: ``gloo`` (CPU or CUDA tensors) or ``nccl`` (one GPU per rank).
        timeout: the process group's timeout in seconds: a rank waiting longer fails.
        args: extra arguments for ``function``.

    Returns:
        The ranks' return values, in rank order.

    Raises:
        ProcessGroupFailure: a rank raised, crashed or did not finish in time.

    Example:
        >>> def total(rank, world):
        ...     value = torch.tensor([rank + 1.0])
        ...     dist.all_reduce(value)
        ...     return value.item()
        >>> run_on_processes(total, 2, timeout=30)
        [3.0, 3.0]
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1 (got {world_size})")
    context = multiprocessing.get_context("fork")
    address = f"tcp://127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory(prefix="syncbn-ranks-") as folder:
        out = Path(folder)
        processes = [
            context.Process(
                target=_run_rank,
                args=(function, rank, world_size, backend, address, timeout, out, tuple(args)),
                name=f"syncbn-rank-{rank}",
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        _wait(processes, timeout)
        errors = {}
        for rank, process in enumerate(processes):
            error_file = out / f"rank{rank}.error"
            if error_file.exists():
                errors[rank] = error_file.read_text().strip()
            elif process.exitcode != 0:
                errors[rank] = (
                    f"did not finish within {timeout:g} s (killed)"
                    if process.exitcode is None or process.exitcode < 0
                    else f"exited with code {process.exitcode}"
                )
        if errors:
            raise ProcessGroupFailure(errors, world_size)
        return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def _wait(processes: list[multiprocessing.process.BaseProcess], timeout: float) -> None:
    # Peers of a failed rank need a moment to notice; then whatever is left is stuck.
    deadline = time.monotonic() + timeout + 30.0
    failed_at = None
    while any(p.is_alive() for p in processes):
        now = time.monotonic()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in processes):
            failed_at = now
        if now > deadline or (failed_at is not None and now - failed_at > min(timeout, 30.0)):
            break
        time.sleep(0.05)
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join(timeout=5)


def _run_rank(
    function: Callable[..., Any],
    rank: int,
    world_size: int,
    backend: str,
    address: str,
    timeout: float,
    out: Path,
    args: tuple[Any, ...],
) -> None:
    # One intra-op thread per rank: R processes share the machine's cores, and a forked
    # child must not reuse the parent's OpenMP thread pool.
    torch.set_num_threads(1)
    status = 0
    try:
        dist.init_process_group(
            backend,
            init_method=address,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        result = function(rank, world_size, *args)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises
        last = traceback.extract_tb(error.__traceback__)[-1:] or [None]
        where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last[0] is not None else ""
        text = " ".join(f"{type(error).__name__}: {error}".split())
        (out / f"rank{rank}.error").write_text(text + where)
        status = 1
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    # Skip the parent's atexit handlers and buffered output that a fork inherited.
    os._exit(status)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
