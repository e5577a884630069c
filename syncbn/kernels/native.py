"""SyncBN's passes as compiled C (``csrc/cpu_kernels.c``), for float32/float64 CPU tensors.

Why: torch's CPU BatchNorm runs far below memory bandwidth (forward + backward of a
32x64x56x56 float32 NCHW batch: about 20 ms, while one pass over it takes about 1 ms).
Here every step is one pass: statistics read x twice (sum, then squared deviations from
the float64 mean), the output is one pass, and the backward reads (dy, x) once for its
two sums and once more to write dx. All sums accumulate in float64, so the statistics
are as accurate as a float64 reference (more than torch's own float32 kernel).

How: the source is plain C with no torch headers, compiled on first use with the
system's C compiler (``$CC`` or ``cc``, about a second) into a cache directory
(``$SYNCBN_CACHE_DIR``, else ``~/.cache/syncbn``) and called through ctypes, which
releases the GIL during the call.

Opt-in: SyncBN uses these kernels only with ``SYNCBN_NATIVE=1`` in the environment.
Measured against torch's kernels they range from 0.45x to 2x in time depending on the
run (issue 5's notes: page faults on fresh batch-sized buffers and spinning OpenMP
workers dominate on small machines), so the default stays torch's bit-identical path.
Where they can't be built (no compiler), ``available()`` is False and SyncBN uses
``torch_ops`` whatever the environment says.

The functions mirror ``syncbn.kernels.torch_ops`` (same arguments, same results up to
rounding); ``handles`` says which inputs they can take, ``supports`` where SyncBN uses
them (where they measured faster than torch's kernels).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from syncbn.stats import BatchStatistics

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
SPATIAL_INNER, CHANNELS_INNER = 0, 1
# Smaller planes (e.g. 7x7 maps) spend more on loop overhead than on memory.
MIN_PLANE = 64
# Below this many elements per thread, starting a thread costs more than it saves.
ELEMENTS_PER_THREAD = 1 << 16
_FLAGS = ["-O3", "-fPIC", "-shared", "-pthread"]
# Built where it runs, so it may use this CPU's vector width (2-3x on AVX2 machines); the
# cache key includes the CPU's flags, so a cache shared by different machines stays safe.
_NATIVE_FLAGS = ["-march=native"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_load_error: str | None = None
_loaded = False
_warned = False


def enabled() -> bool:
    """Whether the environment asks for these kernels (``SYNCBN_NATIVE=1``; off by default).

    Example:
        >>> import os
        >>> enabled() == (os.environ.get("SYNCBN_NATIVE", "0").lower() in ("1", "true", "yes", "on"))
        True
    """
    return os.environ.get("SYNCBN_NATIVE", "0").strip().lower() in ("1", "true", "yes", "on")


def available() -> bool:
    """Whether the compiled kernels can be used (builds them on the first call).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why the compiled kernels are not in use, or None when they are.

    Example:
        >>> reason = unavailable_reason()
        >>> reason is None or isinstance(reason, str)
        True
    """
    _load()
    return _load_error


def supports(input: Tensor) -> bool:
    """Whether SyncBN should use these kernels for ``input``: when ``enabled()``, and then
    where they measured faster.

    That is float32/float64 CPU tensors in the contiguous ``(N, C, *)`` layout whose
    planes hold at least ``MIN_PLANE`` values. The kernels also handle channels_last and
    ``(N, C)`` (tested through ``handles``), but there torch's own kernels were as fast
    or faster on the machines measured (see the README's performance table).

    Example:
        >>> supports(torch.zeros(4, 3, 16, 16)) == (enabled() and available())
        True
        >>> supports(torch.zeros(4, 3, 16, 16, dtype=torch.bfloat16))
        False
    """
    if not enabled():
        return False
    if not available():
        _warn_unavailable()
        return False
    return handles(input) and _layout(input) == SPATIAL_INNER and _spatial_size(input) >= MIN_PLANE


def _warn_unavailable() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"SYNCBN_NATIVE=1, but syncbn's compiled kernels are unavailable ({_load_error}); "
            "using torch's kernels. Install a C compiler or set CC to use them.",
            RuntimeWarning,
            stacklevel=3,
        )


def handles(input: Tensor) -> bool:
    """Whether these kernels can compute on ``input`` at all: CPU, float32/float64, dense layout.

    Dense layouts are contiguous ``(N, C, *)`` and channels_last (2-D and 3-D).

    Example:
        >>> handles(torch.zeros(4, 3).t())
        False
    """
    return (
        input.device.type == "cpu"
        and input.dtype in (torch.float32, torch.float64)
        and input.dim() >= 2
        and _layout(input) is not None
        and available()
    )


def batch_statistics(input: Tensor) -> BatchStatistics:
    """Count, mean and M2 per channel (float64), without autograd: two passes over ``input``.

    The second pass also sums ``x - mean``, which refines the mean and M2 by the exact
    identity ``M2 = sum((x - m)^2) - n (mean - m)^2``.

    Example:
        >>> stats = batch_statistics(torch.tensor([[1.0], [3.0]]))
        >>> stats.count, stats.mean.tolist(), stats.m2.tolist()
        (2, [2.0], [2.0])
    """
    channels = input.size(1)
    count = input.numel() // channels if channels else 0
    if count == 0:
        zeros = torch.zeros(channels, dtype=torch.float64)
        return BatchStatistics(0, zeros, zeros)
    total, _ = _moments(input, input, None, None, products=False)
    mean = total / count
    residue, m2 = _moments(input, input, mean, mean)
    correction = residue / count
    return BatchStatistics(count, mean + correction, m2 - count * correction.square())


def normalize(input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` in one pass; output in ``input``'s dtype and layout.

    Computed as ``(x - mean_r) * scale + shift`` in the input's precision, where
    ``mean_r`` is the float64 mean rounded to it and ``shift`` carries the residue.

    Example:
        >>> x = torch.tensor([[1.0], [3.0]])
        >>> normalize(x, torch.tensor([2.0]), torch.tensor([0.5]), None, None).tolist()
        [[-0.5], [0.5]]
    """
    scale = invstd.double() * (weight.double() if weight is not None else 1.0)
    offset = bias.double() if bias is not None else torch.zeros_like(scale)
    return affine_in_deviation(input, mean, scale, offset)


def normalize_backward(
    grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """For ``y = (x - mean) * invstd * w + b``: ``dy * invstd * w``, ``sum(dy)``, ``sum(dy * xhat)``.

    One pass for both sums (float64), one to scale dy.

    Example:
        >>> x, dy = torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [2.0]])
        >>> grad, sum_dy, sum_dy_xhat = normalize_backward(dy, x, torch.tensor([2.0]), torch.tensor([0.5]), None)
        >>> grad.tolist(), sum_dy.tolist(), sum_dy_xhat.tolist()
        ([[0.5], [1.0]], [3.0], [0.5])
    """
    grad_output = _like(grad_output, input)
    sum_dy, sum_dy_xhat = gradient_sums(grad_output, input, mean, invstd)
    scale = invstd.double() * (weight.double() if weight is not None else 1.0)
    zeros = torch.zeros_like(scale)
    grad_input = _combine(None, grad_output, None, zeros, scale, zeros)
    return grad_input, sum_dy, sum_dy_xhat


def gradient_sums(grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """``sum(dy)`` and ``sum(dy * xhat)`` per channel, float64, in one pass over (dy, x).

    Example:
        >>> x, dy = torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [2.0]])
        >>> [t.tolist() for t in gradient_sums(dy, x, torch.tensor([2.0]), torch.tensor([0.5]))]
        [[3.0], [0.5]]
    """
    if input.numel() == 0:
        zeros = torch.zeros(input.size(1), dtype=torch.float64)
        return zeros, zeros.clone()
    sum_dy, sum_dy_deviation = _moments(_like(grad_output, input), input, None, mean.double())
    return sum_dy, sum_dy_deviation * invstd.double()


def input_gradient(
    grad_output: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mean_dy: Tensor,
    mean_dy_xhat: Tensor,
) -> Tensor:
    """BatchNorm's ``dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))``, in one pass.

    The means are over the whole (global) batch. Written as
    ``dy * a + (x - mean) * b + k`` per channel, so nothing cancels.

    Example:
        >>> x, dy = torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [2.0]])
        >>> mean, invstd = torch.tensor([2.0]), torch.tensor([1.0])
        >>> input_gradient(dy, x, mean, invstd, None, torch.tensor([1.5]), torch.tensor([0.5])).tolist()
        [[0.0], [0.0]]
    """
    scale = invstd.double() * (weight.double() if weight is not None else 1.0)
    slope = -scale * invstd.double() * mean_dy_xhat.double()
    offset = -scale * mean_dy.double()
    rounded = mean.double().to(input.dtype)
    offset = offset - (mean.double() - rounded.double()) * slope
    return _combine(_like(grad_output, input), input, scale, rounded.double(), slope, offset)


def affine_in_deviation(input: Tensor, mean: Tensor, slope: Tensor, offset: Tensor) -> Tensor:
    """``(x - mean) * slope + offset`` per channel, in the input's precision: one pass.

    Example:
        >>> affine_in_deviation(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0]),
        ...                     torch.tensor([2.0]), torch.tensor([1.0])).tolist()
        [[-1.0], [3.0]]
    """
    # (x - mean) * slope + offset == (x - mean_r) * slope + (offset - (mean - mean_r) * slope)
    mean, slope = mean.double(), slope.double()
    rounded = mean.to(input.dtype).double()
    return _combine(None, input, None, rounded, slope, offset.double() - (mean - rounded) * slope)


def _combine(u: Tensor | None, v: Tensor, a: Tensor | None, cv: Tensor, b: Tensor, k: Tensor) -> Tensor:
    """``u * a + (v - cv) * b + k`` per channel (u optional; in ``v``'s layout and dtype, as ``u``)."""
    layout = _layout(v)
    out = torch.empty_like(v, memory_format=_memory_format(v.dim(), layout))
    if v.numel() == 0:
        return out
    shape = _shape(v)
    vector = lambda t: t.to(v.dtype).contiguous()  # noqa: E731 - per-channel constants in v's precision
    a_, cv_, b_, k_ = (vector(t) if t is not None else None for t in (a, cv, b, k))
    function = _library_function("combine", v.dtype)
    status = function(
        _pointer(u), _pointer(v), _pointer(out), layout, *shape,
        _pointer(a_), _pointer(cv_), _pointer(b_), _pointer(k_), _threads(v),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("syncbn: the native combine kernel could not allocate its buffers")
    return out


def _moments(
    u: Tensor, v: Tensor, cu: Tensor | None, cv: Tensor | None, *, products: bool = True
) -> tuple[Tensor, Tensor]:
    """Per channel, float64: ``sum(u - cu)`` and ``sum((u - cu) * (v - cv))`` (centers default to 0).

    Passing the same tensors for ``u``/``v`` and ``cu``/``cv`` takes the kernel's faster
    squares loop; ``products=False`` skips the second sum (returned as zeros).
    """
    channels = v.size(1)
    sum_u = torch.empty(channels, dtype=torch.float64)
    sum_uv = torch.empty(channels, dtype=torch.float64)
    zeros = torch.zeros(channels, dtype=torch.float64)
    center_u = cu.double().contiguous() if cu is not None else zeros
    center_v = center_u if cv is cu else cv.double().contiguous() if cv is not None else zeros
    function = _library_function("moments", v.dtype)
    status = function(
        _pointer(u), _pointer(v), _layout(v), *_shape(v),
        _pointer(center_u), _pointer(center_v), _pointer(sum_u), _pointer(sum_uv), int(products), _threads(v),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("syncbn: the native moments kernel could not allocate its buffers")
    return sum_u, sum_uv


def _layout(input: Tensor) -> int | None:
    """Which dense layout ``input`` has (SPATIAL_INNER or CHANNELS_INNER), or None."""
    if input.dim() < 2:
        return None
    if _spatial_size(input) == 1 and input.is_contiguous():
        return CHANNELS_INNER  # (N, C): rows of C values
    if input.is_contiguous():
        return SPATIAL_INNER
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return CHANNELS_INNER
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return CHANNELS_INNER
    return None


def _memory_format(dim: int, layout: int | None) -> torch.memory_format:
    """The torch memory format that gives a ``dim``-D tensor this layout."""
    if layout == CHANNELS_INNER and dim in (4, 5):
        return torch.channels_last if dim == 4 else torch.channels_last_3d
    return torch.contiguous_format


def _like(tensor: Tensor, input: Tensor) -> Tensor:
    """``tensor`` in ``input``'s dtype and dense layout (gradients may arrive expanded or permuted)."""
    layout = _layout(input)
    if tensor.dtype == input.dtype and tensor.stride() == input.stride() and _layout(tensor) == layout:
        return tensor
    return tensor.to(input.dtype).contiguous(memory_format=_memory_format(input.dim(), layout))


def _spatial_size(input: Tensor) -> int:
    size = 1
    for extent in input.shape[2:]:
        size *= extent
    return size


def _shape(input: Tensor) -> tuple[int, int, int]:
    return input.size(0), input.size(1), _spatial_size(input)


def _threads(input: Tensor) -> int:
    return max(1, min(torch.get_num_threads(), input.numel() // ELEMENTS_PER_THREAD))


def _pointer(tensor: Tensor | None) -> int | None:
    return tensor.data_ptr() if tensor is not None else None


def _library_function(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
    library = _load()
    assert library is not None, "syncbn: native kernels used without checking available()"
    return getattr(library, f"syncbn_{name}_{'f64' if dtype == torch.float64 else 'f32'}")


def _load() -> ctypes.CDLL | None:
    global _library, _load_error, _loaded
    if _loaded:
        return _library
    with _lock:
        if not _loaded:
            try:
                _library = _declare(ctypes.CDLL(str(_build())))
            except (OSError, subprocess.SubprocessError, RuntimeError) as error:
                _library, _load_error = None, str(error)
            _loaded = True
    return _library


def _build() -> Path:
    """The compiled library, built into the cache unless an identical build is there."""
    compiler = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), _machine_signature().encode()])).hexdigest()[:16]
    suffix = ".dll" if sys.platform == "win32" else ".so"
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = Path(os.environ.get("SYNCBN_CACHE_DIR") or cache_home / "syncbn")
    target = cache / f"cpu_kernels-{key}{suffix}"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Build under a private name, then rename: concurrent processes never load a partial file.
    handle, partial = tempfile.mkstemp(suffix=suffix, dir=cache)
    os.close(handle)
    try:
        errors = []
        for flags in (_FLAGS + _NATIVE_FLAGS, _FLAGS):
            result = subprocess.run(
                [compiler, *flags, "-o", partial, str(SOURCE)], capture_output=True, text=True, timeout=120
            )
            if result.returncode == 0:
                os.replace(partial, target)
                return target
            errors.append(result.stderr.strip()[:300])
        raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {errors[-1]}")
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _machine_signature() -> str:
    """What a build depends on besides the source: platform, and the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return " ".join([platform.platform(), platform.machine(), platform.processor(), flags, *_FLAGS])


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in ("f32", "f64"):
        moments = getattr(library, f"syncbn_moments_{suffix}")
        moments.argtypes = [pointer, pointer, i32, i64, i64, i64, pointer, pointer, pointer, pointer, i32, i32]
        moments.restype = i32
        combine = getattr(library, f"syncbn_combine_{suffix}")
        combine.argtypes = [pointer, pointer, pointer, i32, i64, i64, i64, pointer, pointer, pointer, pointer, i32]
        combine.restype = i32
    return library
