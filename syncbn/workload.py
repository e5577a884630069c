"""What the tools (``syncbn.verify``, ``syncbn.bench``) run on: dtypes, devices, replica counts, shapes, memory.

Each name and default is defined here once, so that ``syncbn verify`` and ``syncbn bench``
accept the same spellings and pick the same defaults. A run that could not fit in memory is
refused before anything is allocated (``check_memory``); an allocation that fails anyway is
recognised by ``is_out_of_memory``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

Shape = tuple[int, ...]

# The floating dtypes a run may use, by the names the command line accepts.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("cpu", "cuda")


class NotEnoughMemoryError(MemoryError):
    """A run needs more memory than the machine has; ``needed`` and ``available`` are in bytes.

    Example:
        >>> str(NotEnoughMemoryError("input 3x9 with batch 2", 2**40, 2**30))
        'input 3x9 with batch 2 needs at least 1 TiB of memory; 1 GiB is available'
    """

    def __init__(self, what: str, needed: int, available: int) -> None:
        self.needed, self.available = needed, available
        super().__init__(
            f"{what} needs at least {format_bytes(needed)} of memory; {format_bytes(available)} is available"
        )


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating dtype of ``DTYPES`` from its name (``"float32"``) or itself.

    Raises:
        ValueError: any other dtype or name, listing the accepted names.

    Example:
        >>> as_dtype("bfloat16")
        torch.bfloat16
    """
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    shown = dtype if isinstance(dtype, torch.dtype) else repr(dtype)
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {shown})")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``.

    Example:
        >>> dtype_name(torch.float64)
        'float64'
    """
    return str(dtype).removeprefix("torch.")


def default_device() -> str:
    """Where replicas run by default: ``"cuda"`` when a GPU is visible, else ``"cpu"``.

    Example:
        >>> default_device() in ("cpu", "cuda")
        True
    """
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_replicas(device: str | torch.device = "cpu") -> int:
    """The default number of replicas: every CUDA device if there are at least 2, else 4 virtual ones.

    Example:
        >>> default_replicas("cpu")
        4
    """
    if torch.device(device).type == "cuda" and torch.cuda.device_count() >= 2:
        return torch.cuda.device_count()
    return 4


def parse_shape(text: str, *, dims: tuple[int, int | None] = (1, None), example: str = "3x32x32") -> Shape:
    """Parse a shape written as sizes joined by ``x`` (``"3x32x32"``), with ``dims[0]`` to ``dims[1]`` sizes.

    Args:
        text: the shape as typed; ``X``, ``×`` and ``,`` also join sizes; spaces around are ignored.
        dims: the least and the most number of sizes (``None``: no limit).
        example: a well-formed shape, shown in errors.

    Raises:
        ValueError: not positive integers, or too few or too many of them.

    Example:
        >>> parse_shape("3x32x32"), parse_shape(" 8X64 ", dims=(2, 5))
        ((3, 32, 32), (8, 64))
        >>> parse_shape("32x0")
        Traceback (most recent call last):
        ...
        ValueError: malformed shape '32x0': sizes must be positive integers, like 3x32x32
    """
    parts = text.strip().lower().replace("×", "x").replace(",", "x").split("x")
    if not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"malformed shape {text!r}: expected integers joined by 'x', like {example}")
    shape = tuple(int(part) for part in parts)
    low, high = dims
    if len(shape) < low or (high is not None and len(shape) > high):
        wanted = f"{low} to {high}" if high is not None else f"at least {low}"
        raise ValueError(f"malformed shape {text!r}: expected {wanted} dimensions, like {example} (got {len(shape)})")
    if min(shape) < 1:
        raise ValueError(f"malformed shape {text!r}: sizes must be positive integers, like {example}")
    return shape


def parse_shapes(text: str, *, dims: tuple[int, int | None] = (1, None), example: str = "3x32x32") -> list[Shape]:
    """Parse comma-separated shapes, e.g. ``"32x64x56x56,256x1024"`` (see ``parse_shape``).

    Example:
        >>> parse_shapes("4x3x5x5, 8x16")
        [(4, 3, 5, 5), (8, 16)]
    """
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"no shapes in {text!r}: expected e.g. {example},{example}")
    return [parse_shape(item, dims=dims, example=example) for item in items]


def format_shape(shape: Sequence[int]) -> str:
    """The ``NxCx...`` spelling of a shape.

    Example:
        >>> format_shape((32, 64, 56, 56))
        '32x64x56x56'
    """
    return "x".join(str(d) for d in shape)


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of ``shape`` and ``dtype`` (an exact integer, however large).

    Example:
        >>> tensor_bytes((8, 3, 32, 32), torch.float32)
        98304
    """
    return math.prod(shape) * dtype.itemsize


def available_memory(device: str | torch.device = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device`` (None when the system does not say).

    The CPU's figure is Linux's ``MemAvailable``: free memory plus caches it can drop.

    Example:
        >>> available_memory("cpu") is None or available_memory("cpu") > 0
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(what: str, needed: int, device: str | torch.device = "cpu") -> None:
    """Refuse a run that needs more than the available memory, before it allocates anything.

    Raises:
        NotEnoughMemoryError: ``needed`` bytes exceed what ``device`` has available.

    Example:
        >>> check_memory("a tiny batch", 1024)
    """
    available = available_memory(device)
    if available is not None and needed > available:
        raise NotEnoughMemoryError(what, needed, available)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation (``MemoryError``, torch's CPU or CUDA out-of-memory).

    Example:
        >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"))
        True
    """
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def format_bytes(count: float) -> str:
    """Bytes in binary units, three significant digits.

    Example:
        >>> format_bytes(1536), format_bytes(3 * 2**50)
        ('1.5 KiB', '3 PiB')
    """
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = 0
    while count >= 1024 and power < len(units) - 1:
        count, power = count / 1024, power + 1
    return f"{count:.3g} {units[power]}"
