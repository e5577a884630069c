"""How far a verified tensor may be from the reference: ``Tolerance`` and the defaults per dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from syncbn.workload import as_dtype

DEFAULT_MAX_RATIO = 2.0


@dataclass(frozen=True)
class Tolerance:
    """How far a tensor may be from the reference: ``max|err| <= max(atol, rtol * max|reference|)``.

    Relative errors are taken against ``norm(max|reference|)``, the tensor's largest
    magnitude but at least ``atol / rtol``, so that a tensor that is almost zero
    everywhere (the gradient of a bias followed by BatchNorm, say) is judged by ``atol``
    and a relative error passes exactly when it is at most ``rtol``.

    Example:
        >>> tolerance = Tolerance(rtol=1e-4, atol=1e-5)
        >>> tolerance.allowed(scale=2.0), tolerance.allowed(scale=1e-9)
        (0.0002, 1e-05)
        >>> tolerance.norm(scale=1e-9)
        0.1
    """

    rtol: float
    atol: float

    def allowed(self, scale: float) -> float:
        """The largest absolute error allowed for a tensor whose largest magnitude is ``scale``."""
        return max(self.atol, self.rtol * scale)

    def norm(self, scale: float) -> float:
        """What absolute errors are divided by to make relative errors."""
        return max(scale, self.atol / self.rtol) if self.rtol > 0 else scale


# By the less precise of the two dtypes compared. atol is also the absolute tolerance of
# the truth judgement: it covers quantities that are zero in exact arithmetic (the gradient
# of a bias followed by BatchNorm), where every dtype leaves noise of about that size.
DEFAULT_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-7, atol=1e-7),
    torch.float32: Tolerance(rtol=1e-4, atol=1e-4),
    torch.float16: Tolerance(rtol=1e-2, atol=1e-3),
    torch.bfloat16: Tolerance(rtol=1e-1, atol=1e-2),
}


def default_tolerance(dtype: torch.dtype | str, reference_dtype: torch.dtype | str | None = None) -> Tolerance:
    """The default tolerance for comparing ``dtype`` results with a ``reference_dtype`` reference.

    The less precise dtype decides.

    Example:
        >>> default_tolerance("float32", "float64")
        Tolerance(rtol=0.0001, atol=0.0001)
    """
    dtypes = [as_dtype(dtype), as_dtype(reference_dtype if reference_dtype is not None else dtype)]
    return max((DEFAULT_TOLERANCES[d] for d in dtypes), key=lambda tolerance: tolerance.rtol)
