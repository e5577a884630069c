"""Per-replica compute of SyncBN: local statistics, normalization, and their backward.

Two implementations with the same functions (``batch_statistics``, ``normalize``,
``normalize_backward``, ``gradient_sums``, ``input_gradient``, ``affine_in_deviation``):

- ``native``: compiled C, one pass per step, float64 sums; float32/float64 CPU tensors
  in a dense layout, where a C compiler is available; opt-in with ``SYNCBN_NATIVE=1``;
- ``torch_ops``: torch's own fast kernels composed into the same passes; any device.

``for_input`` picks one for a given input.
"""

from types import ModuleType

from torch import Tensor

from syncbn.kernels import native, torch_ops


def for_input(input: Tensor) -> ModuleType:
    """The kernels to use for ``input``: ``native`` where it supports it, else ``torch_ops``.

    Example:
        >>> import torch
        >>> for_input(torch.zeros(2, 3, dtype=torch.bfloat16)).__name__
        'syncbn.kernels.torch_ops'
    """
    return native if native.supports(input) else torch_ops
