"""Run one function on R local processes joined by a torch.distributed group.

For ``syncbn verify --backend gloo|nccl`` and the gloo rows of ``syncbn bench``: the
processes way, on one machine, without torchrun. Each rank is a child process (``fork``,
or ``spawn`` where CUDA forbids forking) that joins a process group on 127.0.0.1 (a free
port), calls ``function(rank, world_size, *args)`` and hands its return value back
through a file. Nothing can hang or be left behind: a rank that raises writes its error
and exits, which closes its connections so its peers fail at once; a rank that stalls
makes its peers fail at the group's timeout; the parent stops waiting after the timeout
plus a grace period, and whenever it stops (an error, Ctrl-C) it kills every rank still
running and removes the folder they wrote to. Ranks ignore Ctrl-C: the parent handles it.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.util
import io
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from syncbn.errors import SyncBNError

PROCESS_BACKENDS = ("gloo", "nccl")
START_METHODS = ("fork", "spawn")


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
    start_method: str = "fork",
) -> list[Any]:
    """Call ``function(rank, world_size, *args)`` on ``world_size`` processes in one group.

    With ``fork`` the children inherit ``function`` and ``args`` (no pickling, so models
    built from any factory work). With ``spawn`` (needed once this process has initialized
    CUDA) they are pickled; classes from modules loaded by file path are loaded again in
    the child from the same file. Return values come back through ``torch.save`` and must
    be tensors, numbers, strings and lists/tuples/dicts of them.

    Args:
        function: run on every rank, with the process group initialized.
        world_size: number of processes (ranks).
        backend: ``gloo`` (CPU or CUDA tensors) or ``nccl`` (one GPU per rank).
        timeout: the process group's timeout in seconds: a rank waiting longer fails.
        args: extra arguments for ``function``.
        start_method: ``fork`` or ``spawn``.

    Returns:
        The ranks' return values, in rank order.

    Raises:
        ProcessGroupFailure: a rank raised, crashed or did not finish in time.
        ValueError: a bad argument; with ``spawn``, a function or argument that cannot be
            pickled (a class or function defined inside a function).

    Example:
        >>> def total(rank, world):
        ...     value = torch.tensor([rank + 1.0])
        ...     dist.all_reduce(value)
        ...     return value.item()
        >>> run_on_processes(total, 2, timeout=30)
        [3.0, 3.0]
    """
    if backend not in PROCESS_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(PROCESS_BACKENDS)} (got {backend!r})")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be at least 1 (got {world_size!r})")
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {', '.join(START_METHODS)} (got {start_method!r})")
    work: _Work = _Pickled.pack(function, args) if start_method == "spawn" else _Inherited(function, tuple(args))
    context = multiprocessing.get_context(start_method)
    address = f"tcp://127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory(prefix="syncbn-ranks-") as folder:
        out = Path(folder)
        processes = [
            context.Process(
                target=_run_rank,
                args=(work, rank, world_size, backend, address, timeout, out),
                name=f"syncbn-rank-{rank}",
                daemon=True,
            )
            for rank in range(world_size)
        ]
        try:
            with _sigint_ignored():  # children inherit it: Ctrl-C is the parent's to handle
                for process in processes:
                    process.start()
            _wait(processes, timeout)
        finally:
            # Whatever ended the wait (Ctrl-C included), no rank outlives it, nor its folder.
            _stop(processes)
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


class _Inherited:
    """The function and arguments, handed to forked children as they are."""

    def __init__(self, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.function, self.args = function, args

    def unpack(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.function, self.args


class _Pickled:
    """The function and arguments pickled for spawned children, with the files of modules they need.

    A module loaded from a file path (``--factory path/to/models.py:build``) is not
    importable by name in a fresh interpreter; the child loads it from the same file.
    """

    def __init__(self, data: bytes, module_files: dict[str, str]) -> None:
        self.data, self.module_files = data, module_files

    @classmethod
    def pack(cls, function: Callable[..., Any], args: Sequence[Any]) -> _Pickled:
        modules: set[str] = set()

        class RecordingPickler(pickle.Pickler):
            def reducer_override(self, obj: Any) -> Any:
                if isinstance(obj, (type, types.FunctionType)):
                    modules.add(getattr(obj, "__module__", None) or "")
                return NotImplemented

        buffer = io.BytesIO()
        try:
            RecordingPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump((function, tuple(args)))
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            raise ValueError(
                f"ranks started with spawn need the model and the function they run pickled, and pickling failed "
                f"({' '.join(str(error).split())}): define the model's classes and functions at module level"
            ) from None
        module_files = {
            name: sys.modules[name].__file__
            for name in modules
            if name in sys.modules and getattr(sys.modules[name], "__file__", None)
        }
        return cls(buffer.getvalue(), module_files)  # type: ignore[arg-type]

    def unpack(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        module_files = self.module_files

        class FileAwareUnpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if module not in sys.modules and module in module_files:
                    _import_or_load(module, module_files[module])
                return super().find_class(module, name)

        return FileAwareUnpickler(io.BytesIO(self.data)).load()


_Work = _Inherited | _Pickled


def _import_or_load(name: str, path: str) -> None:
    """Import module ``name``; if nothing on ``sys.path`` provides it, load it from ``path`` as the parent did."""
    try:
        importlib.import_module(name)
        return
    except ModuleNotFoundError:
        pass
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"cannot load module {name!r} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as `import` does
    sys.path.insert(0, str(Path(path).parent))  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(Path(path).parent))


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    # Only the main thread may set signal handlers; elsewhere the children set their own.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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


def _stop(processes: list[multiprocessing.process.BaseProcess]) -> None:
    """Kill every rank still running (or not yet started) and reap it."""
    for process in processes:
        if process.pid is not None and process.is_alive():
            process.kill()
    for process in processes:
        if process.pid is not None:
            process.join(timeout=5)


def _run_rank(work: _Work, rank: int, world_size: int, backend: str, address: str, timeout: float, out: Path) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process of a terminal: the parent handles it
    # One intra-op thread per rank: R processes share the machine's cores, and a forked
    # child must not reuse the parent's OpenMP thread pool.
    torch.set_num_threads(1)
    status = 0
    try:
        function, args = work.unpack()
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
        with contextlib.suppress(OSError):  # the parent gave up on us and removed the folder
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
