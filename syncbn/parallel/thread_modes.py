"""A thread's grad mode and autocast state, carried to the thread or greenlet that runs a replica.

Both are thread-local in torch: a replica thread starts in torch's defaults, and
greenlets of one thread share one state; ``ThreadModes`` captures the caller's and
enters it for a replica.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch


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
